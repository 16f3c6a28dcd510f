"""Break actions whose packets reach the destination pod, then die in its own stack.

`pod-input-drop` puts a DROP rule in the INPUT chain of the pod's own namespace;
`pod-mac-wrong` points the node's neighbour entry for the pod's address at a MAC no pod has,
so the frames that reach the pod are addressed to another host (OTHERHOST).
"""

from __future__ import annotations

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab

# pod-mac-wrong: the MAC the neighbour entry gets (locally administered, no pod's)
WRONG_POD_MAC = "0e:00:00:00:ee:{index:02x}"


def pod_input_drop(ch: Changes, lab: Lab, node: str) -> None:
    target = lab.pods_on(node)[0]
    client = lab.client_for(node)
    rule = (f'INPUT -s {client.ip}/32 -m comment --comment "drop traffic from {client.name}" -j DROP')
    ch.iptables_restore(
        target.netns, f"*filter\n-I {rule.replace('INPUT', 'INPUT 1', 1)}\nCOMMIT\n",
        f"*filter\n-D {rule}\nCOMMIT\n",
        f"{target.name} (on {node}): filter/INPUT rule 1 in the pod's own namespace drops traffic "
        f"from {client.name} ({client.ip})")


def pod_mac_wrong(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    route = C.ip_json(n.netns, "route", "get", target.ip)
    dev = route[0].get("dev") if route else None
    if not dev:
        raise EnvironmentProblem(f"{node} has no route to {target.name} ({target.ip})")
    found = C.ip_json(n.netns, "neigh", "show", target.ip, "dev", dev)
    old = found[0] if found and found[0].get("lladdr") else None
    index = lab.pods.index(target) + 1
    wrong = WRONG_POD_MAC.format(index=index)
    base = ["ip", "-n", n.netns, "neigh", "replace", target.ip, "lladdr"]
    if old is not None and "PERMANENT" in (old.get("state") or []):
        undo = base + [old["lladdr"], "dev", dev, "nud", "permanent"]
    else:
        # a learned entry: removing it lets ARP learn the right MAC again
        undo = ["ip", "-n", n.netns, "neigh", "del", target.ip, "dev", dev]
    ch.run(base + [wrong, "dev", dev, "nud", "permanent"],
           f"{node}: neighbour {target.ip} dev {dev} lladdr {old['lladdr'] if old else '(none)'} -> {wrong} "
           f"permanent ({target.name}'s eth0 has another MAC)",
           undo, undo_ok=["No such file or directory"])
