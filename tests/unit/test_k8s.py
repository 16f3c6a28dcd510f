"""Endpoint resolution from a Kubernetes v1 List (no privileges)."""

import json

import pytest

from tracer.cluster import endpoints
from tracer.cluster import inventory
from tracer.errors import BadInput


def test_forms(inv):
    assert endpoints.resolve("pod-1-1", inv).ip == "10.244.1.2"
    assert endpoints.resolve("default/pod-2-1", inv).pod.node == "node-2"
    svc = endpoints.resolve("svc/default/web", inv)
    assert svc.ip == "10.96.0.10" and svc.service.backend_ips == ["10.244.2.3"]
    assert svc.addresses() == ["10.96.0.10", "10.244.2.3"]
    assert endpoints.resolve("node/node-1", inv).ip == "172.30.0.11"
    assert endpoints.resolve("10.244.2.2", inv).pod.key == "default/pod-2-1"
    assert endpoints.resolve("10.96.0.20", inv).service.key == "default/echo"
    assert endpoints.resolve("192.0.2.7", inv).pod is None


@pytest.mark.parametrize("spec,needle", [
    ("pod-1-9", "did you mean"), ("default/nope", "no pod"), ("svc/default/wbe", "did you mean svc/default/web"),
    ("node/node-9", "no node"), ("a/b/c/d", "cannot parse"), ("", "empty"), ("999.1.1.1", "not a valid IPv4 address"),
])
def test_bad_specs(inv, spec, needle):
    with pytest.raises(BadInput) as e:
        endpoints.resolve(spec, inv)
    assert needle in e.value.line()
    assert "\n" not in e.value.line()


def test_bad_files(tmp_path):
    with pytest.raises(BadInput):
        inventory.load_list(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BadInput):
        inventory.load_list(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"kind": "Pod"}')
    with pytest.raises(BadInput):
        inventory.load_list(tmp_path / "y.json")


def _topology():
    from tracer.cluster.topology import NodeDevices, PodPlace, Topology

    return Topology(source="lab t", nodes=(
        NodeDevices("n1", netns="t-node-1", ip="192.168.1.1", uplink="eth0", bridge="cni0", overlay="flannel.1",
                    overlay_ip="10.244.1.0", vtep_mac="aa:aa"),
        NodeDevices("n2", netns="t-node-2", ip="192.168.1.2", uplink="eth0", bridge="cni0", overlay="flannel.1",
                    overlay_ip="10.244.2.0", vtep_mac="bb:bb"),
        NodeDevices("n3", netns="t-node-3", uplink="eth0")),
        pods=(PodPlace("default/a", "n1", "t-pod-a", "veth-a"), PodPlace("default/b", "n2", "t-pod-b", "veth-b"),
              PodPlace("default/c", "n1", "t-pod-c", "veth-c")),
        labels={"prefix": "t", "cni": "flannel"})


def test_topology_devices_are_the_nodes_devices_then_the_pods_veths():
    topo = _topology()
    assert topo.devices(["default/a", "default/b"]) == [
        ("t-node-1", "cni0"), ("t-node-1", "flannel.1"), ("t-node-1", "eth0"),
        ("t-node-2", "cni0"), ("t-node-2", "flannel.1"), ("t-node-2", "eth0"),
        ("t-node-1", "veth-a"), ("t-node-2", "veth-b")]
    assert topo.devices(["default/c"]) == [("t-node-1", "cni0"), ("t-node-1", "flannel.1"), ("t-node-1", "eth0"),
                                           ("t-node-1", "veth-c")]
    assert topo.devices([], nodes=["n3"]) == [("t-node-3", "eth0")]     # a node without pods of the flow
    assert len(topo.devices()) == 9                                      # everything: capture --tc


def test_topology_vtep_and_file_round_trip(tmp_path, monkeypatch):
    from tracer.cluster import topology

    topo = _topology()
    assert topo.vtep() == {"10.244.1.0": {"node": "n1", "mac": "aa:aa", "ip": "192.168.1.1"},
                           "10.244.2.0": {"node": "n2", "mac": "bb:bb", "ip": "192.168.1.2"}}
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    assert topology.load_local("t") is None
    (tmp_path / "t").mkdir()
    topology.write(topo, topology.path_for("t"))
    assert topology.load_local("t") == topo
    with pytest.raises(BadInput):
        topology.load_local("../etc")


def test_a_cluster_file_gets_the_topologys_namespaces_for_the_same_pods(tmp_path, monkeypatch):
    from dataclasses import replace

    from tracer.cluster import sources, topology

    def pod(name, ip, node):
        return {"kind": "Pod", "metadata": {"namespace": "default", "name": name, "uid": name},
                "spec": {"nodeName": node}, "status": {"podIP": ip, "phase": "Running"}}

    lab_inv = tmp_path / "t" / "inventory.json"
    lab_inv.parent.mkdir()
    lab_inv.write_text(json.dumps({"kind": "List", "items": [pod("a", "10.244.1.2", "n1"), pod("b", "10.244.2.2", "n2")]}))
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    topology.write(replace(_topology(), inventory=str(lab_inv)), topology.path_for("t"))
    mine = tmp_path / "mine.json"     # pod b moved: another address, not the lab's pod
    mine.write_text(json.dumps({"kind": "List", "items": [pod("a", "10.244.1.2", "n1"), pod("b", "10.9.9.9", "n2")]}))
    view = sources.local(str(mine), "t")
    assert view.topology is not None and view.conn is None
    assert (view.inv.pods["default/a"].netns, view.inv.pods["default/a"].host_veth) == ("t-pod-a", "veth-a")
    assert view.inv.pods["default/b"].netns is None
    lab = sources.local(None, "t")
    assert lab.inv.source == "lab t" and lab.inv.pods["default/b"].netns == "t-pod-b"
    assert sources.local(None, "nolab") is None
