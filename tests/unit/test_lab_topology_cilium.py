"""The cilium lab flavour, planned without privileges: names, addresses, the status document,
the kernel objects `lab up --cni cilium` will create, iptables, inventory, scenarios."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re

import pytest
from kubernetes.client import ApiClient

from tracer.errors import BadInput
from tracer.lab import cilium, scenarios
from tracer.lab import topology as T

KINDS = {"Node": "V1Node", "Pod": "V1Pod", "Service": "V1Service",
         "EndpointSlice": "V1EndpointSlice"}


def _topo(cni="cilium", **kw):
    kw.setdefault("prefix", "ptlab")
    kw.setdefault("state_dir", "/run/podtrace")
    return T.plan(T.LabConfig(cni=cni, **kw), created_at="2024-01-02T03:04:05Z")


def test_cilium_is_built_and_unknown_cnis_are_bad_input():
    assert T.LabConfig(cni="cilium", prefix="ptlab").cni == "cilium"
    with pytest.raises(BadInput) as err:
        T.LabConfig(cni="weave", prefix="ptlab")
    assert "unknown CNI" in err.value.line() and err.value.exit_code == 2


def test_same_cluster_shape_as_flannel():
    """Only the CNI changes: nodes, pod CIDRs, pod IPs, namespaces and Services match."""
    cil, fl = _topo(), _topo("flannel")
    assert cil.namespaces == fl.namespaces
    for a, b in zip(cil.nodes, fl.nodes):
        assert (a.name, a.netns, a.ip, a.pod_cidr, a.uplink_mac, a.fabric_port) == \
            (b.name, b.netns, b.ip, b.pod_cidr, b.uplink_mac, b.fabric_port)
    for a, b in zip(cil.pods, fl.pods):
        assert (a.name, a.node, a.netns, a.ip, a.mac, a.gateway) == (b.name, b.node, b.netns, b.ip, b.mac, b.gateway)
    assert T.iptables_rules(cil).split("*filter")[0] == T.iptables_rules(fl).split("*filter")[0]


def test_router_ip_lxc_names_and_macs():
    topo = _topo()
    n2 = topo.nodes[1]
    assert (n2.router_ip, n2.gateway, n2.overlay_ip, n2.mac) == \
        ("10.244.2.1", "10.244.2.1", "10.244.2.1", "0e:c1:00:00:00:02")
    p = topo.pods[3]
    assert (p.name, p.ip, p.gateway) == ("pod-2-2", "10.244.2.3", "10.244.2.1")
    # Cilium's Endpoint2IfName: "lxc" + sha256 hex, cut to IFNAMSIZ - 1 = 15 characters.
    assert p.host_veth == "lxc" + hashlib.sha256(b"default/pod-2-2").hexdigest()[:12]
    assert len(p.host_veth) == 15
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", p.host_mac)


def test_names_unique_and_valid_at_max_size():
    topo = _topo(nodes=16, pods_per_node=8)
    pods, nodes = topo.pods, topo.nodes
    for values in ([p.host_veth for p in pods], [p.host_mac for p in pods], [p.mac for p in pods],
                   [p.ip for p in pods], [n.mac for n in nodes], [n.router_ip for n in nodes],
                   [n.bridge_mac for n in nodes]):
        assert len(values) == len(set(values))
    for p in pods:
        assert len(p.host_veth) <= 15 and re.fullmatch(r"lxc[0-9a-f]{12}", p.host_veth)
        assert ipaddress.ip_address(p.ip) in ipaddress.ip_network(nodes[p.node_index - 1].pod_cidr)
        assert p.ip != nodes[p.node_index - 1].router_ip


def test_status_document_names_the_cilium_devices():
    doc = T.status_document(_topo(), {"default/pod-1-1": 4242})
    assert doc["cni"] == "cilium"
    assert doc["vxlan"] == {"vni": T.CILIUM_VNI, "port": 8472}
    assert doc["host_routes"] == {"table": T.CILIUM_HOST_TABLE, "rule_pref": T.CILIUM_RULE_PREF}
    for n in doc["nodes"]:
        assert (n["bridge"], n["overlay"], n["uplink"], n["cilium_host"], n["cilium_net"]) == \
            ("cilium_host", "cilium_vxlan", "eth0", "cilium_host", "cilium_net")
        assert n["router_ip"] == n["gateway"] == n["overlay_ip"] == f"10.244.{n['index']}.1"
        # Everything the scenarios' view of a lab reads is there.
        assert {"name", "index", "netns", "ip", "pod_cidr", "mac", "fabric_port"} <= n.keys()
    for p in doc["pods"]:
        assert p["host_veth"].startswith("lxc") and p["host_mac"] and p["gateway"].endswith(".1")
    assert doc["pods"][0]["responder_pid"] == 4242
    flannel = T.status_document(_topo("flannel"))
    assert doc["services"] == flannel["services"]
    assert json.loads(json.dumps(doc)) == doc
    view = scenarios.Lab(doc)
    assert view.node("node-2").overlay_ip == "10.244.2.1"


def test_node_batch_has_no_bridge_and_cilium_routes():
    topo = _topo(nodes=3)
    n1 = topo.nodes[0]
    lines = cilium.node_batch(topo, n1)
    text = "\n".join(lines)
    assert "bridge" not in text and "master" not in text and "cni0" not in text
    assert "link add cilium_host address 0a:58:0a:f4:01:01 type veth peer name cilium_net " \
           "address 0a:58:0a:f4:01:01" in lines
    assert "link set cilium_host arp off" in lines
    assert "addr add 10.244.1.1/32 dev cilium_host scope link" in lines
    assert ("link add cilium_vxlan address 0e:c1:00:00:00:01 mtu 1450 type vxlan id 256 "
            "dstport 8472 local 172.30.0.11 dev eth0 nolearning") in lines
    for p in topo.pods_on(1):
        assert f"route add {p.ip}/32 dev {p.host_veth} scope link" in lines
        assert f"neigh add {p.ip} lladdr {p.mac} dev {p.host_veth} nud permanent" in lines
        assert any(line.startswith(f"link add {p.host_veth} address {p.host_mac} ") and
                   f"peer name eth0 address {p.mac}" in line and f"netns {p.netns}" in line
                   for line in lines)
    for k in topo.nodes[1:]:
        assert f"route add {k.pod_cidr} via {k.router_ip} dev cilium_vxlan onlink src 10.244.1.1" in lines
        assert f"neigh add {k.router_ip} lladdr {k.mac} dev cilium_vxlan nud permanent" in lines
        assert (f"route add {k.pod_cidr} via 10.244.1.1 dev cilium_host src 10.244.1.1 mtu 1450 "
                f"table {T.CILIUM_HOST_TABLE}") in lines
    assert lines[-1] == f"rule add pref {T.CILIUM_RULE_PREF} iif lo to 10.244.0.0/16 lookup {T.CILIUM_HOST_TABLE}"
    assert cilium.fdb_batch(topo, n1) == [
        "fdb append 0e:c1:00:00:00:02 dev cilium_vxlan dst 172.30.0.12",
        "fdb append 0e:c1:00:00:00:03 dev cilium_vxlan dst 172.30.0.13"]
    sysctls = cilium.node_sysctls_after(topo, n1)
    assert sysctls["net/ipv4/conf/cilium_net/accept_local"] == "1"
    for dev in ["cilium_host", "cilium_net", "cilium_vxlan", *(p.host_veth for p in topo.pods_on(1))]:
        assert sysctls[f"net/ipv4/conf/{dev}/rp_filter"] == "0"


def test_pod_batch_is_cilium_cnis():
    p = _topo().pods[0]
    assert cilium.pod_batch(p) == [
        "link set lo up", "addr add 10.244.1.2/32 dev eth0", "link set eth0 up",
        "route add 10.244.1.1/32 dev eth0 scope link",
        "route add default via 10.244.1.1 dev eth0 mtu 1450"]


def test_iptables_has_kube_proxy_and_ciliums_forward_chain():
    rules = T.iptables_rules(_topo())
    assert "flanneld" not in rules
    filt = rules.split("*filter\n", 1)[1]
    assert filt.startswith(":CILIUM_FORWARD - [0:0]\n"
                           '-A FORWARD -m comment --comment "cilium-feeder: CILIUM_FORWARD" -j CILIUM_FORWARD\n')
    for match in ("-o cilium_host", "-i cilium_host", "-i lxc+", "-i cilium_net", "-o lxc+"):
        assert re.search(rf"-A CILIUM_FORWARD {re.escape(match)} -m comment --comment \"cilium: [^\"]+\" -j ACCEPT",
                         filt), match
    assert filt.endswith("COMMIT\n") and rules.count("COMMIT") == 2
    assert "-j DNAT --to-destination 10.244.2.3:8080" in rules


def test_inventory_carries_cilium_node_annotations_and_deserializes():
    inv = T.inventory(_topo())
    api = ApiClient()
    for item in inv["items"]:
        api._ApiClient__deserialize(item, KINDS[item["kind"]])
    nodes = [i for i in inv["items"] if i["kind"] == "Node"]
    for n in nodes:
        ann = n["metadata"]["annotations"]
        assert ann["network.cilium.io/ipv4-cilium-host"] == f"10.244.{n['metadata']['name'][-1]}.1"
        assert ann["network.cilium.io/ipv4-pod-cidr"] == n["spec"]["podCIDR"]
        assert not any(k.startswith("flannel.") for k in ann)
    pods = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Pod"}
    assert pods["pod-2-1"]["metadata"]["annotations"]["podtrace.io/host-veth"].startswith("lxc")


def test_scenarios_that_do_not_apply_are_refused():
    doc = T.status_document(_topo())
    lab = scenarios.Lab(doc)
    refused = {name for name in scenarios.names() if scenarios.unsupported("cilium", name)}
    calico_only = {"felix-policy-drop", "proxy-arp-off", "bgp-route-withdrawn", "ipip-blocked"}
    assert refused == {"br-netfilter-off", "fdb-missing", "neigh-wrong", "hostport-unreversed", "routing-loop",
                       "bpf-policy-drop"} | calico_only
    assert all(scenarios.unsupported("flannel", name) is None for name in scenarios.names()
               if name not in calico_only | {"bpf-policy-drop"})
    for name in refused:
        with pytest.raises(BadInput) as err:
            scenarios.resolve_node(scenarios.get(name), lab, None)
        assert err.value.exit_code == 2
        assert f"{name} does not apply to the cilium lab" in err.value.line()
    rows = {r["name"]: r for r in scenarios.listing(lab)}
    for name, row in rows.items():
        if name in refused:
            assert row["flow"] is None and row["nodes"] == [] and row["default_node"] is None
        else:
            assert row["flow"].startswith("podtrace flow ")
    assert scenarios.resolve_node(scenarios.get("no-route"), lab, None) == "node-1"
