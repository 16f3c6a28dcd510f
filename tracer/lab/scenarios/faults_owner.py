"""The break action of `pod-ip-gone`: a pod's address gone from its eth0, the pod still listed.

What a node shows after a pod's sandbox died and was not yet recreated: the pod object is
still in the API (its status no longer reports an address), the address is in the node's pod
CIDR, routes to it still lead into the node, and nothing answers the node's ARP for it.
"""

from __future__ import annotations

import json

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab, Pod


def target(lab: Lab, node: str) -> Pod:
    """The pod whose address goes: the last pod of `node`."""
    return lab.pods_on(node)[-1]


def _route_argv(ns: str, r: dict) -> list[str]:
    argv = ["ip", "-n", ns, "route", "replace", r["dst"]]
    if r.get("gateway"):
        argv += ["via", r["gateway"]]
    argv += ["dev", r["dev"]]
    if r.get("scope") and r["scope"] != "global":
        argv += ["scope", r["scope"]]
    for m in r.get("metrics") or []:
        argv += [k for kv in m.items() for k in (kv[0], str(kv[1]))]
    if "onlink" in (r.get("flags") or []):
        argv.append("onlink")
    return argv


def pod_ip_gone(ch: Changes, lab: Lab, node: str) -> None:
    pod = target(lab, node)
    addrs = [a for link in C.ip_json(pod.netns, "addr", "show", "dev", "eth0")
             for a in link.get("addr_info", []) if a.get("family") == "inet" and a.get("local") == pod.ip]
    if not addrs:
        raise EnvironmentProblem(f"{pod.name} has no address {pod.ip} on eth0 to remove")
    plen = addrs[0]["prefixlen"]
    before = [r for r in C.ip_json(pod.netns, "route", "show") if r.get("protocol") != "kernel"]
    # The routes the kernel drops with the address come back after it (undo runs last first).
    for r in before:
        ch.did(f"{pod.name}: route {r['dst']} (removed by the kernel with the address)",
               {"op": "cmd", "argv": _route_argv(pod.netns, r), "input": None, "ok": []})
    ch.run(["ip", "-n", pod.netns, "addr", "del", f"{pod.ip}/{plen}", "dev", "eth0"],
           f"{node}: {pod.name}'s address {pod.ip}/{plen} removed from its eth0 (its sandbox died)",
           ["ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/{plen}", "dev", "eth0"],
           undo_ok=["File exists"])
    # What the API server shows meanwhile: the pod, without an address, not ready.
    path = lab.inventory
    original = path.read_text()
    inv = json.loads(original)
    for item in inv["items"]:
        md = item.get("metadata", {})
        if item.get("kind") == "Pod" and md.get("name") == pod.name:
            st = item.setdefault("status", {})
            st.pop("podIP", None)
            st.pop("podIPs", None)
            for c in st.get("conditions") or []:
                if c.get("type") in ("Ready", "ContainersReady"):
                    c["status"] = "False"
            for cs in st.get("containerStatuses") or []:
                cs["ready"] = False
                cs["restartCount"] = int(cs.get("restartCount", 0)) + 1
            md["resourceVersion"] = str(int(md.get("resourceVersion", "1")) + 1)
    C.write_file(path, json.dumps(inv, indent=2) + "\n")
    ch.did(f"inventory: pod {pod.name} has no podIP (not ready, restarting)",
           {"op": "file", "path": str(path), "content": original})
    # The node forgets the pod's MAC, as when the pod's veth goes with its sandbox: a dynamic
    # cache entry the node relearns by itself once the pod answers again (nothing to restore).
    C.run_cmd(["ip", "-n", lab.node(node).netns, "neigh", "flush", "to", pod.ip])
