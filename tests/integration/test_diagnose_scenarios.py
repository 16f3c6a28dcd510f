"""Every lab fault end to end: break → `flow` → the verdict names the node, the hop, the
kernel reason where there is one, the cause and an existing runbook → fix → delivered.

The diagnosis never learns which scenario was injected: `lab break` records its state in
the lab's private directory, which nothing in the tracer reads. The verdict comes from the
trace and the evidence the nodes show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.lab_fixture import private_lab
from tests.unit.test_engine import _paths as paths
from tracer import analysis, tracefile
from tracer.node import prober
from tracer.runs import capture
from tests.conftest import subprocess_env, todays_share

ROOT = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("PODTRACE_TEST_LAB_PREFIX", "pttest") + "dg"

# scenario, flow args, where the failure shows (direction), node, cause, reason (None: any)
CASES = [
    ("netpol-drop", ["pod-1-1", "pod-2-1"], "request", "node-2", "netfilter-rule", "NETFILTER_DROP"),
    ("ip-forward-off", ["pod-1-1", "pod-2-1"], "request", "node-1", "ip-forward-off", None),
    ("conntrack-full", ["pod-1-1", "pod-2-1"], "request", "node-1", "conntrack-full", "NETFILTER_DROP"),
    ("conntrack-invalid", ["pod-1-1", "pod-2-1", "--proto", "tcp", "--port", "8080"], "reply", "node-1",
     "conntrack-invalid", "NETFILTER_DROP"),
    ("rp-filter-strict", ["pod-1-1", "pod-2-1"], "request", "node-2", "rp-filter", "IP_RPFILTER"),
    ("mtu-blackhole", ["pod-1-1", "pod-2-1", "--size", "1450"], "request", "node-1", "mtu", None),
    ("no-route", ["pod-1-1", "pod-2-1"], "request", "node-1", "no-route", None),
    ("fdb-missing", ["pod-1-1", "pod-2-1"], "request", "node-1", "fdb-missing", None),
    ("neigh-wrong", ["pod-1-1", "pod-2-1"], "request", "node-1", "neighbour-wrong", None),
    ("svc-no-endpoints", ["pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80"], "request",
     "node-1", "service-no-endpoints", "NETFILTER_DROP"),
    ("stale-udp-conntrack", ["pod-1-1", "svc/default/web", "--proto", "udp", "--port", "80",
                             "--sport", "40000", "--count", "1"], "request", None, "stale-conntrack", None),
    ("br-netfilter-off", ["pod-2-1", "svc/default/web", "--proto", "udp", "--port", "80"], "reply",
     "node-2", "unreversed-reply", None),
    ("link-down", ["pod-1-1", "pod-2-1"], "request", "node-2", "link-down", None),
    ("nft-native-drop", ["pod-1-1", "pod-2-1"], "request", "node-2", "netfilter-rule", "NETFILTER_DROP"),
    ("overlay-input-drop", ["pod-1-1", "pod-2-1"], "request", "node-2", "netfilter-rule", "NETFILTER_DROP"),
    ("pod-input-drop", ["pod-1-1", "pod-2-1"], "request", "node-2", "netfilter-rule", "NETFILTER_DROP"),
    ("pod-mac-wrong", ["pod-1-1", "pod-2-1"], "request", "node-2", "wrong-mac", "OTHERHOST"),
    # the bare IP of a pod whose address is gone: traced on the node owning its pod CIDR
    ("pod-ip-gone", ["pod-1-1", "10.244.2.3"], "request", "node-2", "neighbour-missing", None),
    ("routing-loop", ["pod-1-1", "10.244.99.5"], "request", None, "routing-loop", None),
    ("icmp-prohibited", ["pod-1-1", "pod-2-1", "--proto", "udp", "--port", "8080"], "request", "node-2",
     "netfilter-rule", "NETFILTER_DROP"),
    # nothing leaves the source pod: the probes' source verdicts name the cause (test_source_scenario)
    ("pod-no-route", ["pod-1-1", "pod-2-1"], "source", "node-1", "no-route", "ENETUNREACH"),
    ("pod-pmtu", ["pod-1-1", "pod-2-1", "--size", "1400"], "source", "node-1", "mtu", "EMSGSIZE"),
    ("pod-gw-neigh", ["pod-1-1", "pod-2-1"], "source", "node-1", "neighbour-missing", None),
    ("hostport-unreversed", ["pod-2-2", "172.30.0.12", "--proto", "udp", "--port", "30080"], "reply",
     "node-2", "unreversed-reply", None),
]
# What a scenario's flow says once fixed, when not "exit 0": the unused CIDR of routing-loop
# has no route anywhere then.
AFTER_FIX = {"routing-loop": "no-route"}
# What the flow's problem lines say, beyond the verdict.
PROBLEM = {"routing-loop": "time exceeded (ICMP 11/0) from ",
           "icmp-prohibited": "administratively prohibited (ICMP 3/13) from "}
# After `fix`, a scenario whose flow goes through what the break added (a hostPort) is
# checked on the path that stays: the application itself.
AFTER_FIX_ARGS = {"hostport-unreversed": ["pod-2-2", "pod-2-1", "--proto", "udp", "--port", "8080"]}


@pytest.fixture(scope="module")
def dlab():
    with private_lab(PREFIX) as doc:
        yield doc


def cli(*args, timeout=90, mode=None):
    env = subprocess_env(PODTRACE_LAB_PREFIX=PREFIX)
    if mode:
        env["PODTRACE_FLOW_MODE"] = mode
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


VERDICT = ["direction", "seq", "status", "node", "dev", "point", "reason", "location", "cause", "hint", "runbook"]


def live_verdicts(doc: dict) -> list[tuple]:
    return [tuple(p[k] if k in ("direction", "seq") else p["verdict"].get(k) for k in VERDICT)
            for p in doc["packets"]]


def offline_verdicts(path) -> list[tuple]:
    t = analysis.load(path)
    rows = t.packets[VERDICT].astype(object)
    return [tuple(r) for r in rows.where(rows.notna(), None).itertuples(index=False)]


def live_packets(doc: dict) -> list[dict]:
    """The live packets without the hop names (those come from the inventory, not the trace)."""
    return [{**p, "hops": [{k: v for k, v in h.items() if k not in ("src_is", "dst_is")} for h in p["hops"]]}
            for p in doc["packets"]]


def saved_packets(path) -> list[dict]:
    events, meta = tracefile.load(path)
    return [p.as_json() for p in analysis.reconstruct(events, meta)]


# The suite's time is bounded (20 minutes on 2 vCPUs): a fifth of the scenarios each day, in
# turn (tests/conftest.py todays_share), as the healthy soak rotates its flows.
TODAY = todays_share([c for c in CASES if c[2] != "source"], 5)


@pytest.mark.parametrize("scenario,args,direction,node,cause,reason", TODAY, ids=[c[0] for c in TODAY])
def test_scenario(dlab, scenario, args, direction, node, cause, reason, tmp_path):
    extra = ["--timeout", "0.6"]
    saved = tmp_path / "flow.parquet"
    broke = cli("lab", "break", scenario)
    assert broke.returncode == 0, broke.stderr
    try:
        # the failure through the agents, as on a cluster (facts asked from each node's agent)
        res = cli("flow", *args, *extra, "-o", "json", "--save", str(saved), mode="agents")
        assert res.returncode == 3, res.stdout[-2000:] + res.stderr
        doc = json.loads(res.stdout)
        # the saved trace, judged offline, says what the live run said, packet by packet
        assert offline_verdicts(saved) == live_verdicts(doc)
        # whole packets too: hops, NAT changes, verdicts with their evidence
        assert saved_packets(saved) == live_packets(doc)
        # and the engine's fast path finds each of these packets with the same hops and verdict
        per_packet = paths(analysis.load(saved))
        assert per_packet and paths(analysis.load(saved, mode="capture"), set(per_packet)) == per_packet
        assert doc["verdict"]["status"] == "failed"
        caused = [p for p in doc["packets"] if p["direction"] == direction and p["verdict"].get("cause")]
        assert caused, json.dumps([p["verdict"] for p in doc["packets"]], indent=1)
        v = caused[0]["verdict"]
        assert v["cause"] == cause, v
        if node:
            assert v["node"] == node, v
        if reason:
            assert v["reason"] == reason, v
        assert v["hint"] and "\n" not in v["hint"]
        assert v["runbook"] and (ROOT / v["runbook"]).is_file(), v["runbook"]
        if scenario in PROBLEM:
            assert any(PROBLEM[scenario] in line for line in doc["verdict"]["problems"]), doc["verdict"]
    finally:
        fixed = cli("lab", "fix", scenario)
        assert fixed.returncode == 0, fixed.stderr
    # after the fix, in one process (the agents path was checked above; half the start-up)
    res = cli("flow", *AFTER_FIX_ARGS.get(scenario, args), "-o", "json", mode="single")
    if scenario in AFTER_FIX:
        assert res.returncode == 3, res.stdout[-2000:] + res.stderr
        causes = {p["verdict"].get("cause") for p in json.loads(res.stdout)["packets"]}
        assert causes == {AFTER_FIX[scenario]}, causes
        return
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr


def test_capture_drops_live_equal_analyze(dlab, tmp_path):
    """A capture of a drop fault counts, while it runs, the drops `analyze` finds in its file."""
    src = next(p for p in dlab["pods"] if p["name"] == "pod-1-1")
    dst = next(p for p in dlab["pods"] if p["name"] == "pod-2-1")
    near = next(p for p in dlab["pods"] if p["name"] == "pod-1-2")
    broke = cli("lab", "break", "netpol-drop")
    assert broke.returncode == 0, broke.stderr
    tracing = threading.Event()

    def send():
        if tracing.wait(60):
            # answered pings: the kernel frees each echo reply in the client after delivery
            # with NO_SOCKET (the prober's raw socket took a copy): no drop on the way
            prober.send(src["netns"], src["ip"], near["ip"], "icmp", None, 6, 0.2, 0.05)
            prober.send(src["netns"], src["ip"], dst["ip"], "icmp", None, 6, 0.2, 0.05)
            prober.send(src["netns"], src["ip"], dst["ip"], "udp", 8080, 6, 0.2, 0.05)
    th = threading.Thread(target=send, daemon=True)
    th.start()
    try:
        cfg = capture.CaptureConfig(capture.Selection(), str(tmp_path / "cap.parquet"),
                                    duration=4.0, lab_prefix=PREFIX)
        res = capture.run_capture(cfg, progress=lambda d: tracing.set())
    finally:
        tracing.set()
        th.join(timeout=60)
        fixed = cli("lab", "fix", "netpol-drop")
        assert fixed.returncode == 0, fixed.stderr
    t = analysis.load(res.path)
    assert 10 <= res.drops == t.summary()["dropped"], (res, t.drops)
    assert t.summary()["delivered"] >= 12    # the answered pings, there and back
    hit = t.drops[(t.drops["reason"] == "NETFILTER_DROP") & (t.drops["node"] == "node-2")]
    assert int(hit["count"].sum()) >= 10, t.drops


SOURCE_CASES = todays_share([c for c in CASES if c[2] == "source"], 5)     # a fifth each day, as above


@pytest.mark.parametrize("scenario,args,direction,node,cause,errno", SOURCE_CASES, ids=[c[0] for c in SOURCE_CASES])
def test_source_scenario(dlab, scenario, args, direction, node, cause, errno, tmp_path):
    """A probe that never left its pod: both live modes name the cause at the source (from the
    pod's own route, MTU, neighbour entry and send error), and the saved trace carries the
    pod's facts, so the same verdict is given offline."""
    from tracer.reconstruct import verdict as verdicts
    from tracer.reconstruct.evidence import Evidence

    saved = tmp_path / "flow.parquet"
    broke = cli("lab", "break", scenario)
    assert broke.returncode == 0, broke.stderr
    try:
        for mode in ("agents", "single"):
            more = ["--save", str(saved)] if mode == "agents" else []
            res = cli("flow", *args, "--timeout", "0.6", "--count", "2", "-o", "json", *more, mode=mode)
            assert res.returncode == 3, res.stdout[-2000:] + res.stderr
            doc = json.loads(res.stdout)
            assert doc["verdict"]["status"] == "failed"
            for pr in doc["probes"]:
                src = pr.get("source")
                assert src and src["status"] == "never-left", (mode, pr)
                assert (src["cause"], src["node"], src["pod"]) == (cause, node, "default/pod-1-1"), (mode, src)
                if errno:
                    assert src["errno"] == errno, (mode, src)
                assert src["runbook"] and (ROOT / src["runbook"]).is_file()
                assert f"probe {pr['seq']}: never left pod-1-1: pod-1-1 " in " | ".join(doc["verdict"]["problems"])
            assert not any("never seen by the tracer" in p for p in doc["verdict"]["problems"])
            if mode == "agents":
                live = doc
        # offline: the saved evidence holds the pod's facts; the same rules give the same lines
        events, meta = tracefile.load(saved)
        fi = analysis._flow_input(meta)
        packets = analysis.reconstruct(events, meta)
        again, _ = verdicts.flow_verdict(packets, fi, True, Evidence.from_json(meta["evidence"]))
        assert list(again.problems) == live["verdict"]["problems"]
    finally:
        fixed = cli("lab", "fix", scenario)
        assert fixed.returncode == 0, fixed.stderr
    res = cli("flow", *args, "-o", "json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr


@pytest.mark.parametrize("mode", ["agents", "single"])
def test_hostport_healthy(dlab, mode):
    """The hostPort DNAT with nothing broken is no failure: from another node (routed, so
    reverse-NATed even with bridge-nf-call-iptables=0), and from the same node once
    bridge-nf-call-iptables is 1 again. The request is delivered at the DNAT target."""
    from tracer.lab.scenarios import changes
    node2 = next(n for n in dlab["nodes"] if n["name"] == "node-2")
    args = ["--proto", "udp", "--port", "30080", "--timeout", "0.6", "-o", "json"]
    broke = cli("lab", "break", "hostport-unreversed")
    assert broke.returncode == 0, broke.stderr
    try:
        for client in ("pod-1-1", "pod-2-2"):
            if client == "pod-2-2":
                changes.write_sysctl(node2["netns"], "net/bridge/bridge-nf-call-iptables", "1")
            res = cli("flow", client, node2["ip"], *args, mode=mode)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr
            doc = json.loads(res.stdout)
            reqs = [p for p in doc["packets"] if p["direction"] == "request"]
            reps = [p for p in doc["packets"] if p["direction"] == "reply"]
            assert reqs and all(p["verdict"]["status"] == "delivered" and p["hops"][-1]["pod"] == "default/pod-2-1"
                                for p in reqs), [p["verdict"] for p in reqs]
            assert reps and all(p["verdict"]["status"] == "delivered" and not p["verdict"].get("cause")
                                for p in reps)
    finally:
        fixed = cli("lab", "fix", "hostport-unreversed")
        assert fixed.returncode == 0, fixed.stderr
