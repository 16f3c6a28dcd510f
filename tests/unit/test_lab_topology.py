"""Lab planning without privileges: names, addresses, Services, status document, inventory."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re

import pytest
from kubernetes.client import ApiClient

from tracer.errors import BadInput
from tracer.lab import flannel
from tracer.lab import topology as T

KINDS = {"Node": "V1Node", "Pod": "V1Pod", "Service": "V1Service",
         "EndpointSlice": "V1EndpointSlice"}


def _topo(**kw):
    kw.setdefault("prefix", "ptlab")
    kw.setdefault("state_dir", "/run/podtrace")
    return T.plan(T.LabConfig(**kw), created_at="2024-01-02T03:04:05Z")


def test_defaults(monkeypatch):
    monkeypatch.delenv("PODTRACE_LAB_PREFIX", raising=False)
    monkeypatch.delenv("PODTRACE_STATE_DIR", raising=False)
    cfg = T.LabConfig()
    assert (cfg.prefix, cfg.cni, cfg.nodes, cfg.pods_per_node) == ("ptlab", "flannel", 2, 2)
    assert str(cfg.lab_dir) == "/run/podtrace/ptlab"


def test_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "mylab")
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    cfg = T.LabConfig()
    assert cfg.prefix == "mylab" and cfg.lab_dir == tmp_path / "mylab"


@pytest.mark.parametrize("kw,needle", [
    ({"cni": "weave"}, "unknown CNI"),
    ({"nodes": 0}, "--nodes"), ({"nodes": 17}, "--nodes"),
    ({"pods_per_node": 0}, "--pods-per-node"), ({"pods_per_node": 9}, "--pods-per-node"),
    ({"prefix": "Bad Prefix"}, "bad lab prefix"), ({"prefix": "a" * 21}, "bad lab prefix"),
    ({"prefix": "x-"}, "bad lab prefix"),
])
def test_config_validation(kw, needle):
    with pytest.raises(BadInput) as err:
        T.LabConfig(**kw)
    assert needle in err.value.line()
    assert err.value.exit_code == 2


def test_names_and_addresses_follow_the_design():
    topo = _topo()
    assert topo.namespaces == ["ptlab-fabric", "ptlab-node-1", "ptlab-node-2", "ptlab-pod-1-1",
                               "ptlab-pod-1-2", "ptlab-pod-2-1", "ptlab-pod-2-2"]
    n2 = topo.nodes[1]
    assert (n2.name, n2.ip, n2.pod_cidr, n2.gateway, n2.overlay_ip, n2.mac, n2.fabric_port) == (
        "node-2", "172.30.0.12", "10.244.2.0/24", "10.244.2.1", "10.244.2.0", "0e:00:00:00:00:02", "n2")
    p = topo.pods[3]
    assert (p.name, p.node, p.ip, p.gateway, p.netns) == (
        "pod-2-2", "node-2", "10.244.2.3", "10.244.2.1", "ptlab-pod-2-2")
    assert p.host_veth == "veth" + hashlib.sha1(b"default/pod-2-2").hexdigest()[:8]
    assert p.labels == {"app": "pod-2-2", "podtrace-lab": "true"}


def test_names_unique_and_valid_at_max_size():
    topo = _topo(nodes=16, pods_per_node=8)
    pods, nodes = topo.pods, topo.nodes
    assert len(pods) == 128
    for values in ([p.name for p in pods], [p.ip for p in pods], [p.mac for p in pods],
                   [p.netns for p in pods], [p.host_veth for p in pods], topo.namespaces,
                   [n.ip for n in nodes], [n.mac for n in nodes], [n.pod_cidr for n in nodes]):
        assert len(values) == len(set(values))
    for p in pods:
        assert len(p.host_veth) <= 15  # IFNAMSIZ - 1
        assert ipaddress.ip_address(p.ip) in ipaddress.ip_network(topo.nodes[p.node_index - 1].pod_cidr)
    for n in nodes:
        assert ipaddress.ip_address(n.ip) in ipaddress.ip_network(T.UNDERLAY_CIDR)
    pat = T.namespace_pattern("ptlab")
    assert all(pat.match(ns) for ns in topo.namespaces)


def test_namespace_pattern_never_matches_another_lab():
    pat = T.namespace_pattern("pttest")
    assert pat.match("pttest-pod-3-2") and pat.match("pttest-fabric")
    for other in ("pttest-x-fabric", "pttest-int-node-1", "pttestx-fabric", "pttest-pod-1",
                  "pttest-node-1-pod-1-1", "ptlab-node-1"):
        assert not pat.match(other), other


@pytest.mark.parametrize("nodes,pods", [(1, 1), (2, 2), (3, 1), (5, 4)])
def test_web_service_only_backend_is_on_the_last_node(nodes, pods):
    topo = _topo(nodes=nodes, pods_per_node=pods)
    web = next(s for s in topo.services if s.name == "web")
    assert [b.name for b in web.backends] == [f"pod-{nodes}-{pods}"]
    assert web.cluster_ip == "10.96.0.10"
    echo = next(s for s in topo.services if s.name == "echo")
    assert len(echo.backends) == nodes * pods and echo.cluster_ip == "10.96.0.20"
    for s in topo.services:
        assert ipaddress.ip_address(s.cluster_ip) in ipaddress.ip_network(T.SERVICE_CIDR)
        assert [(p.name, p.port, p.target_port, p.protocol) for p in s.ports] == [
            ("http", 80, 8080, "TCP"), ("udp", 80, 8080, "UDP")]


def test_chain_names_like_kube_proxy():
    # kube-proxy: "KUBE-SVC-" + base32(sha256(servicePortName + protocol))[:16]
    expect = "KUBE-SVC-" + base64.b32encode(hashlib.sha256(b"default/web:httptcp").digest()).decode()[:16]
    topo = _topo()
    web = next(s for s in topo.services if s.name == "web")
    assert web.ports[0].chain == expect
    for s in topo.services:
        for p in s.ports:
            assert re.fullmatch(r"KUBE-SVC-[A-Z2-7]{16}", p.chain)
            assert all(re.fullmatch(r"KUBE-SEP-[A-Z2-7]{16}", c) for _, c in p.endpoint_chains)


def test_iptables_rules():
    topo = _topo()
    rules = T.iptables_rules(topo)
    lines = rules.splitlines()
    assert lines[0] == "*nat" and rules.count("COMMIT") == 2
    for hook in ("PREROUTING", "OUTPUT"):
        assert any(line.startswith(f"-A {hook} ") and line.endswith("-j KUBE-SERVICES") for line in lines)
    assert any(line.startswith("-A POSTROUTING") and "KUBE-POSTROUTING" in line for line in lines)
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in lines
    assert any("KUBE-POSTROUTING" in line and "MASQUERADE" in line for line in lines)
    assert "-A FORWARD -s 10.244.0.0/16" in rules and "-A FORWARD -d 10.244.0.0/16" in rules
    web = next(s for s in topo.services if s.name == "web")
    for port in web.ports:
        (key, sep), = port.endpoint_chains
        assert key == "default/pod-2-2"
        assert f"-A {sep} -p {port.protocol.lower()}" in rules
        dnat = [line for line in lines if line.startswith(f"-A {sep}") and "DNAT" in line]
        assert dnat and dnat[0].endswith("--to-destination 10.244.2.3:8080")
    # kube-proxy's random balancing: 1/4, 1/3, 1/2, then the rest.
    echo = next(s for s in topo.services if s.name == "echo")
    jumps = [line for line in lines if line.startswith(f"-A {echo.ports[0].chain} ") and "KUBE-SEP" in line]
    probs = [re.search(r"--probability (\S+)", line) for line in jumps]
    assert [round(float(m.group(1)), 4) if m else None for m in probs] == [0.25, 0.3333, 0.5, None]


def test_status_document_has_contract_keys():
    doc = T.status_document(_topo(), {"default/pod-1-1": 42})
    json.dumps(doc)
    assert {"cni", "inventory", "nodes", "pods", "services", "prefix", "fabric_netns",
            "underlay_cidr", "service_cidr"} <= doc.keys()
    assert doc["inventory"] == "/run/podtrace/ptlab/inventory.json"
    assert doc["nodes"][0] == doc["nodes"][0] | {
        "name": "node-1", "netns": "ptlab-node-1", "ip": "172.30.0.11", "pod_cidr": "10.244.1.0/24",
        "uplink": "eth0", "overlay": "flannel.1", "bridge": "cni0", "mac": "0e:00:00:00:00:01",
        "index": 1}
    pod = doc["pods"][0]
    assert pod == pod | {"namespace": "default", "name": "pod-1-1", "node": "node-1",
                         "ip": "10.244.1.2", "netns": "ptlab-pod-1-1", "tcp_port": 8080,
                         "udp_port": 8080, "responder_pid": 42}
    assert pod["host_veth"].startswith("veth") and re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", pod["mac"])
    web = next(s for s in doc["services"] if s["name"] == "web")
    assert web["backends"] == ["default/pod-2-2"] and web["backend_ips"] == ["10.244.2.3"]
    assert web["ports"][0] | {"port": 80, "target_port": 8080, "protocol": "TCP"} == web["ports"][0]


def test_inventory_deserializes_with_the_kubernetes_client():
    topo = _topo(nodes=3, pods_per_node=2)
    inv = json.loads(json.dumps(T.inventory(topo)))
    assert inv["apiVersion"] == "v1" and inv["kind"] == "List"
    api = ApiClient()
    got = {}
    for item in inv["items"]:
        obj = api._ApiClient__deserialize(item, KINDS[item["kind"]])
        got.setdefault(item["kind"], []).append(obj)
    assert [len(got[k]) for k in KINDS] == [3, 6, 2, 2]
    node = got["Node"][2]
    assert node.spec.pod_cidr == "10.244.3.0/24"
    assert {a.type: a.address for a in node.status.addresses} == {"InternalIP": "172.30.0.13",
                                                                   "Hostname": "node-3"}
    pod = got["Pod"][5]
    assert (pod.metadata.name, pod.spec.node_name, pod.status.pod_ip, pod.status.host_ip,
            pod.status.phase) == ("pod-3-2", "node-3", "10.244.3.3", "172.30.0.13", "Running")
    web = next(s for s in got["Service"] if s.metadata.name == "web")
    assert web.spec.selector == {"app": "pod-3-2"} and web.spec.cluster_ip == "10.96.0.10"
    es = next(s for s in got["EndpointSlice"] if s.metadata.labels["kubernetes.io/service-name"] == "web")
    assert [(e.addresses, e.node_name, e.target_ref.name, e.conditions.ready) for e in es.endpoints] == [
        (["10.244.3.3"], "node-3", "pod-3-2", True)]
    assert es.metadata.owner_references[0].uid == web.metadata.uid
    assert es.endpoints[0].target_ref.uid == pod.metadata.uid


def test_inventory_is_deterministic():
    assert T.inventory(_topo()) == T.inventory(_topo())
    uids = [i["metadata"]["uid"] for i in T.inventory(_topo())["items"]]
    assert len(uids) == len(set(uids))


def test_ip_batches():
    topo = _topo(nodes=3, pods_per_node=1)
    n1 = topo.nodes[0]
    lines = flannel.node_batch(topo, n1)
    assert ("link add flannel.1 address 0e:00:00:00:00:01 mtu 1450 type vxlan id 1 dstport 8472 "
            "local 172.30.0.11 dev eth0 nolearning") in lines
    for k in (2, 3):
        assert f"route add 10.244.{k}.0/24 via 10.244.{k}.0 dev flannel.1 onlink" in lines
        assert f"neigh add 10.244.{k}.0 lladdr 0e:00:00:00:00:{k:02x} dev flannel.1 nud permanent" in lines
    assert not any("10.244.1.0/24 via" in line for line in lines)
    assert flannel.fdb_batch(topo, n1) == [
        "fdb append 0e:00:00:00:00:02 dev flannel.1 dst 172.30.0.12",
        "fdb append 0e:00:00:00:00:03 dev flannel.1 dst 172.30.0.13"]
    p = topo.pods[0]
    assert any(line.startswith(f"link add {p.host_veth} ") and f"netns {p.netns}" in line for line in lines)
    assert flannel.pod_batch(p)[-1] == "route add default via 10.244.1.1 dev eth0"


def test_every_cni_flavour_describes_the_same_things():
    """build, statusdoc, apiobjects and kubeproxy call these on whichever flavour a lab has."""
    from tracer.lab import cilium, cni

    assert set(cni.FLAVOURS) == set(T.CNIS)
    names = {"NAME", "OVERLAY", "HOP_DEVICE", "VNI", "NODES_STEP", "SERVICES_STEP", "plan",
             "filter_rules", "status_fields", "status_node", "status_pod_fields",
             "node_annotations", "node_sysctls", "node_batch", "fdb_batch", "node_sysctls_after",
             "node_checks", "pod_batch"}
    for module in (flannel, cilium):
        assert not names - set(dir(module)), module.__name__
    for name, module in cni.FLAVOURS.items():
        topo = _topo(cni=name)
        doc = T.status_document(topo)
        assert doc["cni"] == module.NAME == name
        assert all(n["overlay"] == module.OVERLAY and n["bridge"] == module.HOP_DEVICE
                   for n in doc["nodes"])
        assert doc["vxlan"]["vni"] == module.VNI
