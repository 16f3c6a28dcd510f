"""What a flannel lab node is made of: cni0, flannel.1, routes, FDB, rules.

A node has a `cni0` bridge holding the pods' gateway, a `flannel.1` VXLAN device with a
route, a permanent neighbour and an FDB entry per peer node, and flannel's FORWARD accepts.
The functions here only describe those objects (`ip -batch` lines, sysctls, iptables
lines, status and inventory fields); `tracer.lab.build` makes them.
"""

from __future__ import annotations

import hashlib

from tracer.lab.model import (K8S_NAMESPACE, UPLINK, VXLAN_PORT, LabConfig, NodePlan,
                              PodPlan, LabPlan, addr_family, cluster_cidr, ip_mac, node_ip,
                              node_netns, nodad, pod_mtu, plen, pod_cidr, pod_gateway, pod_ip, pod_netns,
                              subnet_len, subnet_zero)

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
    """Node N has pod CIDR 10.244.N.0/24, its gateway .1 on cni0 and .0 on flannel.1 (IPv6:
    fd00:10:244:N::/64, ::1 on cni0, :: on flannel.1); one flannel.1 carries every family,
    over the IPv4 underlay (IPv6 in an ipv6 lab)."""
    fams = cfg.families
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        gateways = tuple(pod_gateway(f, i) for f in fams)
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=node_ip(cfg.underlay_family, i), uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=pod_cidr(fams[0], i), gateway=gateways[0],
            bridge_mac=ip_mac(gateways[0]), overlay_ip=subnet_zero(fams[0], i), mac=flannel_mac(i),
            pod_cidrs=tuple(pod_cidr(f, i) for f in fams), gateways=gateways,
            overlay_ips=tuple(subnet_zero(f, i) for f in fams), mtu=pod_mtu(cfg.underlay_family),
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ips = tuple(pod_ip(f, i, j) for f in fams)
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ips[0], mac=ip_mac(ips[0]), gateway=gateways[0],
                host_veth=host_veth_name(K8S_NAMESPACE, name), ips=ips, gateways=gateways,
                mtu=pod_mtu(cfg.underlay_family),
            ))
    return nodes, pods


def filter_rules(family: int = 4) -> list[str]:
    """flanneld's FORWARD accepts for the pod network (iptables-restore lines; ip6tables for
    family 6)."""
    cidr = cluster_cidr(family)
    return [
        "*filter",
        f'-A FORWARD -s {cidr} -m comment --comment "flanneld forward" -j ACCEPT',
        f'-A FORWARD -d {cidr} -m comment --comment "flanneld forward" -j ACCEPT',
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
        "ips": [n.ip], "pod_cidrs": list(n.pod_cidrs), "gateways": list(n.gateways),
        "overlay_ips": list(n.overlay_ips),
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
    values = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}
    if any(addr_family(c) == 6 for c in n.pod_cidrs):
        values |= {"net/ipv6/conf/all/forwarding": "1", "net/bridge/bridge-nf-call-ip6tables": "1"}
    return values


def node_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a flannel (vxlan) node."""
    uf = addr_family(n.ip)
    lines = [
        "link set lo up",
        f"addr add {n.ip}/{subnet_len(uf)} dev {UPLINK}{nodad(uf)}",
        f"link set {UPLINK} up",
        f"link add {CNI_BRIDGE} address {n.bridge_mac} mtu {n.mtu} type bridge",
        *(f"addr add {gw}/{subnet_len(addr_family(gw))} dev {CNI_BRIDGE}{nodad(addr_family(gw))}"
          for gw in n.gateways),
        f"link set {CNI_BRIDGE} up",
        f"link add {OVERLAY} address {n.mac} mtu {n.mtu} type vxlan id {VXLAN_ID} "
        f"dstport {VXLAN_PORT} local {n.ip} dev {UPLINK} nolearning",
        *(f"addr add {ov}/{plen(addr_family(ov))} dev {OVERLAY}{nodad(addr_family(ov))}"
          for ov in n.overlay_ips),
        f"link set {OVERLAY} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} mtu {n.mtu} type veth peer name eth0 "
            f"address {p.mac} mtu {n.mtu} netns {p.netns}",
            f"link set {p.host_veth} master {CNI_BRIDGE} up",
            # The bridge CNI's hairpinMode, which flannel enables: a pod can reach itself
            # through a Service VIP.
            f"link set {p.host_veth} type bridge_slave hairpin on",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        for cidr, ov in zip(k.pod_cidrs, k.overlay_ips):
            lines += [
                f"route add {cidr} via {ov} dev {OVERLAY} onlink",
                f"neigh add {ov} lladdr {k.mac} dev {OVERLAY} nud permanent",
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
    lines = ["link set lo up"]
    lines += [f"addr add {ip}/{subnet_len(addr_family(ip))} dev eth0{nodad(addr_family(ip))}"
              for ip in p.ips]
    lines.append("link set eth0 up")
    lines += [f"route add {'default' if addr_family(gw) == 4 else '::/0'} via {gw} dev eth0"
              for gw in p.gateways]
    return lines
