"""`podtrace flow` on the lab: real BPF programs in the real kernel, real probes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from tests.integration.lab_fixture import lab  # noqa: F401  (session fixture)
from tracer.node import netns
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tracer" / "schema" / "flow.schema.json").read_text())


def our_programs() -> list[str]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True)
    return [p.get("name", "") for p in json.loads(out.stdout or "[]") if p.get("name", "").startswith("pt_")]


def wait_no_programs(seconds: float = 5) -> None:
    """The kernel frees a program after its last reference goes (asynchronously, via RCU)."""
    deadline = time.monotonic() + seconds
    while our_programs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert our_programs() == []


def cli(lab, *args, timeout=60) -> subprocess.CompletedProcess:
    """The command as a user runs it: the product's default mode (one agent per node)."""
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"])
    env.pop("PODTRACE_FLOW_MODE", None)
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def flow(lab, src, dst, mode="agents", **kw):
    """The core flow tests run in the product's default mode, one agent per node; a test
    about something else may ask for the in-process runner."""
    return run_flow(FlowConfig(src=src, dst=dst, lab_prefix=lab["prefix"], mode=mode, **kw))


def pod(lab, name):
    return next(p for p in lab["pods"] if p["name"] == name)


def path_of(packet) -> list[tuple]:
    return [(h.node, h.pod, h.dev, h.encap is not None) for h in packet.hops]


def is_subsequence(want, have) -> bool:
    it = iter(have)
    return all(any(w == h for h in it) for w in want)


def cross_node_path(lab, a, b):
    pa, pb = pod(lab, a), pod(lab, b)
    ka, kb = f"default/{a}", f"default/{b}"
    return [
        (pa["node"], ka, "eth0", False),
        (pa["node"], None, pa["host_veth"], False),
        (pa["node"], None, "cni0", False),
        (pa["node"], None, "flannel.1", False),
        (pa["node"], None, "eth0", True),
        (pb["node"], None, "eth0", True),
        (pb["node"], None, "flannel.1", False),
        (pb["node"], None, "cni0", False),
        (pb["node"], None, pb["host_veth"], False),
        (pb["node"], kb, "eth0", False),
    ]


@pytest.mark.parametrize("mode,proto,port", [("agents", "icmp", None), ("agents", "tcp", 8080),
                                             ("agents", "udp", 8080), ("single", "icmp", None)])
def test_cross_node_every_hop_in_order(lab, mode, proto, port):
    r = flow(lab, "pod-1-1", "pod-2-1", mode=mode, proto=proto, port=port)
    assert r.ok, r.verdict
    want_req = cross_node_path(lab, "pod-1-1", "pod-2-1")
    want_rep = cross_node_path(lab, "pod-2-1", "pod-1-1")
    reqs = [p for p in r.packets if p.direction == "request"]
    reps = [p for p in r.packets if p.direction == "reply"]
    assert {p.seq for p in reqs} == {1, 2, 3}
    assert {p.seq for p in reps} == {1, 2, 3}
    for p in reqs:
        assert is_subsequence(want_req, path_of(p)), path_of(p)
        assert p.verdict.status == "delivered"
        assert p.verdict.node == "node-2"
        # the encapsulated segment carries the node addresses and VNI 1
        enc = [h.encap for h in p.hops if h.encap]
        assert enc and all(e.vni == 1 for e in enc)
        assert enc[0].src == next(n["ip"] for n in lab["nodes"] if n["name"] == "node-1")
        # time moves forward along the path
        ts = [h.t_ns for h in p.hops]
        assert ts == sorted(ts) and ts[0] == 0
    for p in reps:
        assert is_subsequence(want_rep, path_of(p)), path_of(p)
        assert p.verdict.status == "delivered"
    assert r.summary["answered"] == 3
    assert r.counters["lost"] == 0


def test_same_node(lab):
    r = flow(lab, "pod-1-1", "pod-1-2")
    assert r.ok, r.verdict
    a, b = pod(lab, "pod-1-1"), pod(lab, "pod-1-2")
    req = next(p for p in r.packets if p.direction == "request")
    want = [("node-1", "default/pod-1-1", "eth0", False), ("node-1", None, a["host_veth"], False),
            ("node-1", None, b["host_veth"], False), ("node-1", "default/pod-1-2", "eth0", False)]
    assert is_subsequence(want, path_of(req))
    assert not any(h.dev == "flannel.1" for h in req.hops)


def test_service_dnat_and_reply_from_vip(lab, tmp_path):
    web = next(s for s in lab["services"] if s["name"] == "web")
    backend_ip = web["backend_ips"][0]
    saved = tmp_path / "svc.parquet"
    r = flow(lab, "pod-1-1", "svc/default/web", proto="tcp", port=80, save=str(saved))
    assert r.ok, r.verdict
    # TCP flags (tcpdump's letters): each request is the SYN, its reply the SYN-ACK, at every hop
    assert {(p.direction, p.tcp_flags) for p in r.packets} == {("request", "S"), ("reply", "S.")}
    assert all({h.tcp_flags for h in p.hops} == {p.tcp_flags} for p in r.packets)
    _saved_flags_as_live(saved, r.packets)
    for p in r.packets:
        if p.direction == "request":
            dnat = [n for n in p.nat if n.type == "dnat"]
            assert dnat and dnat[0].backend == backend_ip and dnat[0].node == "node-1"
            assert p.hops[0].dst == web["cluster_ip"] and p.hops[-1].dst == backend_ip
            assert p.verdict.node == lab["nodes"][-1]["name"]
        else:
            assert p.hops[0].src == backend_ip
            assert p.hops[-1].src == web["cluster_ip"], "the reply must reach the client from the VIP"
    assert all(pr.reply_from == web["cluster_ip"] for pr in r.probes)


def _saved_flags_as_live(saved, packets) -> None:
    """The saved flow's analysis (frames and `analyze`) shows the flags the live run showed."""
    from tracer import analysis

    t = analysis.load(str(saved))
    assert t.packets.sort_values("first_ts_ns")["tcp_flags"].astype(str).tolist() == \
        [p.tcp_flags for p in sorted(packets, key=lambda p: p.first_ts_ns)]
    assert set(t.hops["tcp_flags"].astype(str)) == {"S", "S."}
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "analyze", str(saved)], capture_output=True,
                         text=True, env=subprocess_env(), timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "[S][S.]" in out.stdout, out.stdout + out.stderr


def test_forward_drop_then_fixed(lab):
    src = pod(lab, "pod-1-1")
    node2 = next(n for n in lab["nodes"] if n["name"] == "node-2")
    rule = ["FORWARD", "-s", src["ip"], "-j", "DROP"]
    netns.run(node2["netns"], "iptables", "-I", *rule)
    try:
        res = cli(lab, "flow", "pod-1-1", "pod-2-1", "--count", "2", "--timeout", "0.5", "-o", "json")
        assert res.returncode == 3, res.stderr
        doc = json.loads(res.stdout)
        jsonschema.validate(doc, SCHEMA)
        assert doc["verdict"]["status"] == "failed"
        reqs = [p for p in doc["packets"] if p["direction"] == "request"]
        assert reqs and all(p["verdict"]["status"] == "dropped" for p in reqs)
        v = reqs[0]["verdict"]
        assert v["node"] == "node-2" and v["reason"] == "NETFILTER_DROP"
        assert v["runbook"].startswith("docs/runbooks/") and (ROOT / v["runbook"]).exists()
    finally:
        netns.run(node2["netns"], "iptables", "-D", *rule)
    res = cli(lab, "flow", "pod-1-1", "pod-2-1", "--count", "2", "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["verdict"]["status"] == "ok"


def test_json_output_follows_schema(lab):
    res = cli(lab, "flow", "default/pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["dst"]["service"] == "default/web" and doc["probe"] == {"proto": "tcp", "port": 80, "count": 3}
    assert {(p["direction"], p["tcp_flags"], h["tcp_flags"]) for p in doc["packets"] for h in p["hops"]} == \
        {("request", "S", "S"), ("reply", "S.", "S.")}
    wait_no_programs()


def test_table_output_and_exit_zero(lab):
    res = cli(lab, "flow", "pod-1-1", "pod-2-2")
    assert res.returncode == 0, res.stderr
    # all well: the compact view, one line per path and no table
    assert "3 requests, 3 replies: same 12-hop path, delivered" in res.stdout, res.stdout
    assert "flannel.1" in res.stdout and "┃" not in res.stdout
    assert len(res.stdout.splitlines()) <= 14, res.stdout
    wide = cli(lab, "flow", "pod-1-1", "pod-2-2", "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    assert "DELIVERED" in wide.stdout and "flannel.1" in wide.stdout and "vxlan" in wide.stdout
    assert wide.stdout.count("┃ node") == 6


def test_tcp_flags_on_the_packet_lines(lab):
    res = cli(lab, "flow", "pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 requests [S] (probes 1, 2, 3)" in res.stdout and "3 replies [S.] (probes 1, 2, 3)" in res.stdout, \
        res.stdout


def test_unknown_pod_exits_2_with_close_matches(lab):
    res = cli(lab, "flow", "pod-1-1", "pod-2-9")
    assert res.returncode == 2
    assert "no pod default/pod-2-9" in res.stderr and "did you mean" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_flags_exit_2(lab):
    assert cli(lab, "flow", "pod-1-1", "pod-2-1", "--proto", "tcp").returncode == 2
    assert cli(lab, "flow", "pod-1-1", "pod-2-1", "--port", "80").returncode == 2
    assert cli(lab, "flow", "pod-1-1", "999.1.1.1").returncode == 2


def test_save_and_load_trace(lab, tmp_path):
    from tracer import analysis

    f = tmp_path / "t.parquet"
    r = flow(lab, "pod-1-1", "pod-2-1", mode="single", save=str(f))
    t = analysis.load(str(f))
    assert len(t.events) == len(r.events)
    assert len(t.packets) == len(r.packets)
    assert set(t.packets["status"]) == {"delivered"}
    assert t.meta["src"]["pod"] == "default/pod-1-1"
    assert t.hops.groupby("packet").size().tolist() == [len(p.hops) for p in r.packets]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_releases_everything(lab, sig):
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"])
    env.pop("PODTRACE_FLOW_MODE", None)      # the product's default mode: agents
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1", "--no-probe",
                             "--duration", "60"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not our_programs():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "tracer never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode != 0
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_no_programs()


def test_no_root_exit_1(lab):
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"])
    res = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                          sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1"],
                         capture_output=True, text=True, env=env, cwd="/")
    assert res.returncode == 1, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
