"""The hostPort DNAT break action: a DNAT the inventory does not know, replies bridged past it.

A CNI portmap plugin publishes a pod's hostPort with nat rules on the pod's node
(CNI-HOSTPORT-DNAT, jumped to from PREROUTING for local addresses). No Service or
EndpointSlice names that DNAT. With net.bridge.bridge-nf-call-iptables=0 on the node, the
target's replies to a client on the same bridge are bridged without passing conntrack, so
they reach the client from the pod's own address instead of the node's.
"""

from __future__ import annotations

from tracer.errors import EnvironmentProblem
from tracer.lab import topology as T
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab, Pod

HOST_PORT = 30080
CHAIN = "CNI-HOSTPORT-DNAT"
_JUMP = f"PREROUTING -m addrtype --dst-type LOCAL -j {CHAIN}"


def target(lab: Lab, node: str) -> Pod:
    """The pod whose application port the hostPort publishes (the node's first pod)."""
    return lab.pods_on(node)[0]


def client(lab: Lab, node: str) -> Pod:
    """A client on the same node and bridge as the target (the node's second pod)."""
    return lab.pods_on(node)[1]


def hostport_rules(lab: Lab, node: str) -> list[str]:
    """The DNAT rules of the hostPort (UDP and TCP), as iptables-save writes them."""
    n, pod = lab.node(node), target(lab, node)
    return [f'-A {CHAIN} -d {n.ip}/32 -p {proto} -m {proto} --dport {HOST_PORT} -m comment --comment '
            f'"hostPort {HOST_PORT}/{proto} of {pod.name}" -j DNAT --to-destination {pod.ip}:{T.APP_PORT}'
            for proto in ("udp", "tcp")]


def hostport_dnat(ch: Changes, lab: Lab, node: str) -> None:
    """The portmap plugin's nat rules for a hostPort of the node's first pod."""
    n = lab.node(node)
    if CHAIN in C.chains(C.iptables_save(n.netns, "nat")):
        raise EnvironmentProblem(f"nat chain {CHAIN} already exists on {node}")
    rules = hostport_rules(lab, node)
    ch.iptables_restore(
        n.netns, f"*nat\n:{CHAIN} - [0:0]\n" + "\n".join(rules) + f"\n-I {_JUMP.replace('PREROUTING', 'PREROUTING 1', 1)}\nCOMMIT\n",
        f"*nat\n-D {_JUMP}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n",
        f"{node}: nat chain {CHAIN} (from PREROUTING): {n.ip}:{HOST_PORT} udp/tcp DNAT to "
        f"{target(lab, node).name} ({target(lab, node).ip}:{T.APP_PORT}), a hostPort no Service names")


def hostport_unreversed(ch: Changes, lab: Lab, node: str) -> None:
    hostport_dnat(ch, lab, node)
    ch.sysctl(lab.node(node).netns, "net/bridge/bridge-nf-call-iptables", "0", node)
