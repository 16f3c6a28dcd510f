"""The non-conntrack break actions: iptables, sysctls, routes, neighbours, FDB, MTU.

Each takes the `Changes` recorder, the lab and the node it acts on, and makes the same
kernel objects a real node would have when that fault happens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab import topology as T
from tracer.lab.model import hash16
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios import faults_proxy
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab
from tracer.node import netns

# mtu-blackhole: what the underlay (the fabric switch port) really carries.
BLACKHOLE_MTU = T.UNDERLAY_MTU - 50
# neigh-wrong: the VTEP MAC a peer's flannel.1 "had before it was recreated".
_STALE_VTEP_MAC = "0e:00:00:00:f0:{index:02x}"


def netpol_drop(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    policy = f"deny-ingress-{target.name}"
    chain = "KUBE-NWPLCY-" + hash16(T.K8S_NAMESPACE + policy)
    fam = lab.family
    if chain in C.chains(C.iptables_save(n.netns, "filter", fam)):
        raise EnvironmentProblem(f"filter chain {chain} already exists on {node}")
    host = "32" if fam == 4 else "128"
    jump = (f'FORWARD -d {target.ip}/{host} -m comment --comment "rule to jump traffic destined to '
            f'POD name:{target.name} namespace: {T.K8S_NAMESPACE} to chain {chain}" -j {chain}')
    drop = (f'{chain} -d {target.ip}/{host} -m comment --comment "rule to DROP traffic destined for '
            f'POD name:{target.name} namespace: {T.K8S_NAMESPACE} '
            f'(NetworkPolicy {T.K8S_NAMESPACE}/{policy})" -j DROP')
    ch.iptables_restore(
        n.netns,
        f"*filter\n:{chain} - [0:0]\n-A {drop}\n-I {jump.replace('FORWARD', 'FORWARD 1', 1)}\nCOMMIT\n",
        f"*filter\n-D {jump}\n-F {chain}\n-X {chain}\nCOMMIT\n",
        f"{node}: {'' if fam == 4 else 'ip6tables '}filter chain {chain} dropping traffic to "
        f"{target.name} ({target.ip}), jumped to from FORWARD (rule 1)", family=fam)


def ip_forward_off(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    if lab.family == 6:
        # Writing all.forwarding rewrites default's and every device's `forwarding`
        # (addrconf_fixup_forwarding): record them so `fix` restores them exactly.
        with netns.entered(n.netns):
            confs = sorted(p.name for p in Path("/proc/sys/net/ipv6/conf").iterdir())
        also = [f"net/ipv6/conf/{c}/forwarding" for c in confs if c != "all"]
        ch.sysctl(n.netns, "net/ipv6/conf/all/forwarding", "0", node, also=also)
        return
    # Writing ip_forward also rewrites every device's `forwarding` and all.accept_redirects
    # (inet_forward_change): record them so `fix` restores them exactly.
    with netns.entered(n.netns):
        confs = sorted(p.name for p in Path("/proc/sys/net/ipv4/conf").iterdir())
    also = [f"net/ipv4/conf/{c}/forwarding" for c in confs] + ["net/ipv4/conf/all/accept_redirects"]
    ch.sysctl(n.netns, "net/ipv4/ip_forward", "0", node, also=also)


def br_netfilter_off(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    ch.sysctl(n.netns, "net/bridge/bridge-nf-call-iptables", "0", node)


def rp_filter_strict(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    client = lab.client_for(node)
    via = lab.node(client.node)
    route = [f"{client.ip}/32", "via", via.ip, "dev", T.UPLINK]
    ch.run(["ip", "-n", n.netns, "route", "add", *route],
           f"{node}: route {' '.join(route)} (replies to {client.name} leave through the "
           f"underlay, not flannel.1)",
           ["ip", "-n", n.netns, "route", "del", *route], undo_ok=["No such process"])
    ch.sysctl(n.netns, "net/ipv4/conf/all/rp_filter", "1", node)


def mtu_blackhole(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    fab = lab.fabric_netns
    links = {link["ifname"]: link for link in C.ip_json(fab, "link", "show")}
    port = links[n.fabric_port]
    old = int(port["mtu"])
    ch.run(["ip", "-n", fab, "link", "set", "dev", n.fabric_port, "mtu", str(BLACKHOLE_MTU)],
           f"fabric: switch port {n.fabric_port} (to {node}'s {T.UPLINK}) MTU {old} -> "
           f"{BLACKHOLE_MTU}, while {node} still sends {T.UNDERLAY_MTU}-byte frames",
           ["ip", "-n", fab, "link", "set", "dev", n.fabric_port, "mtu", str(old)],
           restored=f"fabric: switch port {n.fabric_port} (to {node}'s {T.UPLINK}) MTU "
                    f"{BLACKHOLE_MTU} → {old}")


def route_line(route: dict) -> list[str]:
    """`ip -j route` entry → arguments for `ip route replace`."""
    words = [route["dst"]]
    if route.get("gateway"):
        words += ["via", route["gateway"]]
    words += ["dev", route["dev"]]
    for key in ("protocol", "scope"):
        if route.get(key) and route[key] not in ("boot", "global"):
            words += [{"protocol": "proto"}.get(key, key), route[key]]
    if route.get("prefsrc"):
        words += ["src", route["prefsrc"]]
    if route.get("metric"):
        words += ["metric", str(route["metric"])]
    for m in route.get("metrics") or []:          # e.g. the cilium lab's `mtu 1450`
        for key, value in m.items():
            words += [key, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    if "onlink" in route.get("flags", []):
        words.append("onlink")
    return words


def no_route(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    routes = C.ip_json(n.netns, *(["-6"] if lab.family == 6 else []), "route", "show", "exact",
                       peer.pod_cidr)
    if not routes:
        raise EnvironmentProblem(f"{node} has no route to {peer.pod_cidr} to remove")
    for route in routes:
        words = route_line(route)
        ch.run(["ip", "-n", n.netns, "route", "del", *words],
               f"{node}: removed route {' '.join(words)} (to {peer.name}'s pods)",
               ["ip", "-n", n.netns, "route", "replace", *words])


def fdb_missing(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    entries = [e for e in json.loads(C.run_cmd(["bridge", "-n", n.netns, "-j", "fdb", "show", "dev",
                                           T.OVERLAY]) or "[]")
               if e.get("mac") == peer.mac]
    if not entries:
        raise EnvironmentProblem(f"{node} has no FDB entry for {peer.name}'s VTEP MAC {peer.mac}")
    for e in entries:
        where = ["dst", e["dst"]] if e.get("dst") else []
        flags = [f for f in e.get("flags", []) if f in ("self", "master", "router", "use", "extern_learn")]
        state = [e["state"]] if e.get("state") in ("permanent", "static", "dynamic") else []
        ch.run(["bridge", "-n", n.netns, "fdb", "del", peer.mac, "dev", T.OVERLAY, *where, *flags],
               f"{node}: removed FDB entry {peer.mac} dev {T.OVERLAY} {' '.join(where + flags + state)} "
               f"({peer.name}'s VTEP)",
               ["bridge", "-n", n.netns, "fdb", "append", peer.mac, "dev", T.OVERLAY, *where, *flags, *state],
               undo_ok=["File exists"])


def neigh_wrong(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    found = C.ip_json(n.netns, *(["-6"] if lab.family == 6 else []), "neigh", "show",
                      peer.overlay_ip, "dev", T.OVERLAY)
    if not found or not found[0].get("lladdr"):
        raise EnvironmentProblem(f"{node} has no neighbour entry for {peer.overlay_ip} on {T.OVERLAY}")
    old = found[0]["lladdr"]
    state = (found[0].get("state") or ["PERMANENT"])[0].lower()
    wrong = _STALE_VTEP_MAC.format(index=peer.index)
    base = ["ip", "-n", n.netns, "neigh", "replace", peer.overlay_ip, "lladdr"]
    ch.run(base + [wrong, "dev", T.OVERLAY, "nud", state],
           f"{node}: neighbour {peer.overlay_ip} dev {T.OVERLAY} lladdr {old} -> {wrong} "
           f"({peer.name}'s VTEP is {peer.mac})",
           base + [old, "dev", T.OVERLAY, "nud", state],
           restored=f"{node}: neighbour {peer.overlay_ip} dev {T.OVERLAY} lladdr {wrong} → {old}")


def svc_no_endpoints(ch: Changes, lab: Lab, node: str | None) -> None:
    svc = lab.web()
    key = f"{svc['namespace']}/{svc['name']}"
    vip = svc["cluster_ip"]
    svc_chains = {p["chain"] for p in svc["ports"]}
    sep_chains = {c for p in svc["ports"] for c in p["endpoint_chains"].values()}
    portals = ('-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
               "-j KUBE-SERVICES")
    rejects = [f'-A KUBE-SERVICES -d {vip}/32 -p {p["protocol"].lower()} -m comment --comment '
               f'"{key}:{p["name"]} has no endpoints" -m {p["protocol"].lower()} --dport {p["port"]} '
               "-j REJECT --reject-with icmp-port-unreachable" for p in svc["ports"]]
    for n in lab.nodes:
        if lab.doc.get("proxy") == "nftables":
            faults_proxy.nft_no_endpoints(ch, lab, n)
        elif lab.doc.get("proxy") == "ipvs":
            faults_proxy.ipvs_no_endpoints(ch, lab, n)
        else:
            _iptables_no_endpoints(ch, n, svc, key, vip, svc_chains, sep_chains, portals, rejects)
        # Real nodes reach a ClusterIP that is not DNATed through their default route; lab
        # nodes have none, and without a route the packet would die before FORWARD.
        if C.ip_json(n.netns, "route", "show", "match", vip) == []:
            route = [T.SERVICE_CIDR, "dev", T.UPLINK]
            ch.run(["ip", "-n", n.netns, "route", "add", *route],
                   f"{n.name}: route {' '.join(route)} (stands in for a real node's default route)",
                   ["ip", "-n", n.netns, "route", "del", *route], undo_ok=["No such process"])
    # What the API server shows: the Service's EndpointSlice has no endpoints.
    path = lab.inventory
    original = path.read_text()
    inv = json.loads(original)
    for item in inv["items"]:
        md = item.get("metadata", {})
        if (item.get("kind") == "EndpointSlice" and md.get("namespace") == svc["namespace"]
                and md.get("labels", {}).get("kubernetes.io/service-name") == svc["name"]):
            item["endpoints"] = None  # the API server serialises an empty slice as null
            md["resourceVersion"] = str(int(md.get("resourceVersion", "1")) + 1)
    C.write_file(path, json.dumps(inv, indent=2) + "\n")
    ch.did(f"inventory: EndpointSlice of {key} has no endpoints",
           {"op": "file", "path": str(path), "content": original})


def _iptables_no_endpoints(ch: Changes, n, svc: dict, key: str, vip: str, svc_chains: set,
                           sep_chains: set, portals: str, rejects: list[str]) -> None:
    """kube-proxy's iptables mode with no endpoints on one node: no nat rules for the
    Service, a REJECT per port in filter/KUBE-SERVICES."""
    nat = C.iptables_save(n.netns, "nat")
    rules = [line for line in nat.splitlines() if line.startswith("-A ")]
    services = [line for line in rules if line.split()[1] == "KUBE-SERVICES"]
    jumps = [(i + 1, line) for i, line in enumerate(services) if line.split()[-1] in svc_chains]
    own = [line for line in rules if line.split()[1] in svc_chains | sep_chains]
    chains = sorted((svc_chains | sep_chains) & C.chains(nat))
    # kube-proxy with no endpoints: no nat rules for the Service at all ...
    remove = ([f"-D {line[3:]}" for _, line in jumps]
              + [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains])
    restore = ([f":{c} - [0:0]" for c in chains] + own
               + [f"-I KUBE-SERVICES {i} {line.split(' ', 2)[2]}" for i, line in jumps])
    ch.iptables_restore(n.netns, "*nat\n" + "\n".join(remove) + "\nCOMMIT\n",
                        "*nat\n" + "\n".join(restore) + "\nCOMMIT\n",
                        f"{n.name}: nat: removed {len(jumps)} KUBE-SERVICES jumps and chains "
                        f"{', '.join(chains)} of {key}")
    # ... and a REJECT per port in filter/KUBE-SERVICES, jumped to for new connections.
    filt = C.iptables_save(n.netns, "filter")
    new_chain = "KUBE-SERVICES" not in C.chains(filt)
    hooks = ("INPUT", "FORWARD", "OUTPUT")
    add = ([":KUBE-SERVICES - [0:0]"] if new_chain else []) + rejects + \
          [f"-I {h} 1 {portals}" for h in hooks]
    undo = [f"-D {h} {portals}" for h in hooks] + [f"-D {r[3:]}" for r in rejects] + \
           (["-X KUBE-SERVICES"] if new_chain else [])
    ch.iptables_restore(n.netns, "*filter\n" + "\n".join(add) + "\nCOMMIT\n",
                        "*filter\n" + "\n".join(undo) + "\nCOMMIT\n",
                        f"{n.name}: filter: KUBE-SERVICES REJECTs {vip} "
                        f"({', '.join(p['name'] for p in svc['ports'])}: \"has no endpoints\"), "
                        "jumped to from INPUT/FORWARD/OUTPUT for ctstate NEW")
