"""`podtrace lab up --cni calico` on a real kernel, in each mode: proxy ARP for 169.254.1.1,
/32 routes, tunl0 (IP-in-IP), vxlan.calico, routed; `podtrace flow` across nodes and to a
Service; the Calico scenarios and the generic ones that apply to Calico, end to end.

The ipip lab (prefix `pttestcal`) is built once for the module; the vxlan and routed labs
(`pttestcalv`, `pttestcalr`) once each, inside their test. Every lab is removed at the end of
its scope, also when a test fails.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.integration.lab_fixture import node, pod, private_lab, run_cli, tcp_ask
from tests.integration.test_diagnose_scenarios import CASES as DIAGNOSED
from tests.conftest import todays_share
from tracer.lab import scenarios
from tracer.node import netns

pytestmark = pytest.mark.integration

PREFIX = "pttestcal"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cal():
    with private_lab(PREFIX, cni="calico") as doc:
        yield doc


def _flow_json(prefix: str, *args: str) -> tuple[int, dict, str]:
    res = run_cli("flow", *args, "--count", "1", "-o", "json", prefix=prefix, timeout=120)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {}
    return res.returncode, doc, res.stderr


def _path(packet: dict) -> list[tuple]:
    return [(h["node"], h["dev"], h["point"]) for h in packet["hops"]]


def _cross_node(doc: dict, lab: dict, tunnel: str | None, src: str = "pod-1-1", dst: str = "pod-2-2") -> dict:
    """The request's hops on both nodes, in order, through `tunnel` (None: routed)."""
    s, d = pod(lab, src), pod(lab, dst)
    req = next(p for p in doc["packets"] if p["direction"] == "request")
    assert req["verdict"]["status"] == "delivered"
    mid1 = [("node-1", tunnel, "tx")] if tunnel else []
    mid2 = [("node-2", tunnel, "rx")] if tunnel else []
    want = [("node-1", "eth0", "tx"), ("node-1", s["host_veth"], "rx"), *mid1, ("node-1", "eth0", "tx"),
            ("node-2", "eth0", "rx"), *mid2, ("node-2", d["host_veth"], "tx"), ("node-2", "eth0", "rx")]
    assert [h for h in _path(req) if h[0] != "(fabric)" and h[0] is not None] == want, _path(req)
    return req


def test_pod_datapath_is_calicos(cal):
    p = pod(cal, "pod-1-1")
    routes = netns.run(p["netns"], "ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    # the pod's ARP for 169.254.1.1 is answered by its cali device (proxy ARP)
    assert tcp_ask(p["netns"], pod(cal, "pod-1-2")["ip"], 8080) == "pod-1-2"
    neigh = netns.run(p["netns"], "ip", "neigh", "show", "169.254.1.1").stdout
    assert "ee:ee:ee:ee:ee:ee" in neigh
    n1 = node(cal, "node-1")
    assert n1["bridge"] is None and n1["overlay"] == "tunl0"
    assert "10.244.2.0/24 via 172.30.0.12 dev tunl0 proto bird onlink" in netns.run(n1["netns"], "ip", "route").stdout


def test_flow_ipip_across_nodes_and_to_a_service(cal):
    rc, doc, err = _flow_json(PREFIX, "pod-1-1", "pod-2-2")
    assert rc == 0, err
    req = _cross_node(doc, cal, "tunl0")
    outer = [h for h in req["hops"] if h["node"] == "node-1" and h["dev"] == "eth0" and h["pod"] is None]
    assert outer[0]["encap"]["type"] == "ipip"
    assert (outer[0]["encap"]["src"], outer[0]["encap"]["dst"]) == ("172.30.0.11", "172.30.0.12")
    # inside the tunnel device, the packet is bare
    assert all(h["encap"] is None for h in req["hops"] if h["dev"] == "tunl0")

    rc, doc, err = _flow_json(PREFIX, "pod-1-1", "svc/default/web")
    assert rc == 0, err
    req = next(p for p in doc["packets"] if p["direction"] == "request")
    assert req["hops"][0]["dst"] == "10.96.0.10" and req["hops"][-1]["dst"] == pod(cal, "pod-2-2")["ip"]
    dnat = [n for n in req["nat"] if n["type"].lower() == "dnat"]
    assert dnat and dnat[0]["node"] == "node-1" and dnat[0]["backend"] == pod(cal, "pod-2-2")["ip"], req["nat"]


@pytest.mark.parametrize("mode,prefix,tunnel,proxy", [("vxlan", "pttestcalv", "vxlan.calico", "iptables"),
                                                      ("routed", "pttestcalr", None, "nftables")])
def test_flow_in_the_other_modes(mode, prefix, tunnel, proxy):
    """The routed lab runs kube-proxy in nftables mode: its Service DNAT is checked too."""
    with private_lab(prefix, cni="calico", calico_mode=mode, proxy=proxy) as lab:
        rc, doc, err = _flow_json(prefix, "pod-1-1", "pod-2-2", "--proto", "tcp", "--port", "8080")
        assert rc == 0, err
        req = _cross_node(doc, lab, tunnel)
        outer = [h for h in req["hops"] if h["node"] == "node-1" and h["dev"] == "eth0" and h["pod"] is None][0]
        if mode == "vxlan":
            assert outer["encap"]["type"] == "vxlan" and outer["encap"]["vni"] == 4096
        else:
            assert outer["encap"] is None
        if proxy == "nftables":
            rc, doc, err = _flow_json(prefix, "pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80")
            assert rc == 0, err
            req = next(p for p in doc["packets"] if p["direction"] == "request")
            assert req["hops"][-1]["dst"] == pod(lab, "pod-2-2")["ip"]
            assert [h for h in req["hops"] if (h.get("ct") or {}).get("nat") == "dnat"][0]["node"] == "node-1"
        if mode == "routed":
            _broken(prefix, "bgp-route-withdrawn", "pod-1-1", "pod-2-1",
                    lambda p, v: v["cause"] == "no-route" and v["node"] == "node-1")


def _broken(prefix: str, name: str, src: str, dst: str, check) -> None:
    """Break, trace (exit 3, the packet's verdict as `check` wants), fix."""
    out = scenarios.break_scenario(name, prefix=prefix)
    try:
        assert out.changed
        rc, doc, err = _flow_json(prefix, src, dst)
        assert rc == 3, err
        verdicts = [p["verdict"] for p in doc["packets"]] or [pr for pr in doc.get("probes", [])]
        assert any(check(p, v) for p, v in zip(doc["packets"] or doc.get("probes", []), verdicts)), \
            json.dumps(doc.get("packets") or doc.get("probes"))[:2000]
    finally:
        scenarios.fix_scenario(name, prefix=prefix)


def test_felix_policy_drop(cal):
    _broken(PREFIX, "felix-policy-drop", "pod-1-1", "pod-2-1",
            lambda p, v: v["cause"] == "netfilter-rule" and v["node"] == "node-2"
            and "Drop if no policies passed packet" in v["hint"])


def test_proxy_arp_off(cal):
    _broken(PREFIX, "proxy-arp-off", "pod-1-1", "pod-2-1",
            lambda p, v: "cannot resolve its gateway 169.254.1.1" in json.dumps(v))


def test_ipip_blocked(cal):
    _broken(PREFIX, "ipip-blocked", "pod-1-1", "pod-2-1",
            lambda p, v: v["status"] == "dropped" and "IP protocol 4" in v["hint"])
    assert tcp_ask(pod(cal, "pod-1-1")["netns"], pod(cal, "pod-2-1")["ip"], 8080) == "pod-2-1"


# ---------------------------------------------------------------------------------------
# The generic scenarios that apply to Calico, end to end: the flow the lab itself suggests
# (`lab scenarios -o json`), the same cause as on the flannel lab, the fix restoring service.

# scenario → (direction, node, cause, reason) as on flannel (tests/integration/test_diagnose_scenarios.py)
EXPECTED = {c[0]: c[2:] for c in DIAGNOSED}
# Where Calico's datapath makes the same fault look different, and why.
ON_CALICO: dict[str, tuple] = {}
GENERIC = sorted(n for n in EXPECTED if "calico" in scenarios.applies_to(scenarios.get(n)))
# The suite's time is bounded: a quarter of them each day, in turn (tests/conftest.py
# todays_share), as the healthy soak rotates its flows.
GENERIC = todays_share(GENERIC, 4)


@pytest.fixture(scope="module")
def suggested(cal) -> dict[str, list[str]]:
    """scenario → the arguments of the `podtrace flow` the calico lab suggests for it."""
    res = run_cli("lab", "scenarios", "-o", "json", prefix=PREFIX)
    assert res.returncode == 0, res.stderr
    return {e["name"]: shlex.split(e["flow"])[2:] for e in json.loads(res.stdout) if e.get("flow")}


@pytest.mark.parametrize("name", GENERIC)
def test_generic_scenario_diagnosed(cal, suggested, name):
    direction, node_name, cause, reason = ON_CALICO.get(name, EXPECTED[name])
    assert name in suggested, f"the calico lab suggests no flow for {name}"
    out = run_cli("lab", "break", name, prefix=PREFIX)
    assert out.returncode == 0, out.stderr
    try:
        res = run_cli("flow", *suggested[name], "--timeout", "0.6", "-o", "json", prefix=PREFIX, timeout=120)
        assert res.returncode == 3, res.stdout[-2000:] + res.stderr
        doc = json.loads(res.stdout)
        if direction == "source":
            got = [pr["source"] for pr in doc["probes"] if pr.get("source")]
        else:
            got = [p["verdict"] for p in doc["packets"] if p["direction"] == direction and p["verdict"].get("cause")]
        assert got, json.dumps([p["verdict"] for p in doc["packets"]] or doc["probes"])[:3000]
        v = got[0]
        assert v["cause"] == cause and (node_name is None or v["node"] == node_name), v
        if reason and direction != "source":
            assert v["reason"] == reason, v
        assert v["runbook"] and (ROOT / v["runbook"]).is_file(), v
    finally:
        fixed = run_cli("lab", "fix", name, prefix=PREFIX)
        assert fixed.returncode == 0, fixed.stderr
    assert tcp_ask(pod(cal, "pod-1-1")["netns"], pod(cal, "pod-2-1")["ip"], 8080) == "pod-2-1"
