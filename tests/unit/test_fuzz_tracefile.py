"""Property tests of the trace-file reader: `tracefile.load` / `read_meta` on arbitrary,
truncated or damaged bytes raise only the module's documented error (TraceFileError, a
BadInput: exit 2 with one line), never a pyarrow, numpy, pandas, JSON or Python error — and
a file that does load gives well-formed events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import tracefile
from tracer.kernel import record
from tracer.errors import BadInput

SETTINGS = settings(max_examples=int(__import__("os").environ.get("PT_FUZZ_N", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _events(n: int = 64) -> np.ndarray:
    arr = np.zeros(n, dtype=record.EVENT_DTYPE)
    arr["ts_ns"] = np.arange(n) * 1000 + 10**9
    arr["saddr"] = record.v4_field(0x0201F40A)      # 10.244.1.2 (network order, as the kernel gives it)
    arr["daddr"] = record.v4_field(0x0302F40A)
    arr["sport"] = np.arange(n)
    arr["hook"] = np.arange(n) % 4 + 1
    arr["proto"] = 17
    arr["ifname"] = [b"eth0", b"cni0", b"flannel.1", b"veth1234"] * (n // 4)
    return arr


class _Files(dict):
    def __repr__(self):   # keep hypothesis' failure reports readable
        return f"<trace files {', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())}>"


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    """Valid trace files, compressed (the default) and not (damage then hits values, not the
    decompressor), as bytes."""
    out = _Files()
    d = tmp_path_factory.mktemp("traces")
    for comp in ("zstd", "none"):
        w = tracefile.Writer(d / f"{comp}.parquet", compression=comp, row_group_events=32)
        w.write_records(_events())
        p = w.close({"kind": "capture", "clock": {}, "inventory": "none",
                     "src": {"spec": "default/a", "ip": "10.244.1.2"}})
        out[comp] = p.read_bytes()
        df, meta = tracefile.load(p)      # the originals are fine
        assert len(df) == 64 and meta["events"] == 64
    return out


def _check(path) -> None:
    """load() and read_meta() either succeed with sane results or raise TraceFileError."""
    for fn in (tracefile.read_meta, tracefile.load):
        try:
            res = fn(path)
        except tracefile.TraceFileError as exc:
            assert isinstance(exc, BadInput) and exc.exit_code == 2
            assert "\n" not in exc.line(), exc.line()
            continue
        if fn is tracefile.load:
            df, meta = res
            assert isinstance(df, pd.DataFrame) and isinstance(meta, dict)
            assert {"saddr_str", "daddr_str", "hook_name", "ifname"} <= set(df.columns)
        else:
            assert isinstance(res, dict)


@SETTINGS
@given(data=st.binary(max_size=4096), head=st.sampled_from(["none", "parquet", "stream"]))
def test_arbitrary_bytes(tmp_path, data, head):
    p = tmp_path / "x.parquet"
    # With a signature the bytes get past the cheap checks into pyarrow: Parquet's at both
    # ends, or the first bytes of an Arrow stream (what an unfinished `.part` starts with).
    p.write_bytes({"none": data, "parquet": b"PAR1" + data + b"PAR1",
                   "stream": tracefile.STREAM_SIGNATURE + data}[head])
    _check(p)


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, good_files, comp, cut):
    raw = good_files[comp]
    p = tmp_path / "t.parquet"
    p.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(tracefile.TraceFileError):
        tracefile.load(p)


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), data=st.data())
def test_damaged(tmp_path, good_files, comp, data):
    p = tmp_path / "d.parquet"
    p.write_bytes(_damage(good_files[comp], data, overwrite=True))
    _check(p)


def _damage(good: bytes, data, overwrite: bool) -> bytes:
    """1 to 4 flipped bits (or, with `overwrite`, overwritten byte runs) anywhere."""
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        if not overwrite or data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            chunk = data.draw(st.binary(min_size=1, max_size=12))
            raw[at:at + len(chunk)] = chunk[: len(raw) - at]
    return bytes(raw)


def test_not_a_file_kinds(tmp_path):
    for bad in (tmp_path / "missing.parquet", tmp_path):
        with pytest.raises(tracefile.TraceFileError):
            tracefile.load(bad)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(tracefile.TraceFileError, match="empty"):
        tracefile.load(empty)
    part = tmp_path / "half.parquet.part"          # what a killed --save leaves
    w = tracefile.Writer(tmp_path / "half.parquet", row_group_events=16)
    w.write_records(_events())                       # four batches on disk, not finished
    df, meta = tracefile.load(part)
    assert len(df) == 64 and meta["incomplete"] is True and meta["events"] == 64
    w.abort()
    assert not part.exists()
    # a `.part` of the Parquet writer before format streams: rows, no footer
    old = tmp_path / "old.parquet.part"
    raw = (tmp_path / "raw.parquet")
    pq.write_table(tracefile.batch_from_records(_events()).to_pandas().pipe(pa.Table.from_pandas), raw)
    old.write_bytes(raw.read_bytes()[:-64])
    with pytest.raises(tracefile.TraceFileError, match="truncated or damaged") as exc:
        tracefile.load(old)
    assert "\n" not in exc.value.line()


@pytest.fixture(scope="module")
def good_streams(tmp_path_factory) -> dict[str, bytes]:
    """Unfinished trace files (the `.part` stream a Writer appends to) of 64 events in four
    batches, compressed and not, as bytes; what a SIGKILL after the fourth batch leaves."""
    out = _Files()
    d = tmp_path_factory.mktemp("streams")
    for comp in ("zstd", "none"):
        w = tracefile.Writer(d / f"{comp}.parquet", compression=comp, row_group_events=16,
                             meta={"kind": "capture", "clock": {}, "inventory": "none"})
        w.write_records(_events())
        out[comp] = w.tmp.read_bytes()
        w.abort()
    return out


def _prefix_or_error(path, n: int = 64) -> int | None:
    """load() and read_meta() of a cut or damaged stream: a prefix of the events written
    (returned: how many), or one TraceFileError (None)."""
    try:
        meta = tracefile.read_meta(path)
    except tracefile.TraceFileError as exc:
        assert isinstance(exc, BadInput) and "\n" not in exc.line(), exc.line()
        meta = None
    try:
        df, lmeta = tracefile.load(path)
    except tracefile.TraceFileError as exc:
        assert isinstance(exc, BadInput) and "\n" not in exc.line(), exc.line()
        assert meta is None, "read_meta accepted what load refused"
        return None
    assert meta is not None and meta["events"] == lmeta["events"] == len(df)
    assert lmeta["incomplete"] is True and lmeta["incomplete_reason"]
    assert len(df) <= n
    assert (df["sport"].to_numpy() == np.arange(len(df))).all(), "not a prefix of what was written"
    assert (df["ifname"].astype(str).to_numpy() == _events()["ifname"][: len(df)].astype(str)).all()
    return len(df)


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), cut=st.integers(0, 10**6))
def test_truncated_stream(tmp_path, good_streams, comp, cut):
    """Wherever a killed writer stopped: the complete batches before the cut load, or — when
    the cut is inside the header — one TraceFileError."""
    raw = good_streams[comp]
    cut %= len(raw) + 1
    p = tmp_path / "t.parquet.part"
    p.write_bytes(raw[:cut])
    got = _prefix_or_error(p)
    assert got is None or got % 16 == 0, "a batch loads whole or not at all"


def test_cuts_of_a_stream_grow_by_whole_batches(tmp_path, good_streams):
    """Cuts across the whole stream, and the bytes on both sides of the end of every batch:
    the count only grows with the cut, by whole batches."""
    raw = good_streams["zstd"]

    def at(cut: int) -> int:
        p = tmp_path / f"c{cut}.part"
        p.write_bytes(raw[:cut])
        got = _prefix_or_error(p)
        p.unlink()
        return -1 if got is None else got

    counts = {cut: at(cut) for cut in range(0, len(raw) + 1, 97)}
    counts[len(raw)] = at(len(raw))
    for want in (0, 16, 32, 48, 64):          # the first cut with `want` events: a batch's end
        lo, hi = 0, len(raw)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if at(mid) >= want else (mid + 1, hi)
        counts.update({c: at(c) for c in (lo - 2, lo - 1, lo, lo + 1) if 0 <= c <= len(raw)})
        assert counts[lo] == want
    order = [counts[c] for c in sorted(counts)]
    assert order == sorted(order), "more bytes gave fewer events"
    assert set(order) == {-1, 0, 16, 32, 48, 64}


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), data=st.data())
def test_damaged_stream(tmp_path, good_streams, comp, data):
    p = tmp_path / "d.parquet.part"
    p.write_bytes(_damage(good_streams[comp], data, overwrite=False))
    _check(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=16), inner, max_size=5),
    max_leaves=16,
)
meta_docs = st.one_of(
    json_values,
    # near-valid documents: the keys the reader looks at, with values of any type
    st.fixed_dictionaries({}, optional={k: json_values for k in (
        "format_version", "kind", "clock", "counters", "hooks", "nodes", "pods", "services",
        "src", "dst", "events", "row_groups", "kernel", "inventory")}),
)


@SETTINGS
@given(doc=meta_docs, raw=st.booleans(), junk=st.binary(max_size=40))
def test_any_metadata_document(tmp_path, good_files, doc, raw, junk):
    import json

    import pyarrow.parquet as pq

    src = tmp_path / "src.parquet"
    src.write_bytes(good_files["none"])
    table = pq.read_table(src)
    value = junk if raw else json.dumps(doc).encode()
    md = dict(table.schema.metadata or {})
    md[tracefile.META_KEY.encode() if isinstance(tracefile.META_KEY, str) else tracefile.META_KEY] = value
    p = tmp_path / "m.parquet"
    pq.write_table(table.replace_schema_metadata(md), p)
    _check(p)


FLOW_KEYS = ["src", "dst", "proto", "port", "probes", "placement", "drop_reasons", "locations",
             "ct_info_names", "service", "clock", "counters", "hooks", "nodes", "pods"]


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory):
    """A `flow --save`-shaped trace (kind flow, src/dst, probes) as a pyarrow table + its metadata."""
    import json

    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("flow")
    w = tracefile.Writer(d / "f.parquet", compression="none")
    w.write_records(_events())
    w.close({"kind": "flow", "clock": {}, "inventory": "none", "proto": "udp", "port": 8080, "probes": [],
             "src": {"spec": "default/a", "ip": "10.244.1.2", "pod": "default/a", "node": "node-1"},
             "dst": {"spec": "default/b", "ip": "10.244.2.3", "pod": "default/b", "node": "node-2"}})
    pf = pq.ParquetFile(d / "f.parquet")
    return pf.read(), json.loads(pf.metadata.metadata[tracefile.META_KEY])


@SETTINGS
@given(over=st.dictionaries(st.sampled_from(FLOW_KEYS), json_values, max_size=3))
def test_analysis_load_on_damaged_flow_metadata(tmp_path, flow_file, over):
    """`tracer.analysis.load` (the notebook entry point) rebuilds packets from the metadata:
    values of the wrong type are a damaged file (TraceFileError), not a TypeError."""
    import json

    import pyarrow.parquet as pq

    from tracer import analysis

    table, base = flow_file
    p = tmp_path / "f.parquet"
    pq.write_table(table.replace_schema_metadata({tracefile.META_KEY: json.dumps(dict(base, **over)).encode()}), p)
    try:
        t = analysis.load(p)
    except tracefile.TraceFileError:
        return
    assert isinstance(t.packets, pd.DataFrame)
