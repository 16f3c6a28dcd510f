"""What a cilium lab node is made of: lxc devices, cilium_host/cilium_net, cilium_vxlan, routes.

Real Cilium moves packets with BPF programs on lxc*, cilium_host and cilium_vxlan; the lab
builds the same devices and addresses and lets the kernel's own routing, neighbour and VXLAN
code do the moving (see docs/runbooks/cilium-path.md for what each object stands in for).
The functions here only describe those objects; `tracer.lab.build` makes them.
"""

from __future__ import annotations

import hashlib

from tracer.lab.model import (K8S_NAMESPACE, UPLINK, VXLAN_PORT, LabConfig, NodePlan,
                              PodPlan, LabPlan, addr_family, cluster_cidr, hash_mac, ip_mac,
                              node_ip, node_netns, nodad, pod_mtu, plen, pod_cidr, pod_gateway, pod_ip,
                              pod_netns, subnet_len)

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
    """Same nodes, pod CIDRs and pod IPs as flannel; the router IP 10.244.N.1 (IPv6:
    fd00:10:244:N::1) sits on cilium_host and is every pod's gateway (and the peers' overlay
    next hop); pods hang off `lxc…` devices."""
    fams = cfg.families
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        routers = tuple(pod_gateway(f, i) for f in fams)
        router = routers[0]
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=node_ip(cfg.underlay_family, i), uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=pod_cidr(fams[0], i), gateway=router,
            bridge_mac=ip_mac(router), overlay_ip=router, mac=cilium_vtep_mac(i),
            router_ip=router, pod_cidrs=tuple(pod_cidr(f, i) for f in fams), gateways=routers,
            overlay_ips=routers, router_ips=routers, mtu=pod_mtu(cfg.underlay_family),
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ips = tuple(pod_ip(f, i, j) for f in fams)
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ips[0], mac=ip_mac(ips[0]), gateway=router,
                host_veth=lxc_name(K8S_NAMESPACE, name),
                host_mac=hash_mac(f"lxc/{K8S_NAMESPACE}/{name}"), ips=ips, gateways=routers,
                mtu=pod_mtu(cfg.underlay_family),
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
        "ips": [n.ip], "pod_cidrs": list(n.pod_cidrs), "gateways": list(n.gateways),
        "overlay_ips": list(n.overlay_ips), "router_ips": list(n.router_ips),
    }


def status_pod_fields(p: PodPlan) -> dict:
    """Pod fields of the status document besides the common ones (after `host_veth`)."""
    return {"host_mac": p.host_mac}


def node_annotations(n: NodePlan) -> dict:
    """What cilium-agent writes on its node (annotate-k8s-node)."""
    out = {}
    for router, cidr in zip(n.router_ips or (n.router_ip,), n.pod_cidrs or (n.pod_cidr,)):
        fam = "ipv6" if addr_family(router) == 6 else "ipv4"
        out[f"network.cilium.io/{fam}-cilium-host"] = router
        out[f"network.cilium.io/{fam}-pod-cidr"] = cidr
    return out


def node_sysctls(n: NodePlan) -> dict[str, str]:
    """Set before the node's devices exist (/proc/sys paths)."""
    values = {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0"}
    if any(addr_family(c) == 6 for c in n.pod_cidrs):
        values["net/ipv6/conf/all/forwarding"] = "1"
    return values


def node_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a Cilium node (VXLAN tunnel
    mode, per-endpoint routes, kube-proxy kept). IPv6 the same way, with two differences the
    kernel imposes: a route cannot name a local address as gateway (the node's own IPv6
    routes go to cilium_host without one), and a node answers neighbour solicitations only
    for addresses of the receiving device (each lxc device proxies the router IP, what
    Cilium's BPF answers on a real node)."""
    host, net, vx = CILIUM_HOST, CILIUM_NET, CILIUM_OVERLAY
    uf = addr_family(n.ip)
    routers = n.router_ips or (n.router_ip,)
    lines = [
        "link set lo up",
        f"addr add {n.ip}/{subnet_len(uf)} dev {UPLINK}{nodad(uf)}",
        f"link set {UPLINK} up",
        # cilium_net carries cilium_host's MAC: what the node sends out of cilium_host comes
        # back up the stack on cilium_net and is forwarded from there (in Cilium, bpf_host's
        # program on cilium_host does that forwarding). NOARP, as on a Cilium node.
        f"link add {host} address {n.bridge_mac} type veth peer name {net} address {n.bridge_mac}",
        f"link set {host} arp off",
        f"link set {net} arp off",
        *(f"addr add {r}/32 dev {host} scope link" if addr_family(r) == 4
          else f"addr add {r}/128 dev {host} nodad" for r in routers),
        f"link set {net} up",
        f"link set {host} up",
        f"link add {vx} address {n.mac} mtu {n.mtu} type vxlan id {CILIUM_VNI} "
        f"dstport {VXLAN_PORT} local {n.ip} dev {UPLINK} nolearning",
        f"link set {vx} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} address {p.host_mac} mtu {n.mtu} type veth peer name eth0 "
            f"address {p.mac} mtu {n.mtu} netns {p.netns}",
            f"link set {p.host_veth} up",
        ]
        for ip in p.ips or (p.ip,):
            lines += [
                # Per-endpoint route; the pod's MAC is known (Cilium writes it from its
                # endpoint map: the node never ARPs for a pod).
                f"route add {ip}/{plen(addr_family(ip))} dev {p.host_veth} scope link",
                f"neigh add {ip} lladdr {p.mac} dev {p.host_veth} nud permanent",
            ]
        lines += [f"neigh add proxy {r} dev {p.host_veth}" for r in routers if addr_family(r) == 6]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        for cidr, peer_router, mine in zip(k.pod_cidrs or (k.pod_cidr,),
                                           k.router_ips or (k.router_ip,), routers):
            via = f"via {mine} " if addr_family(mine) == 4 else ""
            lines += [
                # Forwarded pod traffic: straight into the overlay (Cilium's tunnel map).
                f"route add {cidr} via {peer_router} dev {vx} onlink src {mine}",
                f"neigh add {peer_router} lladdr {k.mac} dev {vx} nud permanent",
                # The node's own traffic: Cilium's route, via cilium_host with the router IP.
                f"route add {cidr} {via}dev {host} src {mine} mtu {n.mtu} table {CILIUM_HOST_TABLE}",
            ]
    lines += [f"rule add pref {CILIUM_RULE_PREF} iif lo to {cluster_cidr(4)} lookup {CILIUM_HOST_TABLE}"
              for r in routers if addr_family(r) == 4]
    return lines


def node_batch6(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -6 -batch` lines (what needs the family named: the IPv6 routing rule)."""
    return [f"rule add pref {CILIUM_RULE_PREF} iif lo to {cluster_cidr(6)} lookup {CILIUM_HOST_TABLE}"
            for r in n.router_ips if addr_family(r) == 6]


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
    if any(addr_family(r) == 6 for r in n.router_ips):
        for p in topo.pods_on(n.index):
            # lxc devices answer neighbour solicitations for the router IP at once.
            values[f"net/ipv6/conf/{p.host_veth}/proxy_ndp"] = "1"
            values[f"net/ipv6/neigh/{p.host_veth}/proxy_delay"] = "0"
    return values


def node_checks(n: NodePlan) -> dict[str, tuple[str, str]]:
    """Sysctls that must read back a value once the node is built: {key: (value, why not)}."""
    return {}


def pod_batch(p: PodPlan) -> list[str]:
    """A Cilium pod: a /32 and the two routes Cilium's CNI plugin installs (the router IP
    on-link, the default route through it)."""
    lines = ["link set lo up"]
    lines += [f"addr add {ip}/{plen(addr_family(ip))} dev eth0{nodad(addr_family(ip))}"
              for ip in p.ips or (p.ip,)]
    lines.append("link set eth0 up")
    for gw in p.gateways or (p.gateway,):
        fam = addr_family(gw)
        lines += [f"route add {gw}/{plen(fam)} dev eth0 scope link",
                  f"route add {'default' if fam == 4 else '::/0'} via {gw} dev eth0 mtu {p.mtu}"]
    return lines
