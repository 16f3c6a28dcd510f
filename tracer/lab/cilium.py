"""What a cilium lab node is made of: lxc devices, cilium_host/cilium_net, cilium_vxlan, routes.

Real Cilium moves packets with BPF programs on lxc*, cilium_host and cilium_vxlan; the lab
builds the same devices and addresses and lets the kernel's own routing, neighbour and VXLAN
code do the moving (see docs/runbooks/cilium-path.md for what each object stands in for).
The functions here only describe those objects; `tracer.lab.build` makes them.
"""

from __future__ import annotations

import hashlib

from tracer.lab.model import (CLUSTER_CIDR, K8S_NAMESPACE, POD_MTU, UPLINK, VXLAN_PORT, LabConfig,
                              NodePlan, PodPlan, LabPlan, hash_mac, ip_mac, node_netns, pod_netns)

NAME = "cilium"
CILIUM_HOST = "cilium_host"      # holds the node's router IP (scope link); the pods' gateway
CILIUM_NET = "cilium_net"        # cilium_host's veth peer, no IP
CILIUM_OVERLAY = "cilium_vxlan"
OVERLAY = CILIUM_OVERLAY
HOP_DEVICE = CILIUM_HOST         # the device a pod's gateway IP lives on (there is no bridge)
# Real Cilium runs cilium_vxlan in metadata (external) mode and puts the source pod's
# security identity in the VNI; the lab uses one fixed VNI, the first identity Cilium's
# allocator hands out (1-255 are reserved identities, e.g. 2 = world).
CILIUM_VNI = 256
VNI = CILIUM_VNI
# Traffic the node itself originates towards other nodes' pods follows Cilium's own routes
# (via cilium_host, src router IP): they live in this table, looked up for `iif lo` only.
# Forwarded pod traffic uses the main table, whose routes go straight to cilium_vxlan
# (what Cilium's BPF does with its tunnel map).
CILIUM_HOST_TABLE = 200
CILIUM_RULE_PREF = 100
NODES_STEP = ("configuring nodes: cilium_host/cilium_net, cilium_vxlan, lxc devices, "
              "routes, neighbours, FDB, sysctls")
SERVICES_STEP = "programming kube-proxy Services and Cilium's forward rules in iptables"


def lxc_name(namespace: str, pod: str) -> str:
    """`lxc` + 12 hex chars of sha256: Cilium's Endpoint2IfName (15 characters, the most
    IFNAMSIZ allows), keyed by "ns/pod" here instead of the endpoint ID so it is stable."""
    return "lxc" + hashlib.sha256(f"{namespace}/{pod}".encode()).hexdigest()[:12]


def cilium_vtep_mac(i: int) -> str:
    return f"0e:c1:00:00:00:{i:02x}"


def plan(cfg: LabConfig) -> tuple[list[NodePlan], list[PodPlan]]:
    """Same nodes, pod CIDRs and pod IPs as flannel; the router IP 10.244.N.1 sits on
    cilium_host and is every pod's gateway (and the peers' overlay next hop); pods hang off
    `lxc…` devices."""
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        router = f"10.244.{i}.1"
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=f"172.30.0.{10 + i}", uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=f"10.244.{i}.0/24", gateway=router,
            bridge_mac=ip_mac(router), overlay_ip=router, mac=cilium_vtep_mac(i),
            router_ip=router,
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ip = f"10.244.{i}.{1 + j}"
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ip, mac=ip_mac(ip), gateway=router,
                host_veth=lxc_name(K8S_NAMESPACE, name),
                host_mac=hash_mac(f"lxc/{K8S_NAMESPACE}/{name}"),
            ))
    return nodes, pods


def filter_rules(family: int = 4) -> list[str]:
    """The filter rules Cilium (iptables mode, per-endpoint routes) installs for forwarded
    traffic: a CILIUM_FORWARD chain fed from FORWARD that accepts what enters or leaves
    cilium_host, cilium_net and the lxc devices. The rule texts are Cilium's own."""
    def accept(match: str, comment: str) -> str:
        return f'-A CILIUM_FORWARD {match} -m comment --comment "cilium: {comment}" -j ACCEPT'

    return [
        "*filter",
        ":CILIUM_FORWARD - [0:0]",
        '-A FORWARD -m comment --comment "cilium-feeder: CILIUM_FORWARD" -j CILIUM_FORWARD',
        accept(f"-o {CILIUM_HOST}", f"any->cluster on {CILIUM_HOST} forward accept"),
        accept(f"-i {CILIUM_HOST}", f"cluster->any on {CILIUM_HOST} forward accept (nodeport)"),
        accept("-i lxc+", "cluster->any on lxc+ forward accept"),
        accept(f"-i {CILIUM_NET}", f"cluster->any on {CILIUM_NET} forward accept (nodeport)"),
        # With per-endpoint routes, forwarded traffic to pods leaves by their lxc device.
        accept("-o lxc+", "any->cluster on lxc+ forward accept"),
        "COMMIT",
    ]


def status_fields() -> dict:
    """Lab-wide fields of the status document besides the common ones."""
    return {"host_routes": {"table": CILIUM_HOST_TABLE, "rule_pref": CILIUM_RULE_PREF}}


def status_node(n: NodePlan) -> dict:
    """Per node, `bridge` is cilium_host: the device a pod's gateway (router) IP lives on,
    the one hop device a tracer attaches to besides the lxc devices, the overlay and the
    uplink. `overlay_ip` is the router IP (the next hop the peers' overlay routes name) and
    `mac` the cilium_vxlan MAC (the VTEP MAC those next hops resolve to)."""
    return {
        "name": n.name, "index": n.index, "netns": n.netns, "ip": n.ip,
        "pod_cidr": n.pod_cidr, "uplink": UPLINK, "overlay": CILIUM_OVERLAY,
        "bridge": CILIUM_HOST, "cilium_host": CILIUM_HOST, "cilium_net": CILIUM_NET,
        "router_ip": n.router_ip, "mac": n.mac, "overlay_ip": n.overlay_ip,
        "gateway": n.gateway, "uplink_mac": n.uplink_mac, "bridge_mac": n.bridge_mac,
        "fabric_port": n.fabric_port,
    }


def status_pod_fields(p: PodPlan) -> dict:
    """Pod fields of the status document besides the common ones (after `host_veth`)."""
    return {"host_mac": p.host_mac}


def node_annotations(n: NodePlan) -> dict:
    """What cilium-agent writes on its node (annotate-k8s-node)."""
    return {
        "network.cilium.io/ipv4-cilium-host": n.router_ip,
        "network.cilium.io/ipv4-pod-cidr": n.pod_cidr,
    }


def node_sysctls(n: NodePlan) -> dict[str, str]:
    """Set before the node's devices exist (/proc/sys paths)."""
    return {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0"}


def node_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a Cilium node (VXLAN tunnel
    mode, per-endpoint routes, kube-proxy kept)."""
    host, net, vx = CILIUM_HOST, CILIUM_NET, CILIUM_OVERLAY
    lines = [
        "link set lo up",
        f"addr add {n.ip}/24 dev {UPLINK}",
        f"link set {UPLINK} up",
        # cilium_net carries cilium_host's MAC: what the node sends out of cilium_host comes
        # back up the stack on cilium_net and is forwarded from there (in Cilium, bpf_host's
        # program on cilium_host does that forwarding). NOARP, as on a Cilium node.
        f"link add {host} address {n.bridge_mac} type veth peer name {net} address {n.bridge_mac}",
        f"link set {host} arp off",
        f"link set {net} arp off",
        f"addr add {n.router_ip}/32 dev {host} scope link",
        f"link set {net} up",
        f"link set {host} up",
        f"link add {vx} address {n.mac} mtu {POD_MTU} type vxlan id {CILIUM_VNI} "
        f"dstport {VXLAN_PORT} local {n.ip} dev {UPLINK} nolearning",
        f"link set {vx} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} address {p.host_mac} mtu {POD_MTU} type veth peer name eth0 "
            f"address {p.mac} mtu {POD_MTU} netns {p.netns}",
            f"link set {p.host_veth} up",
            # Per-endpoint route; the pod's MAC is known (Cilium writes it from its endpoint
            # map: the node never ARPs for a pod).
            f"route add {p.ip}/32 dev {p.host_veth} scope link",
            f"neigh add {p.ip} lladdr {p.mac} dev {p.host_veth} nud permanent",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        lines += [
            # Forwarded pod traffic: straight into the overlay (Cilium's tunnel map).
            f"route add {k.pod_cidr} via {k.router_ip} dev {vx} onlink src {n.router_ip}",
            f"neigh add {k.router_ip} lladdr {k.mac} dev {vx} nud permanent",
            # The node's own traffic: Cilium's route, via cilium_host with the router IP.
            f"route add {k.pod_cidr} via {n.router_ip} dev {host} src {n.router_ip} "
            f"mtu {POD_MTU} table {CILIUM_HOST_TABLE}",
        ]
    lines.append(f"rule add pref {CILIUM_RULE_PREF} iif lo to {CLUSTER_CIDR} "
                 f"lookup {CILIUM_HOST_TABLE}")
    return lines


def fdb_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    return [f"fdb append {k.mac} dev {CILIUM_OVERLAY} dst {k.ip}"
            for k in topo.nodes if k.index != n.index]


def node_sysctls_after(topo: LabPlan, n: NodePlan) -> dict[str, str]:
    """Once the devices exist: rp_filter off on Cilium's devices (as cilium-agent and its
    CNI plugin set it), and cilium_net accepting the node's own addresses as sources (what
    the node sends through cilium_host re-enters there)."""
    devs = [CILIUM_HOST, CILIUM_NET, CILIUM_OVERLAY] + [p.host_veth for p in topo.pods_on(n.index)]
    values = {f"net/ipv4/conf/{d}/rp_filter": "0" for d in devs}
    values[f"net/ipv4/conf/{CILIUM_NET}/accept_local"] = "1"
    return values


def node_checks(n: NodePlan) -> dict[str, tuple[str, str]]:
    """Sysctls that must read back a value once the node is built: {key: (value, why not)}."""
    return {}


def pod_batch(p: PodPlan) -> list[str]:
    """A Cilium pod: a /32 and the two routes Cilium's CNI plugin installs (the router IP
    on-link, the default route through it)."""
    return ["link set lo up", f"addr add {p.ip}/32 dev eth0", "link set eth0 up",
            f"route add {p.gateway}/32 dev eth0 scope link",
            f"route add default via {p.gateway} dev eth0 mtu {POD_MTU}"]
