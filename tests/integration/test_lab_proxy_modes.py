"""`podtrace lab up --proxy nftables|ipvs` on a real kernel: kube-proxy's `kube-proxy`
nftables table programmed on every node, `podtrace flow` to a Service through it (every
hop on both nodes, the DNAT and its conntrack entry), and the Service scenarios diagnosed
with the right cause in that mode; ipvs mode refused with one line where the kernel has
no IPVS.

The lab made here has the prefix `pttestpx` and is removed at the end of the module, also
when a test fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.lab_fixture import node, private_lab, run_cli
from tracer.lab import scenarios
from tracer.node import netns

pytestmark = pytest.mark.integration

PREFIX = "pttestpx"


@pytest.fixture(scope="module")
def nftlab():
    with private_lab(PREFIX, proxy="nftables") as doc:
        yield doc


def _nft(ns: str, *argv: str) -> str:
    return netns.run(ns, "nft", *argv).stdout


def _table(ns: str) -> list[str]:
    """The kube-proxy table without counters, line by line in a stable order."""
    return sorted(line.strip() for line in _nft(ns, "-s", "list", "table", "ip", "kube-proxy").splitlines())


def _flow(*args: str) -> tuple[int, dict]:
    res = run_cli("flow", *args, "-o", "json", prefix=PREFIX)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_kube_proxy_table_replaces_the_iptables_service_chains(nftlab):
    assert nftlab["proxy"] == "nftables"
    for n in nftlab["nodes"]:
        doc = json.loads(_nft(n["netns"], "-j", "list", "table", "ip", "kube-proxy"))["nftables"]
        maps = {x["map"]["name"]: x["map"] for x in doc if "map" in x}
        chains = {x["chain"]["name"]: x["chain"] for x in doc if "chain" in x}
        assert {"service-ips", "no-endpoint-services"} <= set(maps)
        assert len(maps["service-ips"]["elem"]) == 2 * len(nftlab["services"])   # tcp + udp per Service
        assert chains["nat-prerouting"]["hook"] == "prerouting" and chains["filter-forward"]["prio"] == -110
        assert any(c.startswith("service-") and c.endswith("default/web/tcp/http") for c in chains)
        nat = netns.run(n["netns"], "iptables-save", "-t", "nat").stdout
        assert "KUBE-SVC-" not in nat and "KUBE-SERVICES" not in nat
    assert "kube-proxy nftables" in run_cli("lab", "status", prefix=PREFIX).stdout


def test_flow_to_a_service_sees_every_hop_and_the_dnat(nftlab):
    code, out = _flow("pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80", "--count", "1")
    assert code == 0, out["verdict"]
    backend = next(s for s in nftlab["services"] if s["name"] == "web")["backend_ips"][0]
    req = next(p for p in out["packets"] if p["direction"] == "request")
    rep = next(p for p in out["packets"] if p["direction"] == "reply")
    seen = {(h["node"], h["dev"], h["point"]) for h in req["hops"]}
    for hop in [("node-1", "cni0", "rx"), ("node-1", "flannel.1", "tx"), ("node-1", "eth0", "tx"),
                ("node-2", "eth0", "rx"), ("node-2", "flannel.1", "rx"), ("node-2", "cni0", "tx")]:
        assert hop in seen, hop
    assert req["hops"][0]["dst"] == "10.96.0.10" and req["hops"][-1]["dst"] == backend
    dnat = [h for h in req["hops"] if (h.get("ct") or {}).get("nat") == "dnat"]
    assert dnat and dnat[0]["node"] == "node-1"
    assert rep["hops"][-1]["src"] == "10.96.0.10" and rep["verdict"]["status"] == "delivered"


@pytest.mark.parametrize("name,cause", [
    ("svc-no-endpoints", "service-no-endpoints"),
    ("stale-udp-conntrack", "stale-conntrack"),
    ("br-netfilter-off", "unreversed-reply"),
    ("netpol-drop", "netfilter-rule"),
])
def test_service_scenarios_in_nftables_mode(nftlab, name, cause):
    ns = node(nftlab, "node-1")["netns"]
    table = _table(ns)
    out = scenarios.break_scenario(name, prefix=PREFIX)
    try:
        assert out.show.startswith("podtrace flow ")
        code, res = _flow(*out.show.split()[2:-2])     # without "podtrace flow" and "--prefix X"
        assert code == 3, res["verdict"]
        causes = {p["verdict"].get("cause") for p in res["packets"]}
        assert cause in causes, res["verdict"]
        if name == "svc-no-endpoints":
            p = next(p for p in res["packets"] if p["verdict"].get("cause") == cause)
            assert "default/web has no endpoints" in p["verdict"]["hint"]
            assert "kube-proxy/reject-chain" in p["verdict"]["hint"]
    finally:
        scenarios.fix_scenario(name, prefix=PREFIX)
    assert _table(ns) == table


def test_ipvs_mode_needs_a_kernel_with_ipvs(tmp_path):
    subprocess.run(["modprobe", "ip_vs"], capture_output=True)
    res = run_cli("lab", "up", "--proxy", "ipvs", prefix="pttestpx2")
    try:
        if Path("/proc/net/ip_vs").exists():
            assert res.returncode == 0, res.stderr
            vs = netns.run("pttestpx2-node-1", "ipvsadm", "-Ln").stdout
            assert "10.96.0.10:80 rr" in vs and "Masq" in vs
        else:
            assert res.returncode == 1
            assert "this kernel has no IPVS" in res.stderr and "--proxy nftables" in res.stderr
            assert not [n for n in netns.list_names() if n.startswith("pttestpx2-")]
    finally:
        run_cli("lab", "down", prefix="pttestpx2")
