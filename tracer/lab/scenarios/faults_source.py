"""Break actions inside a source pod: its default route, a small locked route MTU, its gateway's ARP.

Each takes the `Changes` recorder, the lab and the node whose first pod is the source, and
makes the same kernel objects a real pod would have when that fault happens.
"""

from __future__ import annotations

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.faults import route_line
from tracer.lab.scenarios.labdoc import Lab

# pod-pmtu: the MTU locked on the pod's route to its peer (a probe of POD_MTU cannot leave)
PMTU = 1000
# pod-gw-neigh: the nftables table (netdev family, on the pod's node-side device) dropping its ARP
ARP_TABLE = "podtrace_lab_arp"


def _source(lab: Lab, node: str):
    """(source pod, destination pod): the node's first pod and the peer node's first pod."""
    return lab.pods_on(node)[0], lab.pods_on(lab.peer(node).name)[0]


def _gateway(pod) -> str:
    routes = C.ip_json(pod.netns, "route", "show", "default")
    if not routes or not routes[0].get("gateway"):
        raise EnvironmentProblem(f"{pod.name} has no default route through a gateway")
    return routes[0]["gateway"]


def pod_no_route(ch: Changes, lab: Lab, node: str) -> None:
    pod, _ = _source(lab, node)
    routes = C.ip_json(pod.netns, "route", "show", "default")
    if not routes:
        raise EnvironmentProblem(f"{pod.name} has no default route to remove")
    for route in routes:
        words = route_line(route)
        ch.run(["ip", "-n", pod.netns, "route", "del", *words],
               f"{pod.name}: removed its route {' '.join(words)}",
               ["ip", "-n", pod.netns, "route", "replace", *words])


def pod_pmtu(ch: Changes, lab: Lab, node: str) -> None:
    pod, dst = _source(lab, node)
    route = [f"{dst.ip}/32", "via", _gateway(pod), "dev", "eth0", "mtu", "lock", str(PMTU)]
    ch.run(["ip", "-n", pod.netns, "route", "add", *route],
           f"{pod.name}: route {' '.join(route)} (a path MTU of {PMTU} to {dst.name}, locked)",
           ["ip", "-n", pod.netns, "route", "del", f"{dst.ip}/32"], undo_ok=["No such process"])


def pod_gw_neigh(ch: Changes, lab: Lab, node: str) -> None:
    pod, _ = _source(lab, node)
    gw = _gateway(pod)
    veth = next(p.get("host_veth") for p in lab.doc["pods"] if p["name"] == pod.name)
    n = lab.node(node)
    # Both ways: the node's own ARP requests for the pod would otherwise teach the pod its
    # gateway's MAC (a request's sender is learned), and the fault would come and go.
    table = (f"table netdev {ARP_TABLE} {{\n"
             + "".join(f"  chain {hook} {{\n    type filter hook {hook} device \"{veth}\" priority 0; "
                       "policy accept;\n    ether type arp drop\n  }\n" for hook in ("ingress", "egress"))
             + "}\n")
    nft = ["ip", "netns", "exec", n.netns, "nft"]
    ch.run([*nft, "-f", "-"], f"{node}: nftables table netdev {ARP_TABLE} drops every ARP frame "
           f"to and from {pod.name} ({veth} ingress and egress): it cannot resolve its gateway {gw}",
           [*nft, "delete", "table", "netdev", ARP_TABLE], input=table, undo_ok=["No such file"])
    # The entry the pod had learned ages out on its own; forget it now so the fault shows at once
    # (and again on fix, so the pod resolves its gateway afresh instead of waiting out FAILED).
    flush = ["ip", "-n", pod.netns, "neigh", "flush", "to", gw, "dev", "eth0"]
    ch.run(flush, f"{pod.name}: forgot its neighbour entry for {gw} (as when it ages out)", flush)
