"""What a loaded Trace hands out, for both reconstructions (a capture and a `flow --save`
file built from records): a short repr, no private columns, the reading types (nullable
integers, categorical names, a UTC wall clock), the fabric's hops labelled."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.analysis import synth, synth_flow
from tracer import analysis, tracefile
from tracer.kernel import record

TABLES = ("events", "packets", "hops", "flows", "drops")


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    arr, meta, _ = synth(3000, drop_rate=0.1)
    tracefile.save(d / "capture.parquet", record.to_frame(arr), meta)
    arr, fmeta = synth_flow(probes=3, drop_requests=True)
    tracefile.save(d / "flow.parquet", record.to_frame(arr), fmeta)
    return {"capture": analysis.load(d / "capture.parquet"), "flow": analysis.load(d / "flow.parquet"),
            "flow-as-capture": analysis.load(d / "flow.parquet", mode="capture")}


@pytest.fixture(params=["capture", "flow", "flow-as-capture"])
def t(request, traces):
    return traces[request.param]


def test_repr_is_short(t):
    r = repr(t)
    assert len(r) < 600 and len(r.splitlines()) <= 7, r
    assert f"{len(t.packets)} packets" in r and f"{len(t.hops)} hops" in r and f"{len(t.events)} events" in r
    assert "nodes: node-1, node-2" in r and "UTC" in r and ".parquet" in r
    assert "dropped" in r
    h = t._repr_html_()
    assert h.startswith("<pre>") and len(h) < 800


def test_no_private_columns(t):
    for name in TABLES:
        private = [c for c in getattr(t, name).columns if str(c).startswith("_")]
        assert not private, (name, private)


def test_documented_columns_stay(t):
    for name in ("packets", "hops", "flows", "drops"):
        missing = set(analysis.COLUMNS[name]) - set(getattr(t, name).columns)
        assert not missing, (name, missing)


def test_integers_stay_integers(t):
    h, p = t.hops, t.packets
    for c in ("sport", "dport", "vni", "ifindex", "netns", "len", "seq"):
        assert h[c].dtype == "Int64", (c, h[c].dtype)
    for c in ("sport", "dport", "final_sport", "final_dport", "seq", "ip_id", "ip_len", "one_way_ns"):
        assert p[c].dtype == "Int64", (c, p[c].dtype)
    assert t.flows["sport"].dtype == "Int64" and t.flows["dport"].dtype == "Int64"
    # no tunnel: no VNI (missing, not 0 or NaN)
    assert h.loc[h["encap"].isna(), "vni"].isna().all()
    assert (h.loc[h["encap"] == "vxlan", "vni"] == 1).all()


def test_drop_reasons_are_names(t):
    for frame in (t.packets, t.drops):
        assert isinstance(frame["reason"].dtype, pd.CategoricalDtype)
        assert "NETFILTER_DROP" in set(frame["reason"].dropna())
    ev = t.events
    assert isinstance(ev["reason_name"].dtype, pd.CategoricalDtype)
    assert set(ev.loc[ev["reason"] != 0, "reason_name"]) == {"NETFILTER_DROP"}
    assert ev.loc[ev["reason"] == 0, "reason_name"].isna().all()


def test_fabric_hops_are_labelled(t):
    h = t.hops
    fab = h[h["fabric"]]
    assert h["fabric"].dtype == bool and len(fab)
    assert set(fab["node"]) == {"(fabric)"} and set(fab["dev"]) == {"n1", "n2"}
    assert h.loc[~h["fabric"], "node"].notna().all()
    assert set(analysis.hop_label(fab).str.split("/").str[0]) == {"(fabric)"}


def test_wall_clock_time_beside_the_monotonic_one(t):
    off = t.meta["clock"]["realtime_offset_ns"]
    for name, ts in (("events", "ts_ns"), ("hops", "ts_ns"), ("packets", "first_ts_ns"),
                     ("flows", "first_ts_ns"), ("drops", "first_ts_ns")):
        df = getattr(t, name)
        cols = list(df.columns)
        assert cols.index("time") == cols.index(ts) + 1, name
        assert str(df["time"].dtype) == "datetime64[ns, UTC]", (name, df["time"].dtype)
        got = df["time"].astype("int64").to_numpy()
        assert (got == df[ts].astype("int64").to_numpy() + off).all(), name


def test_time_is_missing_without_a_clock_offset():
    arr, meta, _ = synth(500, drop_rate=0.1)
    t = analysis.analyse(record.to_frame(arr), meta)      # meta without `clock`
    assert t.hops["time"].isna().all() and str(t.hops["time"].dtype) == "datetime64[ns, UTC]"
    assert "no wall clock" in repr(t)


def test_flow_file_dated_by_the_clock_of_its_events(tmp_path):
    """A flow traced in this process (`clock` {}): this host's offset dates its events; one
    whose agents estimated offsets keeps the reference agent's (none given: NaT)."""
    import time

    arr, meta = synth_flow(probes=2)
    tracefile.save(tmp_path / "single.parquet", record.to_frame(arr), dict(meta, clock={}))
    t = analysis.load(tmp_path / "single.parquet")
    off = t.meta["clock"]["realtime_offset_ns"]
    assert abs(off - (time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC))) < 5_000_000_000
    assert t.hops["time"].notna().all()
    agents = {"reference": "node-1", "offsets": {"node-2": {"offset_ns": 7, "method": "packets"}}}
    tracefile.save(tmp_path / "agents.parquet", record.to_frame(arr), dict(meta, clock=agents))
    t = analysis.load(tmp_path / "agents.parquet")
    assert "realtime_offset_ns" not in t.meta["clock"] and t.hops["time"].isna().all()
    tracefile.save(tmp_path / "ref.parquet", record.to_frame(arr), dict(meta, clock={**agents, "realtime_offset_ns": 10**18}))
    t = analysis.load(tmp_path / "ref.parquet")
    assert (t.hops["time"].astype("int64") == t.hops["ts_ns"] + 10**18).all()
