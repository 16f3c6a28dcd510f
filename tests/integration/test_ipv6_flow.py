"""`podtrace flow` over IPv6, end to end: an IPv6-only flannel lab and a dual-stack cilium lab.

- IPv6-only: cross-node ICMPv6/TCP/UDP flows pass every hop on both nodes, at the same hop
  points as an IPv4 flow between the same pods (the flannel path of test_flow.py); a Service
  flow shows the DNAT and conntrack on its hops, and its `-w` trace file (format 3) loads in
  `tracer.analysis` with the same packets; `capture` + `analyze` of IPv6 traffic; every IPv6
  `lab break` scenario fails the flow (exit 3) with its cause on the right node, and the flow
  passes again after `lab fix`.
- Dual-stack: one pod pair, both families (`--ip-family 4|6`): the same hop points; an IPv6
  Service flow; a bare IPv6 address as DST.

Each lab is built once for the module (prefixes `<base>6f`, `<base>dsf`) and always removed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import subprocess_env, todays_share
from tests.integration.lab_fixture import pod, private_lab, service
from tests.integration.test_lab_ipv6 import ping6, tcp6_ask, udp6_ask
from tracer import analysis, tracefile
from tracer.runs import capture

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tracer" / "schema" / "flow.schema.json").read_text())
BASE = os.environ.get("PODTRACE_TEST_LAB_PREFIX", "pttest")
V6 = BASE + "6f"
DUAL = BASE + "dsf"


def cli(prefix, *args, timeout=90):
    env = subprocess_env(PODTRACE_LAB_PREFIX=prefix)
    env.pop("PODTRACE_FLOW_MODE", None)
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def flow_json(prefix, *args, code=0):
    res = cli(prefix, "flow", *args, "-o", "json")
    assert res.returncode == code, res.stdout[-3000:] + res.stderr
    doc = json.loads(res.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def family(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def of_family(addrs, fam: int) -> str:
    return next(a for a in addrs if family(a) == fam)


def points(packet) -> list[tuple]:
    """Where a packet was seen: node, pod, device, hook point, encapsulated — not its addresses."""
    return [(h["node"], h.get("pod"), h["dev"], h.get("point"), h.get("encap") is not None) for h in packet["hops"]]


def flannel_points(lab, a: str, b: str) -> list[tuple]:
    """The hop points of a cross-node flannel packet from pod a to pod b, as IPv4 has them."""
    pa, pb = pod(lab, a), pod(lab, b)
    na, nb = pa["node"], pb["node"]
    fa, fb = "n" + na.split("-")[1], "n" + nb.split("-")[1]
    return [
        (na, f"default/{a}", "eth0", "tx", False),
        (na, None, pa["host_veth"], "rx", False),
        (na, None, "cni0", "rx", False),
        (na, None, "flannel.1", "tx", False),
        (na, None, "eth0", "tx", True),
        (None, None, fa, "rx", True),
        (None, None, fb, "tx", True),
        (nb, None, "eth0", "rx", True),
        (nb, None, "flannel.1", "rx", False),
        (nb, None, "cni0", "tx", False),
        (nb, None, pb["host_veth"], "tx", False),
        (nb, f"default/{b}", "eth0", "rx", False),
    ]


def unflooded(lab, packet, a: str, b: str) -> dict:
    """The packet without the copies a bridge floods to the other pods of a node while it has
    not (re)learnt the destination's MAC (the pods drop them): the same in both families."""
    others = {p["host_veth"] for p in lab["pods"] if p["name"] not in (a, b)}
    keep = {None, f"default/{a}", f"default/{b}"}
    return {**packet, "hops": [h for h in packet["hops"] if h.get("pod") in keep and h["dev"] not in others]}


@pytest.fixture(scope="module")
def v6lab():
    with private_lab(V6, ip_family="ipv6") as doc:
        yield doc


@pytest.fixture(scope="module")
def duallab():
    with private_lab(DUAL, ip_family="dual", cni="cilium") as doc:
        yield doc


# ---------------------------------------------------------------------------------------
# IPv6-only lab

@pytest.mark.parametrize("proto", ["icmp", "tcp", "udp"])
def test_ipv6_cross_node_every_hop(v6lab, proto):
    args = ["pod-1-1", "pod-2-1"] + ([] if proto == "icmp" else ["--proto", proto, "--port", "8080"])
    doc = flow_json(V6, *args)
    assert doc["verdict"]["status"] == "ok", doc["verdict"]
    assert doc["src"]["ip"] == pod(v6lab, "pod-1-1")["ip"] and doc["dst"]["ip"] == pod(v6lab, "pod-2-1")["ip"]
    assert family(doc["src"]["ip"]) == 6
    reqs = [p for p in doc["packets"] if p["direction"] == "request"]
    reps = [p for p in doc["packets"] if p["direction"] == "reply"]
    assert len(reqs) == 3 and len(reps) == 3
    want = "icmpv6" if proto == "icmp" else proto
    for p in reqs + reps:
        assert p["tuple"]["proto"] == want
        assert p["verdict"]["status"] == "delivered", p["verdict"]
        a, b = ("pod-1-1", "pod-2-1") if p["direction"] == "request" else ("pod-2-1", "pod-1-1")
        assert points(unflooded(v6lab, p, a, b)) == flannel_points(v6lab, a, b)
        assert all(family(h["src"]) == 6 and family(h["dst"]) == 6 for h in p["hops"])
        encap = [h["encap"] for h in p["hops"] if h["encap"]]
        assert encap and all(family(e["src"]) == 6 and e["type"] == "vxlan" for e in encap), encap
        assert any(h.get("ct") for h in p["hops"]), "conntrack is seen on the node hops"


def test_ipv6_service_dnat_conntrack_and_trace_file(v6lab, tmp_path):
    web = service(v6lab, "web")
    vip = web["cluster_ip"]
    assert family(vip) == 6 and web["cluster_ips"] == [vip]
    saved = tmp_path / "svc6.parquet"
    doc = flow_json(V6, "pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80", "-w", str(saved))
    assert doc["dst"]["ip"] == vip and doc["dst"]["service"] == "default/web"
    reqs = [p for p in doc["packets"] if p["direction"] == "request"]
    reps = [p for p in doc["packets"] if p["direction"] == "reply"]
    assert reqs and reps
    for p in reqs:
        assert p["hops"][0]["dst"] == vip
        assert p["hops"][-1]["dst"] in web["backend_ips"]
        assert any(n["type"] == "dnat" for n in p["nat"]), p["nat"]
    for p in reps:
        assert p["hops"][-1]["src"] == vip, "the reply reaches the client from the VIP"
    cts = [h["ct"] for p in doc["packets"] for h in p["hops"] if h.get("ct")]
    assert cts and any(c["orig"]["dst"] == vip and c["reply"]["src"] in web["backend_ips"] for c in cts), cts
    # the -w file: format 3, IPv6 addresses as text, the same packets offline
    events, meta = tracefile.load(saved)
    assert meta["format_version"] == tracefile.FORMAT_VERSION == 3
    assert vip in set(events["daddr_str"].astype(str))
    live = [{**p, "hops": [{k: v for k, v in h.items() if k not in ("src_is", "dst_is")} for h in p["hops"]]}
            for p in doc["packets"]]
    assert [p.as_json() for p in analysis.reconstruct(events, meta)] == live
    t = analysis.load(saved)
    assert set(t.packets["status"]) == {"delivered"}


def test_ipv6_capture_and_analyze(v6lab, tmp_path):
    a, b = pod(v6lab, "pod-1-1"), pod(v6lab, "pod-2-1")
    tracing = threading.Event()
    answers = []

    def send():
        if tracing.wait(60):
            for _ in range(3):
                answers.append((ping6(a["netns"], b["ip"]), tcp6_ask(a["netns"], b["ip"], 8080),
                                udp6_ask(a["netns"], b["ip"], 8080)))
    th = threading.Thread(target=send, daemon=True)
    th.start()
    cfg = capture.CaptureConfig(capture.Selection(pods=["pod-1-1"]), str(tmp_path / "cap6.parquet"),
                                duration=3.0, lab_prefix=V6)
    try:
        res = capture.run_capture(cfg, progress=lambda d: tracing.set())
    finally:
        tracing.set()
        th.join(timeout=60)
    assert len(answers) == 3 and all(x[0] == b["ip"] for x in answers), answers
    assert res.events > 0 and res.drops == 0
    t = analysis.load(res.path)
    fl = t.flows
    mine = fl[(fl["src_pod"] == "default/pod-1-1") & (fl["dst_pod"] == "default/pod-2-1")]
    assert {"icmpv6", "tcp", "udp"} <= set(mine["proto"].astype(str)), fl
    assert (mine["delivered"] > 0).all() and (mine["dropped"] == 0).all(), mine
    out = cli(V6, "analyze", str(res.path))
    assert out.returncode == 0, out.stderr
    assert "icmpv6" in out.stdout and "default/pod-2-1:8080" in out.stdout and "no drops" in out.stdout, out.stdout


# IPv6 faults: break → flow fails (exit 3) with the cause on the node → fix → flow passes
V6_CASES = [
    ("netpol-drop", ["pod-1-1", "pod-2-1"], "node-2", "netfilter-rule"),
    ("ip-forward-off", ["pod-1-1", "pod-2-1"], "node-1", "ip-forward-off"),
    ("no-route", ["pod-1-1", "pod-2-1"], "node-1", "no-route"),
    # a full-size packet of the pod: its MTU is 1430 over the IPv6 underlay (VXLAN over IPv6: 70 bytes)
    ("mtu-blackhole", ["pod-1-1", "pod-2-1", "--size", "{pod_mtu}"], "node-1", "mtu"),
    ("neigh-wrong", ["pod-1-1", "pod-2-1"], "node-1", "neighbour-wrong"),
]


# The suite's time is bounded: one of them each day, in turn (tests/conftest.py todays_share).
V6_TODAY = todays_share(V6_CASES, len(V6_CASES))


@pytest.mark.parametrize("scenario,args,node,cause", V6_TODAY, ids=[c[0] for c in V6_TODAY])
def test_ipv6_scenario(v6lab, scenario, args, node, cause):
    args = [a.format(**v6lab) for a in args]
    broke = cli(V6, "lab", "break", scenario)
    assert broke.returncode == 0, broke.stderr
    try:
        doc = flow_json(V6, *args, "--count", "1", "--timeout", "0.6", code=3)
        assert doc["verdict"]["status"] == "failed"
        caused = [p for p in doc["packets"] if p["direction"] == "request" and p["verdict"].get("cause")]
        assert caused, json.dumps([p["verdict"] for p in doc["packets"]], indent=1)
        v = caused[0]["verdict"]
        assert v["cause"] == cause and v["node"] == node, v
        assert v["hint"] and "\n" not in v["hint"]
        assert v["runbook"] and (ROOT / v["runbook"]).is_file(), v["runbook"]
    finally:
        fixed = cli(V6, "lab", "fix", scenario)
        assert fixed.returncode == 0, fixed.stderr
    flow_json(V6, *args, "--count", "1")


def test_ipv6_probe_larger_than_the_pod_mtu(v6lab):
    """A DF probe above the pod's MTU never leaves it: EMSGSIZE, cause mtu at the source."""
    size = v6lab["pod_mtu"] + 20
    doc = flow_json(V6, "pod-1-1", "pod-2-1", "--size", str(size), "--count", "1", "--timeout", "0.6", code=3)
    assert v6lab["pod_mtu"] == 1430
    for pr in doc["probes"]:
        src = pr["source"]
        assert src["status"] == "never-left" and src["errno"] == "EMSGSIZE", src
        assert src["cause"] == "mtu" and src["node"] == "node-1" and src["runbook"] == "docs/runbooks/mtu.md", src


# ---------------------------------------------------------------------------------------
# Dual-stack lab

def test_dual_stack_same_hop_points_both_families(duallab):
    """One pod pair, both families: the IPv6 flow passes the same hop points as the IPv4 one."""
    src, dst = pod(duallab, "pod-1-1"), pod(duallab, "pod-2-1")
    assert [family(a) for a in src["ips"]] == [4, 6] and src["ip"] == src["ips"][0]
    v4 = flow_json(DUAL, "pod-1-1", "pod-2-1", "--proto", "tcp", "--port", "8080")
    v6 = flow_json(DUAL, "pod-1-1", "pod-2-1", "--proto", "tcp", "--port", "8080", "--ip-family", "6")
    assert v4["dst"]["ip"] == dst["ips"][0] and v6["dst"]["ip"] == of_family(dst["ips"], 6)
    assert v6["src"]["ip"] == of_family(src["ips"], 6)
    for d in ("request", "reply"):
        p4 = [points(p) for p in v4["packets"] if p["direction"] == d]
        p6 = [points(p) for p in v6["packets"] if p["direction"] == d]
        assert len(p4) == len(p6) == 3
        assert p6 == p4
        assert {h[0] for h in p6[0]} >= {"node-1", "node-2"}
    explicit4 = flow_json(DUAL, "pod-1-1", "pod-2-1", "--ip-family", "4")
    assert explicit4["dst"]["ip"] == dst["ips"][0]
    assert {p["tuple"]["proto"] for p in explicit4["packets"]} == {"icmp"}


def test_dual_stack_service_ipv6(duallab):
    web = service(duallab, "web")
    vip6 = of_family(web["cluster_ips"], 6)
    doc = flow_json(DUAL, "pod-1-1", "svc/default/web", "--proto", "udp", "--port", "80", "--ip-family", "6")
    assert doc["dst"]["ip"] == vip6
    reqs = [p for p in doc["packets"] if p["direction"] == "request"]
    assert reqs and all(any(n["type"] == "dnat" for n in p["nat"]) for p in reqs), [p["nat"] for p in reqs]
    assert all(p["hops"][-1]["dst"] in web["backend_ips_by_family"]["ipv6"] for p in reqs)
    cts = [h["ct"] for p in doc["packets"] for h in p["hops"] if h.get("ct")]
    assert any(c["orig"]["dst"] == vip6 for c in cts), cts
    assert all(p["verdict"]["status"] == "delivered" for p in doc["packets"]), [p["verdict"] for p in doc["packets"]]


def test_dual_stack_bare_ipv6_address(duallab):
    dst = pod(duallab, "pod-2-1")
    ip6 = of_family(dst["ips"], 6)
    doc = flow_json(DUAL, "pod-1-1", ip6)
    assert doc["dst"]["pod"] == "default/pod-2-1" and doc["dst"]["ip"] == ip6
    assert family(doc["src"]["ip"]) == 6, "the source takes the family of the address given"
    assert {p["tuple"]["proto"] for p in doc["packets"]} == {"icmpv6"}
    for p in doc["packets"]:
        assert p["verdict"]["status"] == "delivered" and {"node-1", "node-2"} <= {h["node"] for h in p["hops"]}
