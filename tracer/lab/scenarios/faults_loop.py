"""Break actions that make a routing loop, or a REJECT answering with an ICMP error.

Each takes the `Changes` recorder, the lab and the node it acts on, and makes the same
kernel objects a real node would have when that fault happens.
"""

from __future__ import annotations

from tracer.lab import topology as T
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab

# routing-loop: a pod CIDR no node owns (a node removed, its CIDR still routed).
LOOP_CIDR = "10.244.99.0/24"
LOOP_DST = "10.244.99.5"


def routing_loop(ch: Changes, lab: Lab, node: str) -> None:
    """`node` routes LOOP_CIDR over the overlay to its peer, and the peer routes it back."""
    n = lab.node(node)
    peer = lab.peer(node)
    for here, there in ((n, peer), (peer, n)):
        route = [LOOP_CIDR, "via", there.overlay_ip, "dev", T.OVERLAY, "onlink"]
        ch.run(["ip", "-n", here.netns, "route", "add", *route],
               f"{here.name}: route {' '.join(route)} (towards {there.name})",
               ["ip", "-n", here.netns, "route", "del", LOOP_CIDR], undo_ok=["No such process"])


def icmp_prohibited(ch: Changes, lab: Lab, node: str) -> None:
    """FORWARD on `node` rejects traffic to its first pod with ICMP admin-prohibited."""
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    rule = (f'FORWARD -d {target.ip}/32 -m comment --comment "deny {target.name}" '
            "-j REJECT --reject-with icmp-admin-prohibited")
    ch.iptables_restore(n.netns, f"*filter\n-I {rule.replace('FORWARD', 'FORWARD 1', 1)}\nCOMMIT\n",
                        f"*filter\n-D {rule}\nCOMMIT\n",
                        f"{node}: filter FORWARD rule 1 REJECTs traffic to {target.name} ({target.ip}) "
                        "with icmp-admin-prohibited")

