"""What a calico lab node is made of: cali devices, proxy ARP, /32 routes, the tunnel of its mode.

As Calico builds a node: no bridge; each pod's `eth0` holds a /32 and a default route via
169.254.1.1, which the host-side `cali…` veth answers by proxy ARP; the node has a /32 route
per local pod and one route per peer node's block: through `tunl0` (IP-in-IP, the default
mode), through `vxlan.calico` (VXLAN, VNI 4096, UDP 4789), or straight over the underlay to
the peer (routed: the routes a BGP speaker would install, here static with `proto bird`).
Felix's filter chains (`cali-FORWARD`, per-pod `cali-tw-`/`cali-fw-` chains ending in a
policy drop) sit beside kube-proxy's. The functions here only describe those objects;
`tracer.lab.build` makes them (and `calico_tunnel` loads the IP-in-IP programs).
"""

from __future__ import annotations

import hashlib

from tracer.lab import calico_tunnel
from tracer.lab.model import (K8S_NAMESPACE, UNDERLAY_MTU, UPLINK, LabConfig, NodePlan, PodPlan,
                              LabPlan, ip_mac, node_ip, node_netns, pod_cidr, pod_ip, pod_netns,
                              subnet_len, subnet_zero)

NAME = "calico"
GATEWAY = "169.254.1.1"           # every Calico pod's default gateway (link-local, on no device)
HOST_MAC = "ee:ee:ee:ee:ee:ee"    # every cali device's MAC, as Calico sets it
IPIP_DEVICE = calico_tunnel.IPIP_DEVICE
VXLAN_DEVICE = "vxlan.calico"
VXLAN_VNI = 4096                  # Felix's default VXLANVNI
VXLAN_PORT = 4789                 # Felix's default VXLANPort
VNI = VXLAN_VNI
OVERLAY = IPIP_DEVICE             # the default mode's; a node's own is NodePlan.overlay
HOP_DEVICE = None                 # no bridge: a pod's gateway lives on no device
ROUTE_PROTO = "bird"              # what BIRD marks the routes it installs with
# The lab's tunl0 is a plain device whose traffic two tc programs tunnel (calico_ipip.c, loaded
# by calico_tunnel, which says why).
TUNL0_IFINDEX = calico_tunnel.TUNL0_IFINDEX
MTUS = {"ipip": UNDERLAY_MTU - 20, "vxlan": UNDERLAY_MTU - 50, "routed": UNDERLAY_MTU}
OVERLAYS = {"ipip": IPIP_DEVICE, "vxlan": VXLAN_DEVICE, "routed": None}
NODES_STEP = "configuring nodes: cali devices, proxy ARP, routes, the tunnel, sysctls"
SERVICES_STEP = "programming kube-proxy Services and Felix's chains in iptables"
ACCEPT_MARK = "0x10000/0x10000"   # Felix's "policy accepted" mark bit


def cali_name(namespace: str, pod: str) -> str:
    """`cali` + 11 hex chars of sha1("ns.pod"): Calico's VethNameForWorkload."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def vxlan_mac(i: int) -> str:
    return f"66:c4:1c:00:00:{i:02x}"


def tunnel_ip(i: int) -> str:
    """The address Calico gives a node's tunnel device, from its own block."""
    return subnet_zero(4, i)


def plan(cfg: LabConfig) -> tuple[list[NodePlan], list[PodPlan]]:
    """Same nodes, pod CIDRs and pod IPs as flannel; every pod's gateway is 169.254.1.1."""
    mode, mtu = cfg.calico_mode, MTUS[cfg.calico_mode]
    nodes, pods = [], []
    for i in range(1, cfg.nodes + 1):
        uplink_mac = f"02:00:ac:1e:00:{10 + i:02x}"
        vx = mode == "vxlan"
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i), ip=node_ip(4, i),
            uplink_mac=uplink_mac, fabric_port=f"n{i}", pod_cidr=pod_cidr(4, i), gateway=GATEWAY,
            bridge_mac=HOST_MAC, overlay_ip=tunnel_ip(i) if vx else None,
            mac=vxlan_mac(i) if vx else None, pod_cidrs=(pod_cidr(4, i),), gateways=(GATEWAY,),
            overlay_ips=(tunnel_ip(i),) if vx else (), mtu=mtu, overlay=OVERLAYS[mode],
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ip = pod_ip(4, i, j)
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ip, mac=ip_mac(ip), gateway=GATEWAY,
                host_veth=cali_name(K8S_NAMESPACE, name), host_mac=HOST_MAC, ips=(ip,),
                gateways=(GATEWAY,), mtu=mtu,
            ))
    return nodes, pods


def filter_rules(family: int = 4) -> list[str]:
    """Felix's chains live per node (`node_filter_rules`): nothing common to every node."""
    return []


def node_filter_rules(topo: LabPlan, n: NodePlan) -> list[str]:
    """Felix's filter chains on one node (iptables-restore lines): FORWARD → cali-FORWARD,
    which dispatches traffic from and to each local workload's cali device to its chains;
    each ends in a drop unless a profile (here the namespace's allow-all) or a policy set the
    accept mark; FORWARD then accepts what carries it. Rule comments are Felix's."""
    pods = topo.pods_on(n.index)
    lines = ["*filter", ":cali-FORWARD - [0:0]", ":cali-from-wl-dispatch - [0:0]",
             ":cali-to-wl-dispatch - [0:0]", ":cali-pri-kns.default - [0:0]",
             ":cali-pro-kns.default - [0:0]"]
    for p in pods:
        lines += [f":cali-tw-{p.host_veth} - [0:0]", f":cali-fw-{p.host_veth} - [0:0]"]
    lines += [
        '-A FORWARD -m comment --comment "cali:wUHhoiAYhphO9Mso" -j cali-FORWARD',
        '-A FORWARD -m comment --comment "cali:S93hcgKJrXEqnTfs" -m comment --comment '
        f'"Policy explicitly accepted packet." -m mark --mark {ACCEPT_MARK} -j ACCEPT',
        '-A cali-FORWARD -m comment --comment "cali:vjrMJCRpqwy5oRoX" -j MARK --set-xmark 0x0/0xe0000',
        '-A cali-FORWARD -i cali+ -m comment --comment "cali:8ZoYfO5HKXWbB3pk" -j cali-from-wl-dispatch',
        '-A cali-FORWARD -o cali+ -m comment --comment "cali:jdEuaPBe14V2hutn" -j cali-to-wl-dispatch',
    ]
    for p in pods:
        lines += [f'-A cali-from-wl-dispatch -i {p.host_veth} -m comment --comment "cali:from {p.key}" '
                  f"-g cali-fw-{p.host_veth}",
                  f'-A cali-to-wl-dispatch -o {p.host_veth} -m comment --comment "cali:to {p.key}" '
                  f"-g cali-tw-{p.host_veth}"]
    lines += ['-A cali-from-wl-dispatch -m comment --comment "Unknown interface" -j DROP',
              '-A cali-to-wl-dispatch -m comment --comment "Unknown interface" -j DROP']
    for kind, profile in (("tw", "cali-pri-kns.default"), ("fw", "cali-pro-kns.default")):
        for p in pods:
            ch = f"cali-{kind}-{p.host_veth}"
            lines += [
                f"-A {ch} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                f"-A {ch} -m conntrack --ctstate INVALID -j DROP",
                f"-A {ch} -j MARK --set-xmark 0x0/0x10000",
                f"-A {ch} -j {profile}",
                f'-A {ch} -m mark --mark {ACCEPT_MARK} -m comment --comment "Return if profile accepted" -j RETURN',
                f'-A {ch} -m comment --comment "Drop if no profiles matched" -j DROP',
            ]
        lines += [f'-A {profile} -m comment --comment "profile kns.default: allow" -j MARK --set-xmark {ACCEPT_MARK}',
                  f"-A {profile} -m mark --mark {ACCEPT_MARK} -j RETURN"]
    return lines + ["COMMIT"]


def status_fields() -> dict:
    """Lab-wide fields of the status document besides the common ones."""
    return {}


def status_node(n: NodePlan) -> dict:
    """Per node, `bridge` is null (pods hang off cali devices, their gateway is on none);
    `overlay` is the mode's tunnel device (null when routed). `overlay_ip` and `mac` are the
    VXLAN tunnel address and VTEP MAC (null outside VXLAN mode: IP-in-IP and routed next hops
    are the peers' underlay addresses)."""
    return {
        "name": n.name, "index": n.index, "netns": n.netns, "ip": n.ip,
        "pod_cidr": n.pod_cidr, "uplink": UPLINK, "overlay": n.overlay,
        "bridge": None, "mac": n.mac, "overlay_ip": n.overlay_ip,
        "tunnel_ip": tunnel_ip(n.index) if n.overlay else None,
        "gateway": n.gateway, "uplink_mac": n.uplink_mac, "bridge_mac": n.bridge_mac,
        "fabric_port": n.fabric_port,
        "ips": [n.ip], "pod_cidrs": list(n.pod_cidrs), "gateways": list(n.gateways),
        "overlay_ips": list(n.overlay_ips),
    }


def status_pod_fields(p: PodPlan) -> dict:
    """Pod fields of the status document besides the common ones (after `host_veth`)."""
    return {"host_mac": p.host_mac}


def node_annotations(n: NodePlan) -> dict:
    """What calico-node writes on its node."""
    out = {"projectcalico.org/IPv4Address": f"{n.ip}/{subnet_len(4)}"}
    if n.overlay == IPIP_DEVICE:
        out["projectcalico.org/IPv4IPIPTunnelAddr"] = tunnel_ip(n.index)
    elif n.overlay == VXLAN_DEVICE:
        out["projectcalico.org/IPv4VXLANTunnelAddr"] = tunnel_ip(n.index)
        out["projectcalico.org/VXLANTunnelMACAddr"] = n.mac
    return out


def node_sysctls(n: NodePlan) -> dict[str, str]:
    """Set before the node's devices exist (/proc/sys paths)."""
    return {"net/ipv4/ip_forward": "1"}


def node_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a Calico node."""
    lines = [
        "link set lo up",
        f"addr add {n.ip}/{subnet_len(4)} dev {UPLINK}",
        f"link set {UPLINK} up",
        # Proxy ARP answers for 169.254.1.1 only when the node routes it elsewhere than the
        # asking device: on a real node the default route does; the lab's nodes have none.
        f"route add {GATEWAY}/32 dev {UPLINK} scope link",
    ]
    if n.overlay == IPIP_DEVICE:
        # A device of the lab's own whose traffic calico_ipip.c tunnels (see calico_tunnel);
        # NOARP like the ipip driver's tunl0, with the uplink's MAC so that decapsulated
        # frames are addressed to it.
        lines += [f"link add {IPIP_DEVICE} index {TUNL0_IFINDEX} address {n.uplink_mac} "
                  f"mtu {n.mtu} type ifb",
                  f"link set {IPIP_DEVICE} arp off",
                  f"addr add {tunnel_ip(n.index)}/32 dev {IPIP_DEVICE}",
                  f"link set {IPIP_DEVICE} up"]
    elif n.overlay == VXLAN_DEVICE:
        lines += [f"link add {VXLAN_DEVICE} address {n.mac} mtu {n.mtu} type vxlan id {VXLAN_VNI} "
                  f"dstport {VXLAN_PORT} local {n.ip} dev {UPLINK} nolearning",
                  f"addr add {tunnel_ip(n.index)}/32 dev {VXLAN_DEVICE}",
                  f"link set {VXLAN_DEVICE} up"]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} address {HOST_MAC} mtu {n.mtu} type veth peer name eth0 "
            f"address {p.mac} mtu {n.mtu} netns {p.netns}",
            f"link set {p.host_veth} up",
            f"route add {p.ip}/32 dev {p.host_veth} scope link",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        if n.overlay == IPIP_DEVICE:
            lines.append(f"route add {k.pod_cidr} via {k.ip} dev {IPIP_DEVICE} onlink proto {ROUTE_PROTO}")
        elif n.overlay == VXLAN_DEVICE:
            lines += [f"route add {k.pod_cidr} via {k.overlay_ip} dev {VXLAN_DEVICE} onlink",
                      f"neigh add {k.overlay_ip} lladdr {k.mac} dev {VXLAN_DEVICE} nud permanent"]
        else:
            lines.append(f"route add {k.pod_cidr} via {k.ip} dev {UPLINK} proto {ROUTE_PROTO}")
    return lines


def fdb_batch(topo: LabPlan, n: NodePlan) -> list[str]:
    if n.overlay != VXLAN_DEVICE:
        return []
    return [f"fdb append {k.mac} dev {VXLAN_DEVICE} dst {k.ip}"
            for k in topo.nodes if k.index != n.index]


def node_sysctls_after(topo: LabPlan, n: NodePlan) -> dict[str, str]:
    """What Felix sets on each cali device: proxy ARP answered at once, strict reverse-path
    filtering; and IPv6 off on it."""
    values = {}
    for p in topo.pods_on(n.index):
        values |= {f"net/ipv4/conf/{p.host_veth}/proxy_arp": "1",
                   f"net/ipv4/neigh/{p.host_veth}/proxy_delay": "0",
                   f"net/ipv4/conf/{p.host_veth}/rp_filter": "1"}
    return values


def node_checks(n: NodePlan) -> dict[str, tuple[str, str]]:
    """Sysctls that must read back a value once the node is built: {key: (value, why not)}."""
    return {}


def pod_batch(p: PodPlan) -> list[str]:
    """A Calico pod: its /32 and the two routes Calico's CNI plugin installs."""
    return ["link set lo up",
            f"addr add {p.ip}/32 dev eth0",
            "link set eth0 up",
            f"route add {GATEWAY} dev eth0 scope link",
            f"route add default via {GATEWAY} dev eth0"]


def attach_programs(topo: LabPlan) -> None:
    """Once the nodes' devices exist: the IP-in-IP tunnel's programs (ipip mode only)."""
    calico_tunnel.attach(topo)
