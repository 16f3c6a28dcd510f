"""Real faults for the lab: `podtrace lab break|fix|scenarios`.

Each scenario injects one fault that happens on real clusters (a NetworkPolicy drop,
`ip_forward` off, a missing flannel route, a stale conntrack entry, ...) into the lab's
network namespaces, with the same kernel objects a real node would have: iptables rules,
sysctls, routes, neighbour and FDB entries, link MTUs, conntrack entries. `fix` undoes
exactly what `break` changed, from a record of the state *before* the change.

Every change goes through `ip -n NS`, `bridge -n NS`, `ip netns exec NS …`, a netlink socket
opened inside NS, or a write to /proc/sys while this thread is inside NS; NS is always one of
the lab's namespaces, never the root namespace, and no global sysctl is touched.

What was changed is recorded in `LAB_DIR/broken.json`. That file is the lab's private
bookkeeping, deliberately undocumented: the tracer's diagnosis must never read it and must
decide from evidence. `lab down` removes it with the rest of the lab (conntrack entries,
routes and rules go away with the namespaces).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tracer.node import netns
from tracer.errors import BadInput, EnvironmentProblem, require_root
from tracer.lab import build
from tracer.lab import topology as T

BROKEN_FILE = "broken.json"
_FORMAT = 1

# stale-udp-conntrack: the client's fixed source port and the vanished backend's host part.
STALE_SPORT = 40000
STALE_HOST = 99
# mtu-blackhole: what the underlay (the fabric switch port) really carries.
BLACKHOLE_MTU = T.UNDERLAY_MTU - 50
# neigh-wrong: the VTEP MAC a peer's flannel.1 "had before it was recreated".
_STALE_VTEP_MAC = "0e:00:00:00:f0:{index:02x}"
# conntrack-full: a conntrack mark that only the filler entries carry, so `fix` removes them
# and nothing else with one filtered flush.
CT_FILL_MARK = 0x50540001
CT_FILL_TIMEOUT = 7 * 24 * 3600
CT_FILL_LIMIT = 2_000_000  # beyond this the fill would take too long and too much memory


# ---------------------------------------------------------------------------------------
# The lab as the scenarios see it (from the status document; no privileges needed)

@dataclass(frozen=True)
class Node:
    name: str
    index: int
    netns: str
    ip: str
    pod_cidr: str
    overlay_ip: str
    mac: str
    fabric_port: str


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    ip: str
    netns: str


class Lab:
    """Read-only view of a lab status document (`podtrace lab status -o json`)."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.prefix = doc["prefix"]
        self.fabric_netns = doc["fabric_netns"]
        self.inventory = Path(doc["inventory"])
        self.nodes = [Node(n["name"], int(n["index"]), n["netns"], n["ip"], n["pod_cidr"],
                           n["overlay_ip"], n["mac"], n["fabric_port"]) for n in doc["nodes"]]
        self.pods = [Pod(p["name"], p["node"], p["ip"], p["netns"]) for p in doc["pods"]]
        self.services = {s["name"]: s for s in doc["services"]}

    @classmethod
    def planned(cls, cfg: T.LabConfig | None = None) -> "Lab":
        """The lab `lab up` would build (for listings and tests; touches nothing)."""
        cfg = cfg or T.LabConfig(state_dir=Path("/run/podtrace"))
        return cls(T.status_document(T.plan(cfg, created_at="1970-01-01T00:00:00Z")))

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def peer(self, node: str) -> Node:
        """The next node (wrapping around): the other end of a node-to-node path."""
        i = self.node_names.index(node)
        return self.nodes[(i + 1) % len(self.nodes)]

    def client_for(self, node: str) -> Pod | None:
        """A pod on another node than `node` (the peer's first), else another pod on it."""
        if len(self.nodes) > 1:
            pods = self.pods_on(self.peer(node).name)
            if pods:
                return pods[0]
        pods = self.pods_on(node)
        return pods[1] if len(pods) > 1 else None

    def web(self) -> dict:
        return self.services["web"]

    def web_port(self, protocol: str) -> dict:
        return next(p for p in self.web()["ports"] if p["protocol"] == protocol)


# ---------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str                                  # one line for listings
    default_node: Callable[[Lab], str] | None     # None: cluster-wide, takes no --node
    valid_nodes: Callable[[Lab], list[str]]
    show: Callable[[Lab, str | None], str]        # `podtrace flow` arguments that show it
    inject: Callable[["_Changes", Lab, str | None], None] = field(repr=False)
    why_no_nodes: str = "it needs a lab with at least 2 nodes (podtrace lab up --nodes 2)"

    @property
    def cluster_wide(self) -> bool:
        return self.default_node is None


_REGISTRY: dict[str, Scenario] = {}


def _register(sc: Scenario) -> Scenario:
    _REGISTRY[sc.name] = sc
    return sc


def names() -> list[str]:
    return list(_REGISTRY)


def all_scenarios() -> list[Scenario]:
    return list(_REGISTRY.values())


def get(name: str) -> Scenario:
    sc = _REGISTRY.get(name)
    if sc is None:
        near = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else "list them with `podtrace lab scenarios`"
        raise BadInput(f"unknown scenario {name!r}", hint)
    return sc


def resolve_node(sc: Scenario, lab: Lab, node: str | None) -> str | None:
    """The node a scenario acts on: --node checked against the lab, or the default."""
    why = T.scenario_unsupported(lab.doc.get("cni"), sc.name)
    if why:
        raise BadInput(f"{sc.name} does not apply to the {lab.doc.get('cni')} lab: {why}",
                       "see `podtrace lab scenarios` for the ones that do")
    if sc.cluster_wide:
        if node is not None:
            raise BadInput(f"{sc.name} is cluster-wide (every node's kube-proxy programs it)",
                           "run it without --node")
        return None
    valid = sc.valid_nodes(lab)
    if not valid:
        raise BadInput(f"{sc.name} cannot run on this lab: {sc.why_no_nodes}")
    if node is None:
        return sc.default_node(lab)
    if node not in valid:
        what = "unknown node" if node not in lab.node_names else f"{sc.name} cannot run on node"
        raise BadInput(f"{what} {node!r}", f"use one of: {', '.join(valid)}")
    return node


def flow_command(sc: Scenario, lab: Lab, node: str | None = None) -> str:
    node = node if node is not None or sc.cluster_wide else sc.default_node(lab)
    return "podtrace flow " + sc.show(lab, node)


def _two_nodes(lab: Lab) -> list[str]:
    return lab.node_names if len(lab.nodes) > 1 else []


def _any_node(lab: Lab) -> list[str]:
    return [n for n in lab.node_names if lab.client_for(n) is not None]


def _first(lab: Lab) -> str:
    return lab.node_names[0]


def _second(lab: Lab) -> str:
    return lab.node_names[1 if len(lab.nodes) > 1 else 0]


def _web_nodes(lab: Lab) -> list[str]:
    """Nodes with a backend of `web` and another pod to be its client."""
    backends = {b.split("/", 1)[1] for b in lab.web()["backends"]}
    return [n for n in lab.node_names
            if any(p.name in backends for p in lab.pods_on(n))
            and any(p.name not in backends for p in lab.pods_on(n))]


def _web_client(lab: Lab, node: str) -> Pod:
    backends = {b.split("/", 1)[1] for b in lab.web()["backends"]}
    return next(p for p in lab.pods_on(node) if p.name not in backends)


def _show_to_first_pod(lab: Lab, node: str) -> str:
    """From another node's pod to the first pod of `node` (the request crosses `node` last)."""
    return f"{lab.client_for(node).name} {lab.pods_on(node)[0].name}"


def _show_from_first_pod(lab: Lab, node: str) -> str:
    """From the first pod of `node` to a pod on the peer node (the request leaves `node`)."""
    return f"{lab.pods_on(node)[0].name} {lab.pods_on(lab.peer(node).name)[0].name}"


# ---------------------------------------------------------------------------------------
# Recording changes and how to undo them

class _Changes:
    """Performs changes in lab namespaces and records, for each, the operation that undoes
    it (JSON, replayed in reverse order by `fix`) and one human line."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.undo: list[dict] = []
        self.lines: list[str] = []

    def did(self, line: str, undo: dict) -> None:
        self.undo.append(undo)
        self.lines.append(line)

    # sysctls --------------------------------------------------------------------------
    def sysctl(self, ns: str, key: str, value: str, node: str, also: list[str] = ()) -> None:
        """Set key=value in ns; `also` are keys the kernel changes as a side effect, whose
        values are recorded so `fix` puts them back too."""
        _check_ns(self.lab, ns)
        before = {k: _read_sysctl(ns, k) for k in [key, *also]}
        _write_sysctl(ns, key, value)
        self.did(f"{node}: sysctl {_dotted(key)} {before[key]} -> {value}",
                 {"op": "sysctl", "ns": ns, "values": before})

    # commands -------------------------------------------------------------------------
    def run(self, argv: list[str], line: str, undo_argv: list[str], *, input: str | None = None,
            undo_input: str | None = None, undo_ok: list[str] = ()) -> None:
        _check_argv(self.lab, argv)
        _run(argv, input=input)
        self.did(line, {"op": "cmd", "argv": undo_argv, "input": undo_input, "ok": list(undo_ok)})

    def iptables_restore(self, ns: str, doc: str, undo_doc: str, line: str) -> None:
        # With the nf_tables backend a table exists only once used: one this change creates
        # is removed again by `fix` (when nothing else has put rules in it meanwhile).
        present = _nft_tables(ns)
        if present is not None:
            for table in [t[1:].strip() for t in doc.splitlines() if t.startswith("*")]:
                if table not in present:
                    self.undo.append({"op": "drop-empty-table", "ns": ns, "table": table})
        argv = ["ip", "netns", "exec", ns, "iptables-restore", "-w", "5", "--noflush"]
        self.run(argv, line, argv, input=doc, undo_input=undo_doc)


def _dotted(key: str) -> str:
    # /proc/sys path → sysctl name; a dot in a device name is written as '/' by sysctl(8).
    parts = key.split("/")
    return ".".join(p.replace(".", "/") for p in parts)


def _read_sysctl(ns: str, key: str) -> str:
    with netns.entered(ns):
        return Path("/proc/sys", key).read_text().strip()


def _write_sysctl(ns: str, key: str, value: str) -> None:
    # setns() on this thread: /proc/sys/net resolves to the namespace of the caller.
    with netns.entered(ns):
        try:
            Path("/proc/sys", key).write_text(value)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot set {_dotted(key)}={value} in {ns}: {exc.strerror}") from exc


def _lab_namespaces(lab: Lab) -> set[str]:
    return {lab.fabric_netns, *(n.netns for n in lab.nodes), *(p.netns for p in lab.pods)}


def _check_ns(lab: Lab, ns: str) -> None:
    # Never act outside the lab, whatever a (possibly hand-edited) record says.
    if ns not in _lab_namespaces(lab) or not T.namespace_pattern(lab.prefix).match(ns):
        raise EnvironmentProblem(f"refusing to touch {ns!r}: not a namespace of lab {lab.prefix}")


def _check_argv(lab: Lab, argv: list[str]) -> None:
    if argv[:3] == ["ip", "netns", "exec"] and len(argv) > 3:
        _check_ns(lab, argv[3])
    elif argv[0] in ("ip", "bridge") and len(argv) > 2 and argv[1] == "-n":
        _check_ns(lab, argv[2])
    else:
        raise EnvironmentProblem(f"refusing to run {' '.join(argv[:4])}: not inside a lab namespace")


def _run(argv: list[str], input: str | None = None, ok: list[str] = ()) -> str:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"`{argv[0]}` is not installed") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        if any(text in err for text in ok):
            return proc.stdout
        raise EnvironmentProblem(f"`{' '.join(argv)}` failed: {' / '.join(err.splitlines()[:2]) or proc.returncode}")
    return proc.stdout


def _ip_json(ns: str, *args: str):
    return json.loads(_run(["ip", "-n", ns, "-j", *args]) or "[]")


def _iptables_save(ns: str, table: str) -> str:
    return _run(["ip", "netns", "exec", ns, "iptables-save", "-t", table])


def _nft_tables(ns: str) -> set[str] | None:
    """The `ip` family nf_tables tables of ns, or None when iptables is not the nft flavour."""
    if "nf_tables" not in _run(["ip", "netns", "exec", ns, "iptables", "-V"]):
        return None
    out = _run(["ip", "netns", "exec", ns, "nft", "list", "tables"])
    return {words[2] for words in (line.split() for line in out.splitlines())
            if len(words) == 3 and words[:2] == ["table", "ip"]}


def _chains(save: str) -> set[str]:
    return {line[1:].split()[0] for line in save.splitlines() if line.startswith(":")}


# ---------------------------------------------------------------------------------------
# The scenarios

def _netpol_drop(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    policy = f"deny-ingress-{target.name}"
    chain = "KUBE-NWPLCY-" + T._hash16(T.K8S_NAMESPACE + policy)
    if chain in _chains(_iptables_save(n.netns, "filter")):
        raise EnvironmentProblem(f"filter chain {chain} already exists on {node}")
    jump = (f'FORWARD -d {target.ip}/32 -m comment --comment "rule to jump traffic destined to '
            f'POD name:{target.name} namespace: {T.K8S_NAMESPACE} to chain {chain}" -j {chain}')
    drop = (f'{chain} -d {target.ip}/32 -m comment --comment "rule to DROP traffic destined for '
            f'POD name:{target.name} namespace: {T.K8S_NAMESPACE} '
            f'(NetworkPolicy {T.K8S_NAMESPACE}/{policy})" -j DROP')
    ch.iptables_restore(
        n.netns,
        f"*filter\n:{chain} - [0:0]\n-A {drop}\n-I {jump.replace('FORWARD', 'FORWARD 1', 1)}\nCOMMIT\n",
        f"*filter\n-D {jump}\n-F {chain}\n-X {chain}\nCOMMIT\n",
        f"{node}: filter chain {chain} dropping traffic to {target.name} ({target.ip}), "
        f"jumped to from FORWARD (rule 1)")


def _ip_forward_off(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    # Writing ip_forward also rewrites every device's `forwarding` and all.accept_redirects
    # (inet_forward_change): record them so `fix` restores them exactly.
    with netns.entered(n.netns):
        confs = sorted(p.name for p in Path("/proc/sys/net/ipv4/conf").iterdir())
    also = [f"net/ipv4/conf/{c}/forwarding" for c in confs] + ["net/ipv4/conf/all/accept_redirects"]
    ch.sysctl(n.netns, "net/ipv4/ip_forward", "0", node, also=also)


def _br_netfilter_off(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    ch.sysctl(n.netns, "net/bridge/bridge-nf-call-iptables", "0", node)


def _conntrack_full(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    count = int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    limit = int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_max"))
    need = limit - count
    if need > CT_FILL_LIMIT:
        raise EnvironmentProblem(
            f"nf_conntrack_max is {limit}: filling {node}'s table would need {need} entries "
            f"(~{need * _ct_object_size() >> 20} MiB, tens of seconds)",
            "conntrack-full is only offered where nf_conntrack_max is at most "
            f"{CT_FILL_LIMIT}; the global value is not changed for a lab")
    started = time.monotonic()
    # Registered before the fill: if it fails part-way, the flush removes whatever was made.
    ch.undo.append({"op": "ct-flush-mark", "ns": n.netns, "mark": CT_FILL_MARK})
    made = used = 0
    for _ in range(5):
        # Entries of the node's own traffic may expire while the table fills: top it up.
        need = limit - int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
        if need <= 0:
            break
        made += _ct_fill(n, need, start=used)
        used += need
    elapsed = time.monotonic() - started
    ch.lines.append(f"{node}: {made} ASSURED UDP conntrack entries (mark {CT_FILL_MARK:#x}) fill "
                    f"the table to nf_conntrack_max={limit} in {elapsed:.1f} s, "
                    f"~{made * _ct_object_size() >> 20} MiB of kernel memory")
    now = int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    if now < limit:
        raise EnvironmentProblem(f"the conntrack table of {node} holds {now} of {limit} entries "
                                 f"after the fill", "run `podtrace lab fix conntrack-full`")


def _conntrack_invalid(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    notrack = (f"PREROUTING -s {n.pod_cidr} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
               "-j CT --notrack")
    invalid = "FORWARD -m conntrack --ctstate INVALID -j DROP"
    ch.iptables_restore(n.netns, f"*raw\n-A {notrack}\nCOMMIT\n", f"*raw\n-D {notrack}\nCOMMIT\n",
                        f"{node}: raw PREROUTING: TCP SYNs from {n.pod_cidr} are NOTRACKed, so "
                        "their SYN-ACKs find no connection")
    ch.iptables_restore(n.netns, f"*filter\n-I {invalid.replace('FORWARD', 'FORWARD 1', 1)}\nCOMMIT\n",
                        f"*filter\n-D {invalid}\nCOMMIT\n",
                        f"{node}: filter FORWARD rule 1: -m conntrack --ctstate INVALID -j DROP")


def _rp_filter_strict(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    client = lab.client_for(node)
    via = lab.node(client.node)
    route = [f"{client.ip}/32", "via", via.ip, "dev", T.UPLINK]
    ch.run(["ip", "-n", n.netns, "route", "add", *route],
           f"{node}: route {' '.join(route)} (replies to {client.name} leave through the "
           f"underlay, not flannel.1)",
           ["ip", "-n", n.netns, "route", "del", *route], undo_ok=["No such process"])
    ch.sysctl(n.netns, "net/ipv4/conf/all/rp_filter", "1", node)


def _mtu_blackhole(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    fab = lab.fabric_netns
    links = {link["ifname"]: link for link in _ip_json(fab, "link", "show")}
    port = links[n.fabric_port]
    old = int(port["mtu"])
    ch.run(["ip", "-n", fab, "link", "set", "dev", n.fabric_port, "mtu", str(BLACKHOLE_MTU)],
           f"fabric: switch port {n.fabric_port} (to {node}'s {T.UPLINK}) MTU {old} -> "
           f"{BLACKHOLE_MTU}, while {node} still sends {T.UNDERLAY_MTU}-byte frames",
           ["ip", "-n", fab, "link", "set", "dev", n.fabric_port, "mtu", str(old)])


def _route_line(route: dict) -> list[str]:
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
    if "onlink" in route.get("flags", []):
        words.append("onlink")
    return words


def _no_route(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    routes = _ip_json(n.netns, "route", "show", "exact", peer.pod_cidr)
    if not routes:
        raise EnvironmentProblem(f"{node} has no route to {peer.pod_cidr} to remove")
    for route in routes:
        words = _route_line(route)
        ch.run(["ip", "-n", n.netns, "route", "del", *words],
               f"{node}: removed route {' '.join(words)} (to {peer.name}'s pods)",
               ["ip", "-n", n.netns, "route", "replace", *words])


def _fdb_missing(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    entries = [e for e in json.loads(_run(["bridge", "-n", n.netns, "-j", "fdb", "show", "dev",
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


def _neigh_wrong(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    peer = lab.peer(node)
    found = _ip_json(n.netns, "neigh", "show", peer.overlay_ip, "dev", T.OVERLAY)
    if not found or not found[0].get("lladdr"):
        raise EnvironmentProblem(f"{node} has no neighbour entry for {peer.overlay_ip} on {T.OVERLAY}")
    old = found[0]["lladdr"]
    state = (found[0].get("state") or ["PERMANENT"])[0].lower()
    wrong = _STALE_VTEP_MAC.format(index=peer.index)
    base = ["ip", "-n", n.netns, "neigh", "replace", peer.overlay_ip, "lladdr"]
    ch.run(base + [wrong, "dev", T.OVERLAY, "nud", state],
           f"{node}: neighbour {peer.overlay_ip} dev {T.OVERLAY} lladdr {old} -> {wrong} "
           f"({peer.name}'s VTEP is {peer.mac})",
           base + [old, "dev", T.OVERLAY, "nud", state])


def _svc_no_endpoints(ch: _Changes, lab: Lab, node: str | None) -> None:
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
        nat = _iptables_save(n.netns, "nat")
        rules = [line for line in nat.splitlines() if line.startswith("-A ")]
        services = [line for line in rules if line.split()[1] == "KUBE-SERVICES"]
        jumps = [(i + 1, line) for i, line in enumerate(services) if line.split()[-1] in svc_chains]
        own = [line for line in rules if line.split()[1] in svc_chains | sep_chains]
        chains = sorted((svc_chains | sep_chains) & _chains(nat))
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
        filt = _iptables_save(n.netns, "filter")
        new_chain = "KUBE-SERVICES" not in _chains(filt)
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
        # Real nodes reach a ClusterIP that is not DNATed through their default route; lab
        # nodes have none, and without a route the packet would die before FORWARD.
        if _ip_json(n.netns, "route", "show", "match", vip) == []:
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
    _write_file(path, json.dumps(inv, indent=2) + "\n")
    ch.did(f"inventory: EndpointSlice of {key} has no endpoints",
           {"op": "file", "path": str(path), "content": original})


def _stale_udp_conntrack(ch: _Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    client = lab.pods_on(node)[0]
    svc = lab.web()
    port = lab.web_port("UDP")
    stale = _stale_backend(lab)
    tuple_ = ["-p", "udp", "-s", client.ip, "-d", svc["cluster_ip"],
              "--sport", str(STALE_SPORT), "--dport", str(port["port"])]
    if (_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count")
            == _read_sysctl(n.netns, "net/netfilter/nf_conntrack_max")):
        raise EnvironmentProblem(f"the conntrack table of {node} is full: no room for the stale entry",
                                 "fix conntrack-full first: podtrace lab fix conntrack-full")
    existing = _run(["ip", "netns", "exec", n.netns, "conntrack", "-L", *tuple_], ok=["0 flow entries"])
    if existing.strip():
        raise EnvironmentProblem(f"{node} already has a conntrack entry for {client.ip}:{STALE_SPORT} "
                                 f"-> {svc['cluster_ip']}:{port['port']}/udp",
                                 f"delete it: ip netns exec {n.netns} conntrack -D {' '.join(tuple_)}")
    ch.run(["ip", "netns", "exec", n.netns, "conntrack", "-I", *tuple_,
            "--dst-nat", f"{stale}:{port['target_port']}", "-t", "86400", "-u", "SEEN_REPLY,ASSURED"],
           f"{node}: conntrack entry udp {client.ip}:{STALE_SPORT} -> {svc['cluster_ip']}:"
           f"{port['port']} DNATed to {stale}:{port['target_port']} (no such pod), ASSURED, "
           "timeout 86400 s",
           ["ip", "netns", "exec", n.netns, "conntrack", "-D", *tuple_, "-r", stale],
           undo_ok=["0 flow entries"])


def _stale_backend(lab: Lab) -> str:
    backend_node = lab.node(lab.pod(lab.web()["backends"][0].split("/", 1)[1]).node)
    net = ipaddress.ip_network(backend_node.pod_cidr)
    return str(net.network_address + STALE_HOST)


_register(Scenario(
    "netpol-drop",
    "a NetworkPolicy-style iptables chain (KUBE-NWPLCY-…) on the destination's node drops "
    "traffic to its first pod",
    _second, _any_node, _show_to_first_pod, _netpol_drop,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "ip-forward-off",
    "net.ipv4.ip_forward=0 on a node: pod traffic to other nodes is not forwarded",
    _first, _two_nodes, _show_from_first_pod, _ip_forward_off))
_register(Scenario(
    "br-netfilter-off",
    "net.bridge.bridge-nf-call-iptables=0 on the node of web's backend: a same-node client's "
    "replies skip conntrack and come from the backend IP, not the ClusterIP",
    lambda lab: _web_nodes(lab)[0], _web_nodes,
    lambda lab, node: f"{_web_client(lab, node).name} svc/default/web --proto udp --port 80",
    _br_netfilter_off,
    why_no_nodes="it needs a node with a backend of svc/default/web and another pod"))
_register(Scenario(
    "conntrack-full",
    "a node's conntrack table filled to nf_conntrack_max with ASSURED entries: new flows "
    "through it are dropped",
    _first, _any_node,
    lambda lab, node: (_show_from_first_pod(lab, node) if len(lab.nodes) > 1
                       else f"{lab.pods_on(node)[0].name} {lab.client_for(node).name}"),
    _conntrack_full,
    why_no_nodes="it needs a second pod to send to"))
_register(Scenario(
    "conntrack-invalid",
    "SYNs leaving a node are NOTRACKed and FORWARD drops ctstate INVALID: the SYN-ACK "
    "coming back is dropped",
    _first, _two_nodes,
    lambda lab, node: _show_from_first_pod(lab, node) + f" --proto tcp --port {T.APP_PORT}",
    _conntrack_invalid))
_register(Scenario(
    "rp-filter-strict",
    "rp_filter=1 (all) on a node plus an asymmetric host route back to a client pod: the "
    "client's packets are dropped on flannel.1",
    _second, _two_nodes, _show_to_first_pod, _rp_filter_strict))
_register(Scenario(
    "mtu-blackhole",
    f"the underlay switch port of a node carries only {BLACKHOLE_MTU}-byte packets: full-size "
    "pod packets (VXLAN outer 1500) vanish silently, small ones pass",
    _first, _two_nodes,
    lambda lab, node: _show_from_first_pod(lab, node) + f" --size {T.POD_MTU}",
    _mtu_blackhole))
_register(Scenario(
    "no-route",
    "the flannel route to the peer node's pod CIDR removed from a node",
    _first, _two_nodes, _show_from_first_pod, _no_route))
_register(Scenario(
    "fdb-missing",
    "a node's VXLAN FDB entry for the peer node's VTEP MAC removed",
    _first, _two_nodes, _show_from_first_pod, _fdb_missing))
_register(Scenario(
    "neigh-wrong",
    "a node's neighbour entry for the peer's flannel.1 address points at a stale VTEP MAC",
    _first, _two_nodes, _show_from_first_pod, _neigh_wrong))
_register(Scenario(
    "svc-no-endpoints",
    "svc/default/web has no endpoints: kube-proxy's REJECT in filter/KUBE-SERVICES on every "
    "node, no nat rules, an empty EndpointSlice in the inventory",
    None, lambda lab: [],
    lambda lab, node: f"{lab.pods[0].name} svc/default/web --proto tcp --port 80",
    _svc_no_endpoints))
_register(Scenario(
    "stale-udp-conntrack",
    f"a conntrack entry on the client's node still DNATs web's UDP port from source port "
    f"{STALE_SPORT} to a backend IP that no longer exists",
    _first, lambda lab: [n for n in lab.node_names if lab.pods_on(n)],
    lambda lab, node: (f"{lab.pods_on(node)[0].name} svc/default/web --proto udp --port 80 "
                       f"--sport {STALE_SPORT} --count 1"),
    _stale_udp_conntrack,
    why_no_nodes="it needs a pod"))


# ---------------------------------------------------------------------------------------
# conntrack over netlink (inside the node's namespace): fill and flush by mark

_NETLINK_NETFILTER = 12
_CT_NEW = (1 << 8) | 0      # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
_CT_DELETE = (1 << 8) | 2   # IPCTNL_MSG_CT_DELETE
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_TIMEOUT, _CTA_MARK = 1, 2, 3, 7, 8
_CTA_MARK_MASK = 21
_IPS_SEEN_REPLY, _IPS_ASSURED, _IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _nla(kind | 0x8000, b"".join(parts))


def _ct_tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return _nest(kind,
                 _nest(1, _nla(1, src), _nla(2, dst)),
                 _nest(2, _nla(1, bytes([socket.IPPROTO_UDP])), _nla(2, struct.pack("!H", sport)),
                       _nla(3, struct.pack("!H", dport))))


def _nlmsg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    payload = struct.pack("=BBH", socket.AF_INET, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _ct_socket(ns: str) -> socket.socket:
    sock = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock


def _ct_fill(n: Node, count: int, start: int = 0) -> int:
    """Insert `count` ASSURED UDP entries into the node's own conntrack table, like the
    flows of DNS queries from many clients to the node's address: pod-CIDR source addresses
    no pod has (.100 and up), source ports 1024-64999, destination the node's cni0 address
    port 53. ASSURED entries are never early-dropped, so the table stays full. Messages go
    in large batches without acks; returns how many entries the table gained."""
    net = ipaddress.ip_network(n.pod_cidr)
    gateway = (net.network_address + 1).packed
    per_ip = 64000
    if start + count > per_ip * 150:
        raise EnvironmentProblem(f"cannot make {count} distinct conntrack entries on {n.name}")
    tail = (_nla(_CTA_STATUS, struct.pack("!I", _IPS_SEEN_REPLY | _IPS_ASSURED | _IPS_CONFIRMED))
            + _nla(_CTA_TIMEOUT, struct.pack("!I", CT_FILL_TIMEOUT))
            + _nla(_CTA_MARK, struct.pack("!I", CT_FILL_MARK)))
    flags = _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_EXCL
    before = int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    sock = _ct_socket(n.netns)
    try:
        batch: list[bytes] = []
        size = 0
        for k in range(start, start + count):
            src = (net.network_address + 100 + k // per_ip).packed
            sport = 1024 + k % per_ip
            msg = _nlmsg(_CT_NEW, flags, k + 1,
                         _ct_tuple(_CTA_TUPLE_ORIG, src, gateway, sport, 53)
                         + _ct_tuple(_CTA_TUPLE_REPLY, gateway, src, 53, sport) + tail)
            batch.append(msg)
            size += len(msg)
            if size > 60000:
                sock.sendall(b"".join(batch))
                batch, size = [], 0
        if batch:
            sock.sendall(b"".join(batch))
    finally:
        sock.close()  # unread error replies (a racing flow took the last slots) go with it
    return int(_read_sysctl(n.netns, "net/netfilter/nf_conntrack_count")) - before


def _ct_flush_mark(ns: str, mark: int) -> None:
    """Delete every conntrack entry of `ns` carrying `mark` (one filtered flush)."""
    sock = _ct_socket(ns)
    try:
        sock.settimeout(30)
        body = _nla(_CTA_MARK, struct.pack("!I", mark)) + _nla(_CTA_MARK_MASK, struct.pack("!I", 0xFFFFFFFF))
        sock.sendall(_nlmsg(_CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, 1, body))
        while True:
            data = sock.recv(65536)
            _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
            if kind == _NLMSG_ERROR and seq == 1:
                err = struct.unpack_from("=i", data, 16)[0]
                if err not in (0, -2):  # -ENOENT: nothing carried the mark
                    raise EnvironmentProblem(f"conntrack flush in {ns} failed: {os.strerror(-err)}")
                return
    finally:
        sock.close()


def _ct_object_size() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/slabinfo").read_text().splitlines():
            if line.startswith("nf_conntrack "):
                return int(line.split()[3])
    return 256


# ---------------------------------------------------------------------------------------
# Undo

def _write_file(path: Path, content: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(content)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _undo(lab: Lab, op: dict) -> None:
    kind = op["op"]
    if kind == "sysctl":
        _check_ns(lab, op["ns"])
        for key, value in op["values"].items():
            if _read_sysctl(op["ns"], key) != value:
                _write_sysctl(op["ns"], key, value)
    elif kind == "cmd":
        _check_argv(lab, op["argv"])
        _run(op["argv"], input=op.get("input"), ok=op.get("ok") or [])
    elif kind == "ct-flush-mark":
        _check_ns(lab, op["ns"])
        _ct_flush_mark(op["ns"], int(op["mark"]))
    elif kind == "drop-empty-table":
        _check_ns(lab, op["ns"])
        present = _nft_tables(op["ns"])
        save = _iptables_save(op["ns"], op["table"])
        builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
        if (present and op["table"] in present and "\n-A " not in save
                and _chains(save) <= builtin):
            _run(["ip", "netns", "exec", op["ns"], "nft", "delete", "table", "ip", op["table"]])
    elif kind == "file":
        path = Path(op["path"])
        if path.parent != lab.inventory.parent:
            raise EnvironmentProblem(f"refusing to write {path}: not a file of lab {lab.prefix}")
        _write_file(path, op["content"])
    else:
        raise EnvironmentProblem(f"unknown undo step {kind!r} in {BROKEN_FILE}")


def _rollback(lab: Lab, undo: list[dict]) -> list[str]:
    errors = []
    for op in reversed(undo):
        try:
            _undo(lab, op)
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest, report all
            errors.append(str(exc))
    return errors


# ---------------------------------------------------------------------------------------
# Public API

@dataclass
class Outcome:
    scenario: str
    node: str | None
    changed: bool
    message: str
    changes: list[str] = field(default_factory=list)
    show: str | None = None


def _state_path(prefix: str | None, state_dir: Path | str | None) -> Path:
    return build._lab_dir(prefix, state_dir) / BROKEN_FILE


def broken(prefix: str | None = None, state_dir: Path | str | None = None) -> dict:
    """{scenario: {"node", "since", "changes"}} of what is broken in this lab now."""
    try:
        doc = json.loads(_state_path(prefix, state_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot read {_state_path(prefix, state_dir)}: {exc}",
                                 "run: podtrace lab down && podtrace lab up") from exc
    return {name: {k: rec.get(k) for k in ("node", "since", "changes")}
            for name, rec in doc.get("scenarios", {}).items()}


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": _FORMAT, "scenarios": {}}
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot read {path}: {exc}",
                                 "run: podtrace lab down && podtrace lab up") from exc
    doc.setdefault("scenarios", {})
    return doc


def _save(path: Path, doc: dict) -> None:
    if doc["scenarios"]:
        _write_file(path, json.dumps(doc, indent=2) + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lab_up(prefix: str | None, state_dir: Path | str | None) -> Lab:
    doc = build.status(prefix, state_dir)
    if doc is None:
        name = T.validate_prefix(prefix or T.default_prefix())
        hint = "podtrace lab up" if name == T.DEFAULT_PREFIX else f"podtrace lab --prefix {name} up"
        raise EnvironmentProblem(f"no lab {name} is up", f"run: {hint}")
    return Lab(doc)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def break_scenario(name: str, node: str | None = None, prefix: str | None = None,
                   state_dir: Path | str | None = None) -> Outcome:
    """Inject the fault. Breaking what is already broken changes nothing."""
    sc = get(name)
    require_root("podtrace lab break")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with build._locked(root):
        lab = _lab_up(prefix, state_dir)
        node = resolve_node(sc, lab, node)
        path = _state_path(lab.prefix, state_dir)
        state = _load(path)
        rec = state["scenarios"].get(name)
        if rec is not None:
            where = f" on {rec['node']}" if rec.get("node") else ""
            return Outcome(name, rec.get("node"), False,
                           f"{name} is already broken{where} (since {rec.get('since')}); "
                           f"nothing changed. Undo it with: podtrace lab fix {name}",
                           rec.get("changes", []), flow_command(sc, lab, rec.get("node")))
        ch = _Changes(lab)
        with build._interrupts_as_keyboard_interrupt():
            try:
                sc.inject(ch, lab, node)
            except BaseException as exc:
                with build._shielded():
                    errors = _rollback(lab, ch.undo)
                if errors and isinstance(exc, Exception):
                    raise EnvironmentProblem(
                        f"breaking {name} failed ({build._why(exc)}) and undoing it failed too: "
                        f"{errors[0]}", "run: podtrace lab down && podtrace lab up") from exc
                raise
            state["scenarios"][name] = {"node": node, "since": _now(), "changes": ch.lines,
                                        "undo": ch.undo}
            with build._shielded():
                _save(path, state)
    where = f" on {node}" if node else " on every node"
    return Outcome(name, node, True, f"broke {name}{where}", ch.lines, flow_command(sc, lab, node))


def fix_scenario(name: str, prefix: str | None = None,
                 state_dir: Path | str | None = None) -> Outcome:
    """Undo exactly what `break` changed. Fixing what is not broken changes nothing."""
    sc = get(name)
    require_root("podtrace lab fix")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with build._locked(root):
        lab = _lab_up(prefix, state_dir)
        path = _state_path(lab.prefix, state_dir)
        state = _load(path)
        rec = state["scenarios"].get(name)
        if rec is None:
            return Outcome(name, None, False, f"{name} is not broken; nothing to do")
        undo = list(rec["undo"])
        with build._shielded():
            try:
                while undo:
                    _undo(lab, undo[-1])
                    undo.pop()
            finally:
                # What is left (after a failure) stays recorded, so `fix` can be retried.
                if undo:
                    rec["undo"] = undo
                else:
                    del state["scenarios"][name]
                _save(path, state)
    where = f" on {rec['node']}" if rec.get("node") else " on every node"
    return Outcome(name, rec.get("node"), True, f"fixed {name}{where}",
                   rec.get("changes", []), flow_command(sc, lab, rec.get("node")))


def listing(lab: Lab | None = None) -> list[dict]:
    """One entry per scenario: name, summary, default node, valid nodes, the flow command."""
    lab = lab or Lab.planned()
    out = []
    for sc in all_scenarios():
        unsupported = T.scenario_unsupported(lab.doc.get("cni"), sc.name)
        valid = [] if sc.cluster_wide or unsupported else sc.valid_nodes(lab)
        node = None if sc.cluster_wide or not valid else sc.default_node(lab)
        shown = (sc.cluster_wide or valid) and not unsupported
        out.append({"name": sc.name, "summary": sc.summary, "default_node": node,
                    "nodes": valid, "cluster_wide": sc.cluster_wide,
                    "flow": flow_command(sc, lab, node) if shown else None})
    return out
