"""Break actions whose cause only node facts prove: a dead pod link, a native nftables drop, an overlay INPUT drop.

Each takes the `Changes` recorder, the lab and the node it acts on, and makes the kernel
objects a real node would have when that fault happens; `fix` undoes exactly that.
"""

from __future__ import annotations

from tracer.errors import EnvironmentProblem
from tracer.lab import topology as T
from tracer.lab.scenarios import changes as C, faults
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab

# nft-native-drop: the native table and its base chain ("fwd" is a keyword of nft's parser).
NFT_TABLE = "ptfault"
NFT_CHAIN = "ptfwd"


def _host_veth(lab: Lab, pod: str) -> str:
    veth = next((p.get("host_veth") for p in lab.doc["pods"] if p["name"] == pod), None)
    if not veth:
        raise EnvironmentProblem(f"the lab's status does not name the host-side device of {pod}")
    return veth


def link_down(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    veth = _host_veth(lab, target.name)
    link = C.ip_json(n.netns, "link", "show", "dev", veth)
    if not link or "UP" not in link[0].get("flags", []):
        raise EnvironmentProblem(f"{node}'s {veth} is not up")
    # Setting a device down deletes the routes and permanent neighbour entries through it
    # (Cilium's per-endpoint route and entry): `fix` puts them back once the link is up again
    # (undo runs the last change first).
    for route in C.ip_json(n.netns, "route", "show", "table", "all", "dev", veth):
        if route.get("type", "unicast") != "unicast":
            continue
        words = faults.route_line({**route, "dev": veth})
        if route.get("table") and route["table"] != "main":
            words += ["table", str(route["table"])]
        ch.did(f"{node}: route {' '.join(words)} goes with the link",
               {"op": "cmd", "argv": ["ip", "-n", n.netns, "route", "replace", *words], "input": None, "ok": []})
    for entry in C.ip_json(n.netns, "neigh", "show", "dev", veth, "nud", "permanent"):
        words = [entry["dst"], "lladdr", entry["lladdr"], "dev", veth, "nud", "permanent"]
        ch.did(f"{node}: neighbour {' '.join(words)} goes with the link",
               {"op": "cmd", "argv": ["ip", "-n", n.netns, "neigh", "replace", *words], "input": None, "ok": []})
    ch.run(["ip", "-n", n.netns, "link", "set", "dev", veth, "down"],
           f"{node}: link {veth} (the host side of {target.name}'s eth0) set down",
           ["ip", "-n", n.netns, "link", "set", "dev", veth, "up"],
           restored=f"{node}: link {veth} (the host side of {target.name}'s eth0) down → up")


def nft_native_drop(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    listed = C.run_cmd(["ip", "netns", "exec", n.netns, "nft", "list", "tables"])
    if f"table inet {NFT_TABLE}" in listed.splitlines():
        raise EnvironmentProblem(f"table inet {NFT_TABLE} already exists on {node}")
    doc = (f"table inet {NFT_TABLE} {{\n  chain {NFT_CHAIN} {{\n"
           f"    type filter hook forward priority -5; policy accept;\n"
           f"    ip daddr {target.ip} counter drop\n  }}\n}}\n")
    ch.run(["ip", "netns", "exec", n.netns, "nft", "-f", "-"],
           f"{node}: native nftables table inet {NFT_TABLE}, chain {NFT_CHAIN} (hook forward, priority -5): "
           f"ip daddr {target.ip} counter drop",
           ["ip", "netns", "exec", n.netns, "nft", "delete", "table", "inet", NFT_TABLE],
           input=doc, undo_ok=["No such file or directory"])


def overlay_input_drop(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    rule = f"INPUT -p udp -m udp --dport {T.VXLAN_PORT} -j DROP"
    ch.iptables_restore(n.netns, f"*filter\n-A {rule}\nCOMMIT\n", f"*filter\n-D {rule}\nCOMMIT\n",
                        f"{node}: filter INPUT drops UDP port {T.VXLAN_PORT} (the overlay's VXLAN packets)")
