"""The lab's IPv6 and dual-stack plan: addresses, kube-proxy's ip6tables rules, the status
document and inventory, and which scenarios apply to which family (no privileges)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tracer.errors import BadInput
from tracer.lab import apiobjects, cilium, flannel, scenarios
from tracer.lab import topology as T
from tracer.lab.kubeproxy import endpoint, nat_rules, sep_chain
from tracer.lab.model import ip_mac

STATE = Path("/run/podtrace")


def _plan(family: str, cni: str = "flannel", **kw) -> T.LabPlan:
    return T.plan(T.LabConfig(prefix="v6u", cni=cni, ip_family=family, state_dir=STATE, **kw),
                  created_at="1970-01-01T00:00:00Z")


def test_families_and_bad_input():
    assert T.families("ipv4") == (4,) and T.families("ipv6") == (6,) and T.families("dual") == (4, 6)
    assert T.families(None) == (4,)
    with pytest.raises(BadInput, match="unknown IP family"):
        T.LabConfig(ip_family="ipv5", state_dir=STATE)


@pytest.mark.parametrize("cni", [c for c in T.CNIS if c != "calico"])   # the calico lab is IPv4 only
def test_ipv6_addresses(cni):
    topo = _plan("ipv6", cni, nodes=3)
    for n in topo.nodes:
        i = n.index
        assert n.ip == f"fd00:172:30::{i:x}"
        assert n.pod_cidrs == (f"fd00:10:244:{i:x}::/64",) and n.pod_cidr == n.pod_cidrs[0]
        assert n.gateway == f"fd00:10:244:{i:x}::1" and n.mtu == 1430
    for p in topo.pods:
        assert p.ips == (p.ip,)
        assert ipaddress.ip_address(p.ip) in ipaddress.ip_network(topo.nodes[p.node_index - 1].pod_cidr)
    assert [s.cluster_ips for s in topo.services] == [("fd00:10:96::10",), ("fd00:10:96::20",)]
    macs = [p.mac for p in topo.pods]
    assert len(set(macs)) == len(macs) and all(m.startswith("0a:58:") for m in macs)


@pytest.mark.parametrize("cni", [c for c in T.CNIS if c != "calico"])   # the calico lab is IPv4 only
def test_dual_is_ipv4_first_and_keeps_the_ipv4_lab(cni):
    dual, v4 = _plan("dual", cni), _plan("ipv4", cni)
    for d, p in zip(dual.pods, v4.pods):
        assert d.ip == p.ip and d.mac == p.mac and d.ips[0] == p.ip and ":" in d.ips[1]
    for d, n in zip(dual.nodes, v4.nodes):
        assert (d.ip, d.pod_cidr, d.gateway, d.mtu) == (n.ip, n.pod_cidr, n.gateway, n.mtu)
    assert dual.services[0].cluster_ips == ("10.96.0.10", "fd00:10:96::10")


def test_ip_mac_of_an_ipv6_address():
    assert ip_mac("fd00:10:244:1::2") == "0a:58:00:01:00:02"
    assert ip_mac("10.244.1.2") == "0a:58:0a:f4:01:02"


def test_ipv4_lab_rules_are_unchanged_by_the_family_argument():
    topo = _plan("ipv4")
    assert T.iptables_rules(topo) == T.iptables_rules(topo, 4)
    assert not any("fd00" in line or "--to-destination [" in line for line in nat_rules(topo))


def test_ip6tables_rules_have_kube_proxys_shapes():
    topo = _plan("dual")
    v4, v6 = nat_rules(topo, 4), nat_rules(topo, 6)
    # The same KUBE-SVC chains in both families; KUBE-SEP chains named after "[ip]:port".
    svc4 = {line for line in v4 if line.startswith(":KUBE-SVC-")}
    assert svc4 == {line for line in v6 if line.startswith(":KUBE-SVC-")}
    spn = "default/web:http"
    sep = sep_chain(spn, "TCP", "[fd00:10:244:2::3]:8080")
    assert f":{sep} - [0:0]" in v6
    assert any(f"-A {sep} -p tcp" in line and "--to-destination [fd00:10:244:2::3]:8080" in line
               for line in v6)
    assert any("-d fd00:10:96::10/128 -p tcp" in line for line in v6)
    assert any("! -s fd00:10:244::/56" in line for line in v6)
    assert endpoint("10.244.1.2", 8080) == "10.244.1.2:8080"
    rules6 = T.iptables_rules(topo, 6)
    assert '-A FORWARD -s fd00:10:244::/56 -m comment --comment "flanneld forward" -j ACCEPT' in rules6


def test_status_document_keys():
    doc = T.status_document(_plan("dual"))
    assert doc["ip_family"] == "dual" and doc["ip_families"] == ["ipv4", "ipv6"]
    assert doc["cluster_cidr"] == T.CLUSTER_CIDR and doc["cluster_cidrs"][1] == T.CLUSTER_CIDR6
    for p in doc["pods"]:
        assert p["ip"] == p["ips"][0] and len(p["ips"]) == 2 and len(p["gateways"]) == 2
    for s in doc["services"]:
        assert s["cluster_ip"] == s["cluster_ips"][0] and len(s["cluster_ips"]) == 2
    v4 = T.status_document(_plan("ipv4"))
    assert v4["ip_family"] == "ipv4" and v4["pods"][0]["ips"] == [v4["pods"][0]["ip"]]
    assert v4["underlay_cidr"] == T.UNDERLAY_CIDR


def test_inventory_carries_both_families():
    inv = apiobjects.inventory(_plan("dual"))
    kinds = [i["kind"] for i in inv["items"]]
    assert kinds.count("EndpointSlice") == 4
    names = [i["metadata"]["name"] for i in inv["items"] if i["kind"] == "EndpointSlice"]
    assert len(set(names)) == 4
    v4_names = {i["metadata"]["name"] for i in apiobjects.inventory(_plan("ipv4"))["items"]
                if i["kind"] == "EndpointSlice"}
    assert v4_names <= set(names)   # the IPv4 slices keep their names


def test_batches_add_ipv6_without_dad():
    topo = _plan("ipv6")
    n = topo.nodes[0]
    lines = flannel.node_batch(topo, n)
    assert "addr add fd00:172:30::1/64 dev eth0 nodad" in lines
    assert any("local fd00:172:30::1 dev eth0" in line for line in lines)
    assert "route add fd00:10:244:2::/64 via fd00:10:244:2:: dev flannel.1 onlink" in lines
    assert flannel.fdb_batch(topo, n) == ["fdb append 0e:00:00:00:00:02 dev flannel.1 dst fd00:172:30::2"]
    assert "route add ::/0 via fd00:10:244:1::1 dev eth0" in flannel.pod_batch(topo.pods[0])
    assert flannel.node_sysctls(n)["net/ipv6/conf/all/forwarding"] == "1"
    assert "net/ipv6/conf/all/forwarding" not in flannel.node_sysctls(_plan("ipv4").nodes[0])
    ctopo = _plan("dual", "cilium")
    cl = cilium.node_batch(ctopo, ctopo.nodes[0])
    assert any(line.startswith("neigh add proxy fd00:10:244:1::1 dev lxc") for line in cl)
    assert cilium.node_batch6(ctopo, ctopo.nodes[0]) == [
        f"rule add pref {T.CILIUM_RULE_PREF} iif lo to fd00:10:244::/56 lookup {T.CILIUM_HOST_TABLE}"]


def test_scenario_families():
    v6 = {s.name for s in scenarios.all_scenarios() if 6 in s.families}
    assert v6 == {"netpol-drop", "ip-forward-off", "no-route", "mtu-blackhole", "neigh-wrong"}
    dual = T.LabConfig(prefix="v6u", ip_family="dual", state_dir=STATE)
    lab4, lab6 = scenarios.Lab.planned(dual), scenarios.Lab.planned(dual, 6)
    assert lab4.family == 4 and lab6.family == 6 and lab4.families == (4, 6)
    assert lab6.pod("pod-2-1").ip == "fd00:10:244:2::2" and lab4.pod("pod-2-1").ip == "10.244.2.2"
    assert lab6.node("node-1").pod_cidr == "fd00:10:244:1::/64" and lab6.node("node-1").ip == "172.30.0.11"
    assert lab6.web()["cluster_ip"] == "fd00:10:96::10"
    sc = scenarios.get("conntrack-full")
    with pytest.raises(BadInput, match="does not apply to IPv6 targets"):
        scenarios.resolve_node(sc, lab6, None)
    assert scenarios.resolve_node(scenarios.get("no-route"), lab6, None) == "node-1"
    assert "--ip-family 6" in scenarios.flow_command(scenarios.get("no-route"), lab6)
    assert "--ip-family" not in scenarios.flow_command(scenarios.get("no-route"), lab4)
    rows = {r["name"]: r for r in scenarios.listing(lab6)}
    assert rows["conntrack-full"]["flow"] is None and rows["no-route"]["flow"]
    assert rows["mtu-blackhole"]["families"] == ["ipv4", "ipv6"]
    only6 = scenarios.Lab.planned(T.LabConfig(prefix="v6u", ip_family="ipv6", state_dir=STATE))
    assert only6.pod_mtu == 1430
    assert "--size 1430" in scenarios.flow_command(scenarios.get("mtu-blackhole"), only6)
