"""`podtrace lab up --cni calico` on a real kernel, in each mode: proxy ARP for 169.254.1.1,
/32 routes, tunl0 (IP-in-IP), vxlan.calico, routed; `podtrace flow` across nodes and to a
Service; the Calico scenarios end to end.

The ipip lab (prefix `pttestcal`) is built once for the module; the vxlan and routed labs
(`pttestcalv`, `pttestcalr`) once each, inside their test. Every lab is removed at the end of
its scope, also when a test fails.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.lab_fixture import node, pod, private_lab, run_cli, tcp_ask
from tracer.lab import scenarios
from tracer.node import netns

pytestmark = pytest.mark.integration

PREFIX = "pttestcal"


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
