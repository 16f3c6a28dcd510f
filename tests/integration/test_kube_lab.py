"""Host veth → pod on a real lab: IFLA_LINK + link-netnsid, RTM_GETNSID against the
namespaces of /proc, pod found by its address (the lab has no CRI). Needs root."""

from __future__ import annotations

import os

import pytest

from tracer.cluster import sources
from tracer.lab import view
from tracer.node import pods as nodepods
from tracer.node import netns
from tracer.lab import build
from tracer.lab import topology as T

PREFIX = os.environ.get("PODTRACE_TEST_KUBE_PREFIX", "pttestk8s")


@pytest.fixture(scope="module")
def lab():
    assert PREFIX.startswith("pttestk8s")
    build.down(PREFIX)      # leftovers of a killed run
    try:
        doc, _ = build.up(T.LabConfig(prefix=PREFIX))
        yield doc
    finally:
        build.down(PREFIX)
    assert not [n for n in netns.list_names() if n.startswith(PREFIX + "-")]


def test_every_host_veth_maps_to_its_pod(lab):
    inv = sources.topology_inventory(view.topology(lab))
    for node in lab["nodes"]:
        owners = nodepods.host_veth_owners(inv, node_netns=node["netns"], cri=False)
        pods = [p for p in lab["pods"] if p["node"] == node["name"]]
        for p in pods:
            o = owners[p["host_veth"]]
            assert o.pod == f"{p['namespace']}/{p['name']}", o
            assert o.method == "ip" and o.ips == [p["ip"]]
            assert o.netns_inode == netns.inode(p["netns"])
            assert o.pid == p["responder_pid"] or o.netns_name == p["netns"]
            assert o.peer_ifindex is not None and o.nsid is not None
        # The node's uplink is a veth too, into the fabric: no pod owns it.
        assert owners["eth0"].pod is None and owners["eth0"].netns_name == lab["fabric_netns"]


def test_one_veth_and_netns_inodes(lab):
    inv = sources.topology_inventory(view.topology(lab))
    p = next(p for p in lab["pods"] if p["name"] == "pod-2-1")
    node = next(n for n in lab["nodes"] if n["name"] == p["node"])
    assert nodepods.host_veth_owner(p["host_veth"], inv, node["netns"], cri=False).pod == "default/pod-2-1"
    with pytest.raises(Exception, match="not a veth"):
        nodepods.host_veth_owner("cni0", inv, node["netns"], cri=False)
    inodes = nodepods.pod_netns_inodes(inv, node["netns"], cri=False)
    assert inodes == {netns.inode(q["netns"]): f"default/{q['name']}"
                      for q in lab["pods"] if q["node"] == node["name"]}


def test_without_inventory_the_namespace_is_still_found(lab):
    p = lab["pods"][0]
    node = next(n for n in lab["nodes"] if n["name"] == p["node"])
    o = nodepods.host_veth_owner(p["host_veth"], None, node["netns"], cri=False)
    assert o.pod is None and o.netns_inode == netns.inode(p["netns"]) and o.ips == [p["ip"]]


def test_the_agents_discovery_on_a_lab_node_matches_the_labs_topology(lab):
    """What an agent finds from inside a node (no inventory, no namespace names) is the shape
    the lab publishes for that node: its devices, and the flow pod's namespace and veth."""
    topo = view.topology(lab)
    p = next(p for p in lab["pods"] if p["name"] == "pod-1-1")
    me = topo.node(p["node"])
    with netns.entered(me.netns):
        local = nodepods.discover(me.name, [p["ip"]], [n.ip for n in topo.nodes])
    assert sorted(local.devices()) == sorted(dev for _ns, dev in topo.devices([f"default/{p['name']}"]))
    assert os.stat(local.netns_by_ip[p["ip"]]).st_ino == netns.inode(p["netns"])
    found = local.topology.nodes[0]
    assert (found.bridge, found.overlay, found.uplink) == (me.bridge, me.overlay, me.uplink)
    on_node = {netns.inode(q["netns"]) for q in lab["pods"] if q["node"] == me.name}
    assert set(local.netns_filter()) == on_node | {netns.inode(me.netns)}
