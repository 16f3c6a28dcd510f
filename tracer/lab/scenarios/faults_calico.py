"""Break actions of the calico lab: a Felix policy drop, proxy ARP off, a withdrawn BGP route,
IP-in-IP blocked on the underlay."""

from __future__ import annotations

from tracer.errors import BadInput
from tracer.lab import calico
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios import faults
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab

POLICY_CHAIN = "cali-pi-default.deny-all"     # a NetworkPolicy default/deny-all with no rule
UNDERLAY_TABLE = "podtrace_underlay"          # the fabric's bridge-family nftables table


def _host_veth(lab: Lab, pod: str) -> str:
    return next(p["host_veth"] for p in lab.doc["pods"] if p["name"] == pod)


def _mode(lab: Lab) -> str:
    return lab.doc.get("calico_mode", "ipip")


def felix_policy_drop(ch: Changes, lab: Lab, node: str) -> None:
    """A policy (deny-all: no rule allows anything) now selects the node's first pod: Felix
    jumps to its chain from the pod's to-workload chain and drops what no policy passed."""
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    tw = f"cali-tw-{_host_veth(lab, target.name)}"
    drop = f'-m mark --mark 0x0/0x10000 -m comment --comment "Drop if no policies passed packet" -j DROP'
    doc = (f"*filter\n:{POLICY_CHAIN} - [0:0]\n"
           f"-I {tw} 4 {drop}\n-I {tw} 4 -j {POLICY_CHAIN}\nCOMMIT\n")
    undo = f"*filter\n-D {tw} -j {POLICY_CHAIN}\n-D {tw} {drop}\n-X {POLICY_CHAIN}\nCOMMIT\n"
    ch.iptables_restore(n.netns, doc, undo,
                        f"{node}: Felix policy chain {POLICY_CHAIN} (deny-all) applied to {target.name}: "
                        f"{tw} drops what no policy passed")


def proxy_arp_off(ch: Changes, lab: Lab, node: str) -> None:
    """proxy_arp=0 on the cali device of the node's first pod: nobody answers its ARP for
    169.254.1.1 any more (its cached entry is flushed so that it asks at once)."""
    src = lab.pods_on(node)[0]
    veth = _host_veth(lab, src.name)
    ch.sysctl(lab.node(node).netns, f"net/ipv4/conf/{veth}/proxy_arp", "0", node)
    flush = ["ip", "-n", src.netns, "neigh", "flush", "to", calico.GATEWAY, "dev", "eth0"]
    ch.run(flush, f"{src.name}: neighbour entry for {calico.GATEWAY} flushed", flush)


def bgp_route_withdrawn(ch: Changes, lab: Lab, node: str) -> None:
    """The route BIRD installed for the peer node's block, gone as when its BGP session drops."""
    if _mode(lab) == "vxlan":
        raise BadInput("bgp-route-withdrawn needs BGP routes: the vxlan mode's routes are Felix's",
                       "use a lab with --calico-mode routed or ipip, or the no-route scenario")
    faults.no_route(ch, lab, node)


def ipip_blocked(ch: Changes, lab: Lab, node: str) -> None:
    """The underlay drops IP protocol 4 towards a node (a security group without IP-in-IP):
    a bridge-family nftables rule on the fabric switch port of that node."""
    if _mode(lab) != "ipip":
        raise BadInput(f"ipip-blocked needs the IP-in-IP tunnel; this lab is {_mode(lab)}",
                       "use a lab made with --cni calico --calico-mode ipip")
    n = lab.node(node)
    doc = (f"table bridge {UNDERLAY_TABLE} {{\n  chain forward {{\n"
           f"    type filter hook forward priority 0; policy accept;\n"
           f'    oifname "{n.fabric_port}" ip protocol 4 counter drop\n  }}\n}}\n')
    ch.run(["ip", "netns", "exec", lab.fabric_netns, "nft", "-f", "-"],
           f"underlay: bridge table {UNDERLAY_TABLE} drops IP protocol 4 (IP-in-IP) towards {node} "
           f"(port {n.fabric_port})",
           ["ip", "netns", "exec", lab.fabric_netns, "nft", "delete", "table", "bridge", UNDERLAY_TABLE],
           input=doc, undo_ok=["No such file or directory"])


__all__ = ["bgp_route_withdrawn", "felix_policy_drop", "ipip_blocked", "proxy_arp_off", "C"]
