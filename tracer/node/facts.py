"""Node facts joined to the trace: what the kernel of one node is configured to do with a
packet (sysctls, the route it would take, neighbour and overlay FDB entries, MTUs,
conntrack fill, and which netfilter rules counted the probes). An IPv6 packet gets the IPv6
view under the same keys (forwarding sysctls, `ip -6` route, NDP, ip6tables counters).

A node is a network namespace: a lab node's named namespace, or this host's own (None).
Reads go through `ip -n`/`bridge -n`/`ip netns exec` and /proc/sys inside the namespace;
nothing here changes anything.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tracer.node import ipvsfacts, linkfacts, netns, nftfacts


@dataclass(frozen=True)
class NodeRef:
    name: str
    netns: str | None   # None: this host's namespace


def _cmd(node: NodeRef, *argv: str, timeout: float = 5) -> subprocess.CompletedProcess:
    if node.netns:
        if argv[0] in ("ip", "bridge"):
            argv = (argv[0], "-n", node.netns, *argv[1:])
        else:
            argv = ("ip", "netns", "exec", node.netns, *argv)
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _json(node: NodeRef, *argv: str):
    r = _cmd(node, *argv)
    if r.returncode != 0:
        return None, (r.stderr.strip() or f"exit {r.returncode}")
    try:
        return json.loads(r.stdout or "null"), None
    except json.JSONDecodeError:
        return None, "unparsable output"


def sysctls(node: NodeRef, keys: list[str]) -> dict[str, int | str | None]:
    """/proc/sys values as seen inside the node's namespace (net.* sysctls are per-netns)."""
    def read() -> dict:
        out: dict[str, int | str | None] = {}
        for k in keys:
            try:
                # sysctl spelling: dots separate levels, a dot inside a device name is '/'
                v = Path("/proc/sys", *(p.replace("/", ".") for p in k.split("."))).read_text().strip()
                out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
            except OSError:
                out[k] = None
        return out
    if node.netns:
        with netns.entered(node.netns):
            return read()
    return read()


# ---- netfilter counters ---------------------------------------------------------------

_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_POLICY = re.compile(r"^:(\S+) (ACCEPT|DROP) \[(\d+):(\d+)\]$")


@dataclass
class RuleCounters:
    """`iptables-save -c` of one node: (table, chain, index, rule text) → packets."""

    rules: dict[tuple[str, str, int, str], int] = field(default_factory=dict)
    error: str | None = None
    # `ip6tables-save -c`, keyed like `rules` with the table as "ip6 TABLE" (nft's spelling)
    rules6: dict[tuple[str, str, int, str], int] = field(default_factory=dict)
    error6: str | None = None
    nft: list[dict] = field(default_factory=list)    # native nftables rules (nftfacts.rules)
    nft_error: str | None = None


def iptables_counters(node: NodeRef) -> RuleCounters:
    """The iptables rule counters, and the native nftables rules with theirs."""
    out = _iptables_counters(node)
    six = _iptables_counters(node, "ip6tables-save", "ip6 ")
    out.rules6, out.error6 = six.rules, six.error
    out.nft, out.nft_error = nftfacts.read(lambda *argv: _cmd(node, *argv))
    return out


def _iptables_counters(node: NodeRef, tool: str = "iptables-save", prefix: str = "") -> RuleCounters:
    try:
        r = _cmd(node, tool, "-c")
    except OSError as exc:     # ip6tables-save missing: IPv4 counters still count
        return RuleCounters(error=f"{tool}: {exc.strerror or exc}")
    if r.returncode != 0:
        return RuleCounters(error=r.stderr.strip() or f"{tool} failed")
    out = RuleCounters()
    table = ""
    index: dict[tuple[str, str], int] = {}
    for line in r.stdout.splitlines():
        if line.startswith("*"):
            table = prefix + line[1:]
        pm = _POLICY.match(line)
        if pm and pm[2] == "DROP":
            # a built-in chain's policy counts the packets no rule decided on
            out.rules[(table, pm[1], 0, f"policy {pm[2]}")] = int(pm[3])
        m = _COUNTED.match(line)
        if m:
            chain = m[3]
            i = index.get((table, chain), 0) + 1
            index[(table, chain)] = i
            out.rules[(table, chain, i, f"-A {chain} {m[4]}")] = int(m[1])
    return out


def _callers(rules, table: str, chain: str) -> list[str]:
    return sorted({c for (t, c, _, text) in rules if t == table and re.search(rf"-j {re.escape(chain)}(\s|$)", text)})


def rule_hits(before: RuleCounters, after: RuleCounters, targets=("DROP", "REJECT")) -> list[dict]:
    """Rules with a terminal drop target whose packet counter moved while we traced
    (iptables and ip6tables; an ip6tables hit's table reads "ip6 filter")."""
    hits = []
    was = {**before.rules, **before.rules6}
    every = {**after.rules, **after.rules6}
    for key, n in every.items():
        table, chain, idx, text = key
        delta = n - was.get(key, 0)
        if idx == 0 and text.startswith("policy ") and delta > 0:
            hits.append({"table": table, "chain": chain, "base_chain": chain, "index": 0,
                         "rule": f"-P {chain} {text.split()[1]}", "target": text.split()[1],
                         "packets": delta, "comment": None, "policy": text.split()[1]})
            continue
        target = re.search(r"-j (\S+)", text)
        if delta > 0 and target and target[1] in targets:
            base = chain
            seen = {chain}
            while base not in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"):
                up = [c for c in _callers(every, table, base) if c not in seen]
                if not up:
                    break
                base = up[0]
                seen.add(base)
            comment = re.search(r'--comment "([^"]*)"|--comment (\S+)', text)
            hits.append({"table": table, "chain": chain, "base_chain": base, "index": idx,
                         "rule": text, "target": target[1], "packets": delta,
                         "comment": (comment[1] or comment[2]) if comment else None})
    hits += nftfacts.hits(before.nft, after.nft)
    return sorted(hits, key=lambda h: -h["packets"])


# ---- the rest of the node's view ------------------------------------------------------

def route_get(node: NodeRef, dst: str, src: str | None = None, iif: str | None = None) -> dict:
    argv = ["ip", "-j", "route", "get", dst]
    if src and iif:
        argv += ["from", src, "iif", iif]
    data, err = _json(node, *argv)
    if err:
        return {"dst": dst, "error": err}
    return data[0] if data else {"dst": dst, "error": "no answer"}


def links(node: NodeRef) -> dict[str, dict]:
    data, err = _json(node, "ip", "-j", "-d", "link", "show")
    if err or not data:
        return {}
    out = {}
    for link in data:
        info = link.get("linkinfo", {})
        flags = link.get("flags", [])
        out[link["ifname"]] = {"mtu": link.get("mtu"), "mac": link.get("address"),
                               "noarp": "NOARP" in flags,
                               "kind": info.get("info_kind"), "up": "UP" in flags,
                               "vxlan": info.get("info_data") if info.get("info_kind") == "vxlan" else None,
                               **linkfacts.state(link)}
    return out


def neigh(node: NodeRef, ip: str, dev: str) -> dict | None:
    data, err = _json(node, "ip", "-j", "neigh", "show", ip, "dev", dev)
    if err or not data:
        return None
    n = data[0]
    return {"ip": ip, "dev": dev, "lladdr": n.get("lladdr"), "state": n.get("state", [])}


def fdb(node: NodeRef, dev: str) -> list[dict]:
    data, err = _json(node, "bridge", "-j", "fdb", "show", "dev", dev)
    if err or not data:
        return []
    return [{"mac": e.get("mac"), "dst": e.get("dst")} for e in data if e.get("dst")]


def named_netns(inodes) -> dict[int, str]:
    """inode → the name (`ip netns`) of each of these namespaces that has one here."""
    want = {int(i) for i in inodes or ()}
    out: dict[int, str] = {}
    for name in netns.list_names() if want else []:
        try:
            ino = netns.inode(name)
        except OSError:
            continue
        if ino in want:
            out[ino] = name
    return out


def pod_side(pod_netns: int, dev: str | None) -> dict:
    """The pod end of a drop after arrival: the MAC of its device (`dev`), read in its namespace."""
    name = named_netns([pod_netns]).get(int(pod_netns))
    if name is None:
        return {"netns": pod_netns, "error": "namespace not found on this node"}
    lk = links(NodeRef(name, name)).get(dev or "", {})
    return {"netns": pod_netns, "dev": dev, "mac": lk.get("mac")}


def facts(node: NodeRef, *, src: str, dst: str, iif: str | None, devs: list[str],
          pod_netns: int | None = None, pod_dev: str | None = None) -> dict:
    """Everything the diagnosis may need about how `node` treats a packet src → dst that
    arrived on `iif`. `devs`: the devices of this node on the packet's path; `pod_netns` and
    `pod_dev`: the pod namespace and device where it was dropped after arriving."""
    lk = links(node)
    if _v6(dst) or _v6(src):
        out = _facts_v6(node, src=src, dst=dst, iif=iif, devs=devs, lk=lk)
    else:
        out = _facts_v4(node, src=src, dst=dst, iif=iif, devs=devs, lk=lk)
    return {**out, **_beyond_route(node, out["route"], lk, dst, pod_netns, pod_dev),
            "tc": tc_programs(node, [d for d in devs if d in lk])}


def tc_programs(node: NodeRef, devs: list[str]) -> dict[str, dict[str, list[dict]]]:
    """dev → direction → the BPF programs someone else attached to its tc hook, in the order
    they run: [{pref, name (the filter's), prog_name, id}]. podtrace's own observers are left
    out; a device whose filters cannot be read is left out."""
    out: dict[str, dict[str, list[dict]]] = {}
    for dev in devs:
        for direction in ("ingress", "egress"):
            data, err = _json(node, "tc", "-j", "filter", "show", "dev", dev, direction)
            if err or not isinstance(data, list):
                continue
            progs = []
            for f in data:
                opts = f.get("options") or {}
                prog = opts.get("prog") or {}
                name = opts.get("bpf_name") or ""
                if f.get("kind") != "bpf" or not prog or name.startswith("podtrace:"):
                    continue
                progs.append({"pref": f.get("pref"), "name": name, "prog_name": prog.get("name"),
                              "id": prog.get("id")})
            if progs:
                out.setdefault(dev, {})[direction] = sorted(progs, key=lambda x: x["pref"] or 0)
    return out


def _v6(addr: str | None) -> bool:
    return bool(addr) and ":" in addr


def _facts_v6(node: NodeRef, *, src: str, dst: str, iif: str | None, devs: list[str], lk: dict) -> dict:
    """The IPv6 view, under the IPv4 view's keys so a diagnosis reads either: `ip_forward`
    is net.ipv6.conf.all.forwarding, `forwarding` the devices' net.ipv6.conf.DEV.forwarding,
    `bridge_nf_call_iptables` net.bridge.bridge-nf-call-ip6tables; IPv6 has no rp_filter
    (`rp_filter` is empty). `sysctl_names` says which sysctl each key is; the route and the
    neighbour (NDP) entries come from `ip -6`; `mtu6` holds the devices' IPv6 MTU."""
    dev = lambda d: d.replace(".", "/")   # noqa: E731
    keys = ["net.ipv6.conf.all.forwarding", "net.bridge.bridge-nf-call-ip6tables",
            "net.netfilter.nf_conntrack_count", "net.netfilter.nf_conntrack_max"]
    keys += [f"net.ipv6.conf.{dev(d)}.forwarding" for d in devs if d in lk]
    keys += [f"net.ipv6.conf.{dev(d)}.mtu" for d in devs if d in lk]
    keys += [f"net.ipv6.conf.{dev(d)}.disable_ipv6" for d in devs if d in lk]
    sc = sysctls(node, keys)
    return {
        "node": node.name,
        "family": 6,
        "ip_forward": sc["net.ipv6.conf.all.forwarding"],
        "rp_filter": {},
        "forwarding": {d: sc.get(f"net.ipv6.conf.{dev(d)}.forwarding") for d in devs if d in lk},
        "bridge_nf_call_iptables": sc["net.bridge.bridge-nf-call-ip6tables"],
        "sysctl_names": {"ip_forward": "net.ipv6.conf.all.forwarding",
                         "forwarding": "net.ipv6.conf.DEV.forwarding",
                         "bridge_nf_call_iptables": "net.bridge.bridge-nf-call-ip6tables"},
        "conntrack": {"count": sc["net.netfilter.nf_conntrack_count"], "max": sc["net.netfilter.nf_conntrack_max"]},
        "mtu": {d: lk[d]["mtu"] for d in devs if d in lk},
        "mtu6": {d: sc.get(f"net.ipv6.conf.{dev(d)}.mtu") for d in devs if d in lk},
        "ipv6_disabled": [d for d in devs if d in lk and sc.get(f"net.ipv6.conf.{dev(d)}.disable_ipv6") == 1],
        "links": lk,
        "route": route_get(node, dst, src, iif) if iif else route_get(node, dst),
        "route_back": route_get(node, src),
    }


def _facts_v4(node: NodeRef, *, src: str, dst: str, iif: str | None, devs: list[str], lk: dict) -> dict:
    keys = ["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
            "net.bridge.bridge-nf-call-iptables", "net.netfilter.nf_conntrack_count",
            "net.netfilter.nf_conntrack_max"]
    keys += [f"net.ipv4.conf.{d.replace('.', '/')}.rp_filter" for d in devs if d in lk]
    keys += [f"net.ipv4.conf.{d.replace('.', '/')}.forwarding" for d in devs if d in lk]
    sc = sysctls(node, keys)
    out: dict = {
        "node": node.name,
        "ip_forward": sc["net.ipv4.ip_forward"],
        "rp_filter": {"all": sc["net.ipv4.conf.all.rp_filter"], "default": sc["net.ipv4.conf.default.rp_filter"],
                      **{d: sc.get(f"net.ipv4.conf.{d.replace('.', '/')}.rp_filter") for d in devs if d in lk}},
        "forwarding": {d: sc.get(f"net.ipv4.conf.{d.replace('.', '/')}.forwarding") for d in devs if d in lk},
        "bridge_nf_call_iptables": sc["net.bridge.bridge-nf-call-iptables"],
        "conntrack": {"count": sc["net.netfilter.nf_conntrack_count"], "max": sc["net.netfilter.nf_conntrack_max"]},
        "mtu": {d: lk[d]["mtu"] for d in devs if d in lk},
        "links": lk,
        "route": route_get(node, dst, src, iif) if iif else route_get(node, dst),
        "route_back": route_get(node, src),
    }
    return out


def _beyond_route(node: NodeRef, rt: dict, lk: dict, dst: str, pod_netns: int | None,
                  pod_dev: str | None) -> dict:
    """What follows from the route: its next hop (an IPv6 route's neighbour is an NDP
    entry), the pod side of a drop after arrival, down links, uncounted nft drop rules."""
    out: dict = {}
    hop_ip = rt.get("gateway") or (dst if not rt.get("error") else None)
    out_dev = rt.get("dev")
    out["next_hop"] = None
    if hop_ip and out_dev:
        nb = neigh(node, hop_ip, out_dev)
        nh = {"ip": hop_ip, "dev": out_dev, "neigh": nb}
        if lk.get(out_dev, {}).get("kind") == "vxlan":
            entries = fdb(node, out_dev)
            mac = nb["lladdr"] if nb else None
            nh["fdb"] = next((e for e in entries if e["mac"] == mac), None) if mac else None
            nh["vxlan"] = lk[out_dev].get("vxlan")
        out["next_hop"] = nh
    if pod_netns:
        out["pod"] = pod_side(pod_netns, pod_dev)
    bridge = out_dev if lk.get(out_dev, {}).get("kind") == "bridge" else None
    out["down_links"] = linkfacts.down_links(lambda *argv: _json(node, *argv), lk, bridge)
    nft, err = nftfacts.read(lambda *argv: _cmd(node, *argv))
    out["nft_drop_rules"] = nftfacts.uncounted_drops(nft) if not err else None
    out["ipvs"] = ipvsfacts.read(node.netns)
    return out
