"""`capture` in a cluster: the selection is listed, then watched through the official client
(against tests/fakeapi/, which describes a lab of its own), and the kernel's address
filter follows the pods that appear and go while the capture runs. The capture runs on
node-1 (inside its network namespace, as on a node), so it records that node and its pods
only — not the other lab node, nor other labs on this kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.fakeapi import FakeApi
from tests.integration.lab_fixture import ping, private_lab, traced_addrs, wait_until
from tracer import tracefile
from tracer.runs import capture
from tracer.cluster.api import Stream, cluster_streams

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pttestcw"
LATE = "10.244.1.3"     # default/pod-1-2: unknown to the API when the capture starts
GOING = "10.244.1.2"    # default/pod-1-1: deleted from the API during the capture


def _mono() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the clock of the events' ts_ns


def _touching(df, ip: str):
    return df[(df["saddr_str"] == ip) | (df["daddr_str"] == ip)]


def test_capture_follows_pods_that_come_and_go(tmp_path):
    with private_lab(PREFIX):
        node1 = f"{PREFIX}-node-1"
        node1_ino, pod12_ino, pod21_ino = (os.stat(f"/run/netns/{PREFIX}-{x}").st_ino
                                           for x in ("node-1", "pod-1-2", "pod-2-1"))
        api = FakeApi.from_lab(PREFIX, netns=node1)    # reachable from the node, on its loopback
        late = api.get("Pod", "default", "pod-1-2")
        api.delete("Pod", "default", "pod-1-2")
        out = tmp_path / "watch.parquet"
        with api:
            kc = api.write_kubeconfig(tmp_path / "kubeconfig")
            env = subprocess_env(PODTRACE_LAB_PREFIX="pttest-none")   # the API is the only source
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node1}", "--",
                                     sys.executable, "-m", "tracer.cli", "capture", "-n", "default",
                                     "--kubeconfig", str(kc), "-d", "9", "-w", str(out)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                part = out.with_name(out.name + ".part")
                end = time.monotonic() + 30
                while not part.exists() and proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.05)
                assert part.exists(), proc.poll() is not None and proc.communicate()
                # the programs are loaded and attached once the selection is in the kernel
                assert wait_until(lambda: GOING in traced_addrs(proc.pid) or proc.poll() is not None, 30)
                assert LATE not in traced_addrs(proc.pid)
                assert ping(node1, LATE) == LATE         # not selected yet: not captured
                t_added = _mono()
                api.add(late)
                assert wait_until(lambda: LATE in traced_addrs(proc.pid), 15), "watch event → filter"
                for seq in range(3):
                    assert ping(node1, LATE, seq=seq + 2) == LATE
                assert ping(node1, GOING) == GOING       # still selected: captured
                api.delete("Pod", "default", "pod-1-1")
                assert wait_until(lambda: GOING not in traced_addrs(proc.pid), 15), "watch event → filter"
                t_gone = _mono()
                assert ping(node1, GOING, seq=9) == GOING   # no longer selected: not captured
                _, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert proc.returncode == 0, err
    df, meta = tracefile.load(out)
    late_ev, going_ev = _touching(df, LATE), _touching(df, GOING)
    assert len(late_ev) > 0, "the pod that appeared was not followed"
    assert (late_ev["ts_ns"] > t_added).all(), "traffic of the pod before it existed was captured"
    assert len(going_ev) > 0 and (going_ev["ts_ns"] < t_gone).all(), "the pod that went is still captured"
    rows = meta["membership_changes"]["rows"]
    assert [r[1:] for r in rows if r[1] != "unresolved"] == [["added", LATE, "default/pod-1-2"],
                                                             ["removed", GOING, "default/pod-1-1"]], rows
    pods = {p["key"]: p for p in meta["pods"]}
    assert pods["default/pod-1-1"].get("gone") and "default/pod-1-2" in pods, "the file names both pods"
    assert not _touching(df, "10.244.2.2").size, "node-2's pods are not this node's to record"
    scope = set(meta["scope"]["netns"])
    # node-1 and every pod namespace behind its veths (known to the API or not); not node-2's
    assert {node1_ino, pod12_ino} <= scope and pod21_ino not in scope, scope
    assert meta["inventory"].startswith("cluster https://127.0.0.1"), meta["inventory"]


def test_cluster_streams_follow_the_selection():
    S = Stream
    sel = capture.Selection(pods=["shop/cart-0"], namespaces=["web"], services=["default/api"], nodes=["n1"])
    got = capture.cluster_streams(sel)
    assert S("Pod", "shop", field_selector="metadata.name=cart-0") in got
    assert {S("Pod", "web"), S("Service", "web"), S("EndpointSlice", "web")} <= set(got)
    assert S("EndpointSlice", "default", label_selector="kubernetes.io/service-name=api") in got
    assert S("Pod", field_selector="spec.nodeName=n1") in got
    assert not any(s.namespace is None and s.field_selector is None and s.kind == "Pod" for s in got), \
        "a named selection never watches every pod of the cluster"
    assert capture.cluster_streams(capture.Selection()) == cluster_streams()
    assert capture.cluster_streams(capture.Selection(cidrs=["10.0.0.0/8"])) == cluster_streams()


@pytest.mark.parametrize("spec", ["a/b/c", "/x"])
def test_odd_pod_specs_fall_back_to_the_whole_cluster(spec):
    assert capture.cluster_streams(capture.Selection(pods=[spec])) == cluster_streams()
