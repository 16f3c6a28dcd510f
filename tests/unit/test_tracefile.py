"""Trace files: round trip, row groups, damaged and foreign files, older versions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.analysis import meta as synth_meta
from bench.analysis import synth, synth_flow
from tracer import tracefile
from tracer import analysis
from tracer.kernel import record
from tracer.errors import BadInput


def write(path, arr, meta=None, **kw):
    w = tracefile.Writer(path, **kw)
    for i in range(0, len(arr), 4096):
        w.write_records(arr[i:i + 4096])
    return w.close(meta or synth_meta())


@pytest.fixture(scope="module")
def small():
    arr, meta, truth = synth(20_000)
    return arr, meta, truth


def test_round_trip_keeps_every_field(tmp_path, small):
    arr, meta, _ = small
    p = write(tmp_path / "t.parquet", arr, meta)
    df, m = tracefile.load(p)
    want = record.to_frame(arr)
    assert len(df) == len(arr) == m["events"]
    for name, c_type, _ in record.EVENT_FIELDS:
        if c_type.startswith("char"):
            continue
        assert (df[name].to_numpy().astype(np.int64) == want[name].to_numpy().astype(np.int64)).all(), name
    assert (df["ifname"].astype(str).to_numpy() == want["ifname"].astype(str).to_numpy()).all()
    for c in ("saddr_str", "daddr_str", "outer_saddr_str", "hook_name"):
        assert (df[c].astype(str).to_numpy() == want[c].astype(str).to_numpy()).all(), c
    assert m["format_version"] == tracefile.FORMAT_VERSION
    assert m["kind"] == "capture" and m["kernel"]["release"] and "clock" in m
    assert m["clock"]["node_offsets_ns"] == {"node-1": 0, "node-2": 0}


def test_row_groups_bound_what_is_held(tmp_path, small):
    arr, meta, _ = small
    w = tracefile.Writer(tmp_path / "g.parquet", row_group_events=2048)
    for i in range(0, len(arr), 1000):
        w.write_records(arr[i:i + 1000])
        assert w._pending_rows < 2048          # never more than one row group waits
    w.close(meta)
    pf = pq.ParquetFile(tmp_path / "g.parquet")
    assert pf.metadata.num_row_groups == -(-len(arr) // 2048)
    assert all(pf.metadata.row_group(i).num_rows == 2048 for i in range(pf.metadata.num_row_groups - 1))


def test_writer_moves_file_into_place_only_when_complete(tmp_path, small):
    arr, meta, _ = small
    w = tracefile.Writer(tmp_path / "c.parquet")
    w.write_records(arr[:100])
    assert not (tmp_path / "c.parquet").exists() and (tmp_path / "c.parquet.part").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_save_frame_keeps_agent_column(tmp_path, small):
    arr, meta, _ = small
    df = record.to_frame(arr[:500])
    df["agent"] = np.arange(500) % 2
    df["ts_ns"] = df["ts_ns"].astype("int64")
    tracefile.save(tmp_path / "a.parquet", df, dict(meta, kind="flow"))
    back, m = tracefile.load(tmp_path / "a.parquet")
    assert (back["agent"].to_numpy() == df["agent"].to_numpy()).all()
    assert m["kind"] == "flow"


def test_empty_trace(tmp_path):
    p = write(tmp_path / "e.parquet", np.zeros(0, dtype=record.EVENT_DTYPE))
    df, m = tracefile.load(p)
    assert len(df) == 0 and m["events"] == 0
    t = analysis.load(p)
    assert t.packets.empty and t.hops.empty and t.flows.empty and t.drops.empty
    assert t.summary()["packets"] == 0


# --- damaged, foreign, missing ----------------------------------------------------------

def one_line_error(path) -> str:
    with pytest.raises(tracefile.TraceFileError) as exc:
        analysis.load(path)
    assert isinstance(exc.value, BadInput) and exc.value.exit_code == 2
    line = exc.value.line()
    assert "\n" not in line and str(path) in line
    return line


def test_missing_and_directory(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "nope.parquet")
    assert "directory" in one_line_error(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "z.parquet").write_bytes(b"")
    assert "empty" in one_line_error(tmp_path / "z.parquet")


def test_not_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"this is a pcap, honest\n" * 50)
    assert "not a Parquet file" in one_line_error(tmp_path / "x.parquet")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated(tmp_path, small, keep):
    arr, meta, _ = small
    p = write(tmp_path / "t.parquet", arr, meta)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in one_line_error(p)


def test_damaged_footer(tmp_path, small):
    arr, meta, _ = small
    p = write(tmp_path / "d.parquet", arr, meta)
    data = bytearray(p.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    data[start:start + 64] = b"\xff" * 64      # scribble over the footer, keep the magic
    p.write_bytes(bytes(data))
    assert "damaged" in one_line_error(p)


def test_damaged_data_pages(tmp_path, small):
    arr, meta, _ = small
    p = write(tmp_path / "d.parquet", arr, meta)
    data = bytearray(p.read_bytes())
    data[4:4000] = bytes(np.random.default_rng(1).integers(0, 256, 3996, dtype=np.uint8))
    p.write_bytes(bytes(data))
    assert "damaged" in one_line_error(p)


def test_foreign_parquet(tmp_path):
    pq.write_table(pa.table({"a": [1, 2, 3]}), tmp_path / "f.parquet")
    assert "not a podtrace trace" in one_line_error(tmp_path / "f.parquet")


def _with_meta(tmp_path, raw: bytes, table=None):
    table = table or pa.table({"a": [1]})
    table = table.replace_schema_metadata({tracefile.META_KEY: raw})
    pq.write_table(table, tmp_path / "m.parquet")
    return tmp_path / "m.parquet"


def test_bad_metadata(tmp_path):
    assert "not JSON" in one_line_error(_with_meta(tmp_path, b"{not json"))
    assert "not a JSON object" in one_line_error(_with_meta(tmp_path, b"[1, 2]"))


def test_newer_version_says_upgrade(tmp_path):
    line = one_line_error(_with_meta(tmp_path, json.dumps({"format_version": 99}).encode()))
    assert "newer podtrace" in line and "upgrade" in line


def test_missing_columns(tmp_path):
    line = one_line_error(_with_meta(tmp_path, json.dumps({"format_version": 2}).encode()))
    assert "lacks column" in line


# --- version 1 (the first `flow --save`) -------------------------------------------------

def save_v1(path, df: pd.DataFrame, meta: dict) -> None:
    """Exactly what tracer/tracefile.py of format 1 wrote."""
    table = pa.Table.from_pandas(df.assign(hook_name=df["hook_name"].astype(str)), preserve_index=False)
    md = dict(table.schema.metadata or {})
    md[b"podtrace"] = json.dumps({"format_version": 1, **meta}).encode()
    pq.write_table(table.replace_schema_metadata(md), path, compression="zstd")


def v1_meta(meta: dict) -> dict:
    keep = ("src", "dst", "proto", "port", "probes", "placement", "drop_reasons", "locations",
            "service", "probing", "counters", "inventory", "hooks")
    return {"version": 1, **{k: meta[k] for k in keep if k in meta}, "ct_info_names": {}, "created_ns": 1}


@pytest.mark.parametrize("drop", [False, True])
def test_version_1_flow_file_loads_with_same_verdicts(tmp_path, drop):
    arr, meta = synth_flow(probes=3, drop_requests=drop)
    df = record.to_frame(arr)
    save_v1(tmp_path / "v1.parquet", df, v1_meta(meta))
    t = analysis.load(tmp_path / "v1.parquet")
    assert t.meta["upgraded_from"] == 1 and t.meta["format_version"] == tracefile.FORMAT_VERSION
    assert t.mode == "flow" and len(t.events) == len(arr)
    # the same file in the current format gives the same packets and verdicts
    tracefile.save(tmp_path / "v2.parquet", df, meta)
    t2 = analysis.load(tmp_path / "v2.parquet")
    cols = ["direction", "seq", "status", "verdict_node", "verdict_dev", "reason", "hops"]
    pd.testing.assert_frame_equal(t.packets[cols], t2.packets[cols])
    if drop:
        assert set(t.packets["status"]) == {"dropped"}
        assert t.drops["reason"].tolist() == ["NETFILTER_DROP"] and t.drops["node"].tolist() == ["node-2"]
    else:
        assert set(t.packets["status"]) == {"delivered"}
        assert sorted(t.packets["direction"]) == ["reply"] * 3 + ["request"] * 3


def test_read_meta_is_cheap_and_complete(tmp_path, small):
    arr, meta, _ = small
    p = write(tmp_path / "t.parquet", arr, meta)
    m = tracefile.read_meta(p)
    assert m["events"] == len(arr) and m["row_groups"] >= 1 and m["pods"]


# --- version 2 (IPv4 addresses as uint32) -------------------------------------------------

V2_FILE = __import__("pathlib").Path(__file__).parent / "data" / "trace-v2.parquet"


def test_version_2_file_loads_into_the_same_frame(tmp_path):
    """data/trace-v2.parquet was written by format 2's tracefile.save (bench.analysis
    synth_flow(probes=3), created_ns=1): it loads with the numbers and strings a fresh
    decode of the same records gives, and verdicts equal to the current format's."""
    arr, meta = synth_flow(probes=3, drop_requests=False)
    old, m = tracefile.load(V2_FILE)
    assert m["upgraded_from"] == 2 and m["format_version"] == tracefile.FORMAT_VERSION
    new = record.to_frame(arr)
    assert list(old.columns) == list(new.columns)
    for c in record.IP_COLUMNS:
        assert old[c].dtype == np.uint64
        assert old[c].tolist() == new[c].tolist()
        assert old[c + "_str"].astype(str).tolist() == new[c + "_str"].astype(str).tolist()
    assert (old["flow_lbl"] == 0).all()
    tracefile.save(tmp_path / "v3.parquet", new, dict(meta, created_ns=1))
    cols = ["direction", "seq", "status", "verdict_node", "verdict_dev", "reason", "hops"]
    pd.testing.assert_frame_equal(analysis.load(V2_FILE).packets[cols],
                                  analysis.load(tmp_path / "v3.parquet").packets[cols])


def test_ipv6_addresses_round_trip(tmp_path):
    from tracer import addrs

    arr, meta = synth_flow(probes=2, drop_requests=False)
    v6 = {"saddr": "fd00:10:244:1::2", "daddr": "fd00:10:244:2::3", "ct_orig_src": "fd00:10:244:1::2",
          "ct_orig_dst": "fd00:10:96::a"}
    arr["flags"][:] |= record.FLAG_V6 | record.FLAG_CT_V6
    for c, a in v6.items():
        arr[c][:] = np.frombuffer(addrs.packed16(a), np.uint8)
    arr["ct_reply_src"][:] = 0
    arr["ct_reply_dst"][:] = 0
    arr["flow_lbl"][:] = 0xABCDE
    p = write(tmp_path / "v6.parquet", arr, meta)
    df, _ = tracefile.load(p)
    live = record.to_frame(arr)
    for c in record.IP_COLUMNS:
        assert df[c].tolist() == live[c].tolist()
        assert df[c + "_str"].astype(str).tolist() == live[c + "_str"].astype(str).tolist()
    assert set(df["saddr_str"].astype(str)) == {"fd00:10:244:1::2"}
    assert set(df["saddr"]) == {addrs.key("fd00:10:244:1::2")}
    assert (df["flow_lbl"] == 0xABCDE).all()
    # a frame (keys + strings) writes back the same 16 bytes
    tracefile.save(tmp_path / "again.parquet", df, meta)
    again, _ = tracefile.load(tmp_path / "again.parquet")
    assert again["daddr_str"].astype(str).tolist() == df["daddr_str"].astype(str).tolist()
    assert again["saddr"].tolist() == df["saddr"].tolist()
