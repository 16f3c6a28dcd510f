"""A capture split into one file per node (each on its own clock) and loaded as a directory or
a glob, partition by partition, gives the tables the same events give in one file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bench import multinode
from tracer import analysis, tracefile
from tracer.analysis import partitioned
from tracer.analysis.spilled import SpilledTrace
from tracer.kernel.record import HOOK_IDS


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    nodes = d / "nodes"
    nodes.mkdir()
    files = multinode.write_nodes(nodes, 40_000, nodes=4, pods=3, combined=d / "all-nodes.parquet",
                                  block_packets=1500, bare_frees=0.3)
    one = analysis.load(d / "all-nodes.parquet")
    return d, files, one


def _same(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    """Equal columns, values and kinds of column (a categorical's categories may be in
    another order: they are listed as first met)."""
    assert list(a.columns) == list(b.columns), name
    assert len(a) == len(b), name
    for c in a.columns:
        x, y = a[c], b[c]
        assert isinstance(x.dtype, pd.CategoricalDtype) == isinstance(y.dtype, pd.CategoricalDtype), (name, c)
        if isinstance(x.dtype, pd.CategoricalDtype):
            x, y = x.astype(object), y.astype(object)
        else:
            assert x.dtype == y.dtype, (name, c, x.dtype, y.dtype)
        pd.testing.assert_series_equal(x, y, check_names=False, obj=f"{name}.{c}")


def test_the_node_files_are_on_their_own_clocks(capture):
    _, files, _ = capture
    metas = [tracefile.read_meta(f) for f in files]
    offsets = [m["clock"]["realtime_offset_ns"] for m in metas]
    assert len(set(offsets)) == len(files)
    firsts = [int(tracefile.load(f)[0]["ts_ns"].min()) for f in files]
    # node k booted k hours earlier: its monotonic clock is ahead by what its offset is behind
    for k, (first, off) in enumerate(zip(firsts, offsets)):
        assert offsets[0] - off == k * multinode.BOOT_APART_NS
        assert first >= k * multinode.BOOT_APART_NS


@pytest.mark.parametrize("how", ["directory", "glob"])
def test_partitioned_load_equals_one_file(capture, how):
    d, files, one = capture
    spec = d / "nodes" if how == "directory" else str(d / "nodes" / "node-*.parquet")
    t = analysis.load(spec, partition_events=9_000)
    try:
        assert isinstance(t, SpilledTrace) and t.partitions >= 4
        assert t.meta["files"] == [str(f) for f in files]
        # the packets crossed nodes: their hops came from two files, joined on one clock
        cross = (one.packets["first_node"].astype(str) != one.packets["last_node"].astype(str)).mean()
        assert cross > 0.9
        assert set(one.packets["status"].astype(str)) >= {"delivered", "dropped", "lost"}
        # drops with no readable header: only their buffer's last hop (in the same file) ties them
        bare = (one.events["hook"] == HOOK_IDS["drop"]) & (one.events["proto"] == 0)
        assert bare.sum() > 10
        assert len(one.drops) and one.drops["count"].sum() == (one.packets["status"] == "dropped").sum()
        assert one.flows["service"].notna().any()      # DNAT: tuples joined across partitions
        assert t.summary() == one.summary()
        for name in ("flows", "drops", "packets", "hops", "events"):
            _same(getattr(one, name), getattr(t, name), name)
        k = int(one.packets["packet"].iloc[len(one.packets) // 2])
        _same(one.path(k).reset_index(drop=True), t.path(k).reset_index(drop=True), "path")
        f = int(one.flows["flow"].iloc[-1])
        _same(one.flow_packets(f).reset_index(drop=True), t.flow_packets(f).reset_index(drop=True), "flow_packets")
    finally:
        t.close()


def test_tables_are_read_only_when_used_and_the_spill_is_removed(capture):
    d, _, one = capture
    t = analysis.load(d / "nodes", partition_events=20_000)
    spill = t.spill
    assert spill.is_dir()
    assert "packets" not in t.__dict__ and "hops" not in t.__dict__ and "events" not in t.__dict__
    assert "partitions" in repr(t) and f"{len(one.flows)} flows" in repr(t)
    assert len(t.flows) == len(one.flows)
    assert "packets" not in t.__dict__
    t.close()
    assert not spill.exists()


def test_analyze_reads_only_what_it_shows(capture):
    d, _, one = capture
    t = analysis.load(d / "nodes", partition_events=15_000)
    try:
        got, want = analysis.summary_doc(t), analysis.summary_doc(one)
        assert "packets" not in t.__dict__ and "hops" not in t.__dict__
        got.pop("file"), want.pop("file")
        assert got == want
        assert len(want["not_delivered"]) == 20
        _same(one.packets[one.packets["status"] == "dropped"].reset_index(drop=True),
              t.packets_where(status="dropped"), "dropped")
        _same(one.undelivered().reset_index(drop=True), t.undelivered(), "undelivered")
        _same(one.packets_where(status="dropped").reset_index(drop=True), t.packets_where(status="dropped"),
              "packets_where")
    finally:
        t.close()


def test_analyze_command_on_a_large_directory(capture, monkeypatch):
    """`podtrace analyze DIR` above the partition size: the same report as the one file."""
    import json

    from click.testing import CliRunner

    from tracer.cli.main import main

    d, _, _ = capture
    monkeypatch.setattr(partitioned, "PARTITION_EVENTS", 12_000)
    docs = []
    for spec in (d / "all-nodes.parquet", d / "nodes"):
        res = CliRunner().invoke(main, ["analyze", str(spec), "-o", "json"])
        assert res.exit_code == 0, res.output
        docs.append(json.loads(res.output))
    for doc in docs:
        doc.pop("file")
    assert docs[0] == docs[1]
    assert docs[0]["drops"] and docs[0]["not_delivered"]


def test_small_directories_load_in_memory(capture):
    d, _, one = capture
    t = analysis.load(d / "nodes")          # below partitioned.PARTITION_EVENTS
    assert not isinstance(t, SpilledTrace)
    _same(one.packets, t.packets, "packets")


def test_a_free_goes_where_its_buffers_last_hop_went():
    drop, rx = HOOK_IDS["drop"], 1
    route = partitioned._SkbRoute()
    skb = np.array([0x10, 0x20, 0x10], dtype=np.uint64)
    got = route.route(skb, np.array([rx, rx, drop]), np.array([3, 5, 0]))
    assert got.tolist() == [3, 5, 3]          # the drop of 0x10 joins its hop's partition
    # in a later batch: a free whose hop was in an earlier one; a free of an unknown buffer
    got = route.route(np.array([0x20, 0x30], dtype=np.uint64), np.array([HOOK_IDS["consume"], drop]),
                      np.array([1, 2]))
    assert got.tolist() == [5, 2]


def test_one_packets_hops_share_a_partition():
    """Content identical, addresses rewritten (NAT, tunnels), other nodes: one partition."""
    n = 6
    cols = {"proto": [6] * n, "ip_id": [7] * 3 + [8] * 3, "ip_len": [52] * n, "tcp_flags": [0x18] * n,
            "icmp_type": [0] * n, "tcp_seq": [1000] * n, "sport": [1, 2, 3, 1, 2, 3], "dport": [80] * n,
            "flow_lbl": [0] * n}
    batch = pa.RecordBatch.from_pydict({k: pa.array(v, pa.uint32()) for k, v in cols.items()})
    part = partitioned.content_partition(batch, 64)
    assert part[0] == part[1] == part[2] and part[3] == part[4] == part[5]
    wide = partitioned.content_partition(batch, 1_000_003)
    assert wide[0] == wide[2] and wide[0] != wide[3]
