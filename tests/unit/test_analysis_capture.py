"""`podtrace capture` without the kernel: selection → filter, the bounded sink, the spool."""

from __future__ import annotations

import ctypes

import pytest

from bench.analysis import synth
from tracer import tracefile
from tracer.cli.capture import progress_line
from tracer.runs import capture
from tracer.runs.spool import Spool
from tracer.kernel import record
from tracer.cluster import inventory
from tracer.errors import BadInput
from tracer.lab import topology as T


@pytest.fixture(scope="module")
def inv() -> inventory.Inventory:
    topo = T.plan(T.LabConfig(prefix="pttestcapunit", nodes=2, pods_per_node=2, state_dir="/tmp/none"))
    return inventory.from_items(T.inventory(topo)["items"], source="unit")


def test_all_pod_traffic_by_default(inv):
    r = capture.resolve(capture.Selection(), inv)
    assert r.cidrs == ["10.244.1.0/24", "10.244.2.0/24"]
    assert set(r.addrs) == {s.cluster_ip for s in inv.services.values()}
    assert not r.any_addr and not r.ports
    assert "all pod traffic" in r.described[0]


def test_pod_namespace_service_node_cidr_port(inv):
    pod = inv.pods["default/pod-1-1"]
    assert capture.resolve(capture.Selection(pods=["pod-1-1"]), inv).addrs == [pod.ip]
    ns = capture.resolve(capture.Selection(namespaces=["default"]), inv)
    assert set(ns.addrs) == {p.ip for p in inv.pods.values()}
    web = inv.services["default/web"]
    for spec in ("default/web", "svc/default/web", "web"):
        r = capture.resolve(capture.Selection(services=[spec]), inv)
        assert set(r.addrs) == {web.cluster_ip, *web.backend_ips}
    node = capture.resolve(capture.Selection(nodes=["node-2"]), inv)
    assert node.cidrs == ["10.244.2.0/24"] and node.addrs == [inv.nodes["node-2"].ip]
    c = capture.resolve(capture.Selection(cidrs=["10.244.1.7/24", "10.96.0.10"], ports=[8080, 80]), inv)
    assert c.cidrs == ["10.96.0.10/32", "10.244.1.0/24"] and c.ports == [80, 8080] and c.addrs == []
    assert capture.resolve(capture.Selection(all_traffic=True), inv).any_addr


@pytest.mark.parametrize("sel,msg", [
    (capture.Selection(pods=["pod-9-9"]), "did you mean"),
    (capture.Selection(namespaces=["kube-sytem"]), "no pods in namespace"),
    (capture.Selection(services=["default/nope"]), "no Service"),
    (capture.Selection(nodes=["node-7"]), "no node"),
    (capture.Selection(cidrs=["10.244.300.0/24"]), "not an IPv4"),
    (capture.Selection(pods=["pod-1-1"], ports=[70000]), "out of range"),
])
def test_bad_selections_exit_2(inv, sel, msg):
    with pytest.raises(BadInput) as exc:
        capture.resolve(sel, inv)
    assert msg in exc.value.line() and exc.value.exit_code == 2


def feed(sink, arr):
    """Call the sink as BCC's ring buffer would, one record at a time."""
    rets = []
    for i in range(len(arr)):
        rets.append(sink(None, ctypes.c_void_p(arr[i:i + 1].ctypes.data), record.EVENT_DTYPE.itemsize))
    return rets


def test_sink_stops_the_poll_when_full_and_keeps_every_record():
    arr, _, _ = synth(10_000)
    arr = arr[:10_000]
    sink = capture.CaptureSink(limit=8192)
    rets = feed(sink, arr)
    assert rets.index(-1) == 8191            # stop the poll at the limit ...
    assert sink.count() == len(arr)          # ... without losing what was handed over
    got = b"".join(c.tobytes() for c in sink.take())
    assert got == arr.tobytes() and sink.pending() == 0


def test_spool_scope_and_statistics(tmp_path):
    arr, meta, truth = synth(20_000, drop_rate=0.1, lost_rate=0)
    other = arr[:500].copy()
    other["netns"] = 999                     # another lab with the same addresses
    w = tracefile.Writer(tmp_path / "s.parquet", row_group_events=4096)
    scope = {int(k) for k in meta["placement"]}
    spool = Spool(w, scope)
    for i in range(0, len(arr), 4096):
        spool.add(arr[i:i + 4096])
    spool.add(other)
    w.close(meta)
    assert spool.out_of_scope == 500 and spool.events == len(arr)
    assert spool.drops == sum(1 for x in truth if x[2] == "dropped")
    assert abs(spool.packets - len(truth)) <= len(truth) * 0.02   # approximate across batches
    df, m = tracefile.load(tmp_path / "s.parquet")
    assert len(df) == len(arr) and 999 not in set(df["netns"])


def test_timeline_is_thinned():
    rows = [[i, i, 0] for i in range(100_000)]
    thin = capture._thin(rows)
    assert len(thin) == 4000 and thin[0] == rows[0] and thin[-1] == rows[-1]


def test_progress_line_says_losses():
    d = {"elapsed_s": 3.2, "duration_s": 10, "events": 12345, "packets": 1000, "drops": 2, "lost": 7,
         "file_bytes": 2 * 2**20}
    line = progress_line(d)
    assert "3.2s/10s" in line and "12,345" in line and "events lost 7" in line and "2.0 MiB" in line
