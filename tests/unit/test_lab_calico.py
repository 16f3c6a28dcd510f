"""The calico lab's plan: devices, routes and Felix chains per mode (pure, no privileges)."""

from pathlib import Path

import pytest

from tracer.errors import BadInput
from tracer.lab import calico
from tracer.lab import topology as T

STATE = Path("/run/podtrace")


def _plan(mode: str, nodes: int = 2) -> T.LabPlan:
    return T.plan(T.LabConfig(cni="calico", calico_mode=mode, nodes=nodes, prefix="cal", state_dir=STATE),
                  created_at="2024-01-02T03:04:05Z")


def test_cali_names_are_calicos():
    # Calico's VethNameForWorkload: "cali" + sha1("default.pod-1-1")[:11]
    assert calico.cali_name("default", "pod-1-1") == "calia0150fc09e0"
    assert all(len(p.host_veth) == 15 for p in _plan("ipip").pods)


@pytest.mark.parametrize("mode,overlay,mtu", [("ipip", "tunl0", 1480), ("vxlan", "vxlan.calico", 1450),
                                              ("routed", None, 1500)])
def test_each_mode_routes_peer_blocks_its_way(mode, overlay, mtu):
    topo = _plan(mode)
    n1, n2 = topo.nodes
    assert n1.overlay == overlay and n1.mtu == mtu and n1.gateway == "169.254.1.1"
    lines = calico.node_batch(topo, n1)
    peer = {"ipip": f"route add 10.244.2.0/24 via 172.30.0.12 dev tunl0 onlink proto bird",
            "vxlan": "route add 10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink",
            "routed": "route add 10.244.2.0/24 via 172.30.0.12 dev eth0 proto bird"}[mode]
    assert peer in lines
    assert "route add 10.244.1.2/32 dev calia0150fc09e0 scope link" in lines
    assert not any("type bridge" in line for line in lines)
    assert bool(calico.fdb_batch(topo, n1)) == (mode == "vxlan")
    doc = T.status_document(topo)
    assert doc["calico_mode"] == mode and doc["nodes"][0]["overlay"] == overlay
    assert doc["nodes"][0]["bridge"] is None


def test_pods_have_a_32_and_the_link_local_gateway():
    p = _plan("ipip").pods[0]
    assert calico.pod_batch(p) == ["link set lo up", "addr add 10.244.1.2/32 dev eth0", "link set eth0 up",
                                   "route add 169.254.1.1 dev eth0 scope link",
                                   "route add default via 169.254.1.1 dev eth0"]


def test_proxy_arp_and_felix_chains_per_node():
    topo = _plan("routed")
    n1 = topo.nodes[0]
    sysctls = calico.node_sysctls_after(topo, n1)
    assert sysctls["net/ipv4/conf/calia0150fc09e0/proxy_arp"] == "1"
    rules = calico.node_filter_rules(topo, n1)
    assert "-A cali-to-wl-dispatch -o calia0150fc09e0 -m comment --comment \"cali:to default/pod-1-1\" " \
           "-g cali-tw-calia0150fc09e0" in rules
    assert sum("Drop if no profiles matched" in r for r in rules) == 4   # tw + fw for each of 2 pods
    assert not any("pod-2-1" in r for r in rules)                         # another node's pods


def test_bad_mode_and_family_are_bad_input():
    with pytest.raises(BadInput, match="unknown Calico mode"):
        T.LabConfig(cni="calico", calico_mode="bgp", state_dir=STATE)
    with pytest.raises(BadInput, match="IPv4 only"):
        T.LabConfig(cni="calico", ip_family="dual", state_dir=STATE)
