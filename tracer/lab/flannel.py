"""What a flannel lab node is made of: cni0, flannel.1, routes, FDB, rules.

A node has a `cni0` bridge holding the pods' gateway, a `flannel.1` VXLAN device with a
route, a permanent neighbour and an FDB entry per peer node, and flannel's FORWARD accepts.
The functions here only describe those objects (`ip -batch` lines, sysctls, iptables
lines, status and inventory fields); `tracer.lab.build` makes them.
"""

from __future__ import annotations

import hashlib

from tracer.lab.model import (CLUSTER_CIDR, K8S_NAMESPACE, POD_MTU, UPLINK, VXLAN_PORT, LabConfig,
                              NodePlan, PodPlan, LabPlan, ip_mac, node_netns, pod_netns)

NAME = "flannel"
CNI_BRIDGE = "cni0"
OVERLAY = "flannel.1"
VXLAN_ID = 1
VNI = VXLAN_ID
HOP_DEVICE = CNI_BRIDGE         # the device a pod's gateway IP lives on
NODES_STEP = "configuring nodes: cni0, flannel.1, routes, neighbours, FDB, sysctls"
SERVICES_STEP = "programming kube-proxy Services and flannel rules in iptables"


def host_veth_name(namespace: str, pod: str) -> str:
    """`veth` + 8 hex chars of sha1("ns/pod"): stable per pod, like real CNIs."""
    return "veth" + hashlib.sha1(f"{namespace}/{pod}".encode()).hexdigest()[:8]


def flannel_mac(i: int) -> str:
    return f"0e:00:00:00:00:{i:02x}"


def plan(cfg: LabConfig) -> tuple[list[NodePlan], list[PodPlan]]:
    """Node N has pod CIDR 10.244.N.0/24, its gateway .1 on cni0 and .0 on flannel.1."""
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        gateway = f"10.244.{i}.1"
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=f"172.30.0.{10 + i}", uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=f"10.244.{i}.0/24", gateway=gateway,
            bridge_mac=ip_mac(gateway), overlay_ip=f"10.244.{i}.0", mac=flannel_mac(i),
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ip = f"10.244.{i}.{1 + j}"
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ip, mac=ip_mac(ip), gateway=gateway,
                host_veth=host_veth_name(K8S_NAMESPACE, name),
            ))
    return nodes, pods


def filter_rules() -> list[str]:
    """flanneld's FORWARD accepts for the pod network (iptables-restore lines)."""
    return [
        "*filter",
        f'-A FORWARD -s {CLUSTER_CIDR} -m comment --comment "flanneld forward" -j ACCEPT',
        f'-A FORWARD -d {CLUSTER_CIDR} -m comment --comment "flanneld forward" -j ACCEPT',
        "COMMIT",
    ]


def status_fields() -> dict:
    """Lab-wide fields of the status document besides the common ones."""
    return {}


def status_node(n: NodePlan) -> dict:
    return {
        "name": n.name, "index": n.index, "netns": n.netns, "ip": n.ip,
        "pod_cidr": n.pod_cidr, "uplink": UPLINK, "overlay": OVERLAY,
        "bridge": CNI_BRIDGE, "mac": n.mac, "overlay_ip": n.overlay_ip,
        "gateway": n.gateway, "uplink_mac": n.uplink_mac, "bridge_mac": n.bridge_mac,
        "fabric_port": n.fabric_port,
    }


def status_pod_fields(p: PodPlan) -> dict:
    """Pod fields of the status document besides the common ones (after `host_veth`)."""
    return {}


def node_annotations(n: NodePlan) -> dict:
    """What flanneld writes on its node (kube subnet manager)."""
    return {
        "flannel.alpha.coreos.com/backend-data": f'{{"VNI":{VXLAN_ID},"VtepMAC":"{n.mac}"}}',
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": n.ip,
    }


def node_sysctls(n: NodePlan) -> dict[str, str]:
    """Set before the node's devices exist (/proc/sys paths)."""
    return {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}


def node_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a flannel (vxlan) node."""
    lines = [
        "link set lo up",
        f"addr add {n.ip}/24 dev {UPLINK}",
        f"link set {UPLINK} up",
        f"link add {CNI_BRIDGE} address {n.bridge_mac} mtu {POD_MTU} type bridge",
        f"addr add {n.gateway}/24 dev {CNI_BRIDGE}",
        f"link set {CNI_BRIDGE} up",
        f"link add {OVERLAY} address {n.mac} mtu {POD_MTU} type vxlan id {VXLAN_ID} "
        f"dstport {VXLAN_PORT} local {n.ip} dev {UPLINK} nolearning",
        f"addr add {n.overlay_ip}/32 dev {OVERLAY}",
        f"link set {OVERLAY} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} mtu {POD_MTU} type veth peer name eth0 "
            f"address {p.mac} mtu {POD_MTU} netns {p.netns}",
            f"link set {p.host_veth} master {CNI_BRIDGE} up",
            # The bridge CNI's hairpinMode, which flannel enables: a pod can reach itself
            # through a Service VIP.
            f"link set {p.host_veth} type bridge_slave hairpin on",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        lines += [
            f"route add {k.pod_cidr} via {k.overlay_ip} dev {OVERLAY} onlink",
            f"neigh add {k.overlay_ip} lladdr {k.mac} dev {OVERLAY} nud permanent",
        ]
    return lines


def fdb_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    return [f"fdb append {k.mac} dev {OVERLAY} dst {k.ip}"
            for k in topo.nodes if k.index != n.index]


def node_sysctls_after(topo: LabPlan, n: NodePlan) -> dict[str, str]:
    """Set once the node's devices exist."""
    return {}


def node_checks(n: NodePlan) -> dict[str, tuple[str, str]]:
    """Sysctls that must read back a value once the node is built: {key: (value, why not)}."""
    return {"net/bridge/bridge-nf-call-iptables":
            ("1", "this kernel's br_netfilter is not per network namespace")}


def pod_batch(p: PodPlan) -> list[str]:
    return ["link set lo up", f"addr add {p.ip}/24 dev eth0", "link set eth0 up",
            f"route add default via {p.gateway} dev eth0"]
