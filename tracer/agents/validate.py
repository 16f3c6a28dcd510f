"""The bounds a served agent holds every client frame to: the command line's, nothing looser.

A served agent (tracer/agents/server.py) takes requests from whoever reaches its loopback
port with the token, so each field is checked here before anything is traced: addresses
parse, ports, counts, durations and sizes are inside the ranges `podtrace flow` accepts,
device names are interface names (no path, no option, no other namespace's device), lists
are bounded, and no key is unknown. A request for a namespace by path (a lab's node or pod
namespace) is refused: a node's agent finds its pods' namespaces itself, by address.
"""

from __future__ import annotations

import ipaddress
import re

from tracer.agents import request
from tracer.kernel.contract import MAX_ADDRS   # the kernel filter's size: addresses under trace
from tracer.node import prober

# The command line's ranges (tracer/cli/flow.py, tracer/runs/plan.py).
COUNT = (1, 1000)
TIMEOUT_S = (0.05, 30.0)
INTERVAL_S = (0.0, 1.0)
SETTLE_S = (0.0, 5.0)
SIZE = (28 + len(prober.PAYLOAD), 65000)
PORT = (1, 65535)
SAMPLE = (1, 65536)
BUDGET = (0, 10_000_000)
# The longest trace a command line asks for: --duration 3600, or 1000 probes of 30 s, plus
# the minute the planner adds.
MAX_SECONDS = (0.1, COUNT[1] * (TIMEOUT_S[1] + INTERVAL_S[1]) + 60)
MAX_DISCOVER = 16384       # pod and node addresses a cluster's agent looks for
MAX_NETNS = 1024
MAX_DEVICES = 64
MAX_QUERIES = 256
MAX_NAME = 253             # a DNS-1123 subdomain: node names
NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# An interface name as the kernel takes one (dev_valid_name): at most IFNAMSIZ-1 bytes, no
# "/" (so never a path), ":" or white space, not "." or ".." — and here also no leading "-"
# (never an option to `tc`/`ip`) and nothing unprintable.
IFNAME = re.compile(r"^(?!-)(?!\.{1,2}$)[^/:\s]{1,15}$")
POD_KEY = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
PROTOS = ("icmp", "tcp", "udp")
COMMANDS = ("probe", "stop-probes", "drain", "facts", "stop", "sample")


class Refused(ValueError):
    """A client frame outside the bounds; the message names the field and the bound."""


def _keys(d, allowed: set[str], what: str) -> dict:
    if not isinstance(d, dict):
        raise Refused(f"{what} must be an object")
    extra = sorted(set(d) - allowed)
    if extra:
        raise Refused(f"{what} has unknown field(s) {', '.join(repr(k)[:40] for k in extra[:5])}")
    return d


def _int(v, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Refused(f"{what} must be an integer")
    if not lo <= v <= hi:
        raise Refused(f"{what} {v} is out of range ({lo}..{hi})")
    return v


def _num(v, lo: float, hi: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise Refused(f"{what} must be a number")
    if not lo <= v <= hi:
        raise Refused(f"{what} {v} is out of range ({lo}..{hi})")
    return float(v)


def address(v, what: str) -> str:
    """`v` unchanged if it is an IPv4 or IPv6 address (no zone: "fe80::1%eth0" is refused)."""
    if not isinstance(v, str) or len(v) > 45:
        raise Refused(f"{what} must be an IP address")
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise Refused(f"{what} {v[:45]!r} is not an IP address") from None
    if "%" in v:
        raise Refused(f"{what} {v[:45]!r} carries a zone: not an address a trace can use")
    return v


def _addresses(v, limit: int, what: str, at_least: int = 0) -> list[str]:
    if not isinstance(v, list):
        raise Refused(f"{what} must be a list of IP addresses")
    if not at_least <= len(v) <= limit:
        raise Refused(f"{what} holds {len(v)} addresses ({at_least}..{limit} allowed)")
    return [address(a, what) for a in v]


def ifname(v, what: str) -> str:
    if not isinstance(v, str) or not IFNAME.match(v) or len(v.encode()) > 15 or not v.isprintable():
        raise Refused(f"{what} {str(v)[:40]!r} is not an interface name")
    return v


def node_name(v, what: str = "node") -> str:
    if not isinstance(v, str) or not NODE_NAME.match(v):
        raise Refused(f"{what} {str(v)[:60]!r} is not a node name")
    return v


def _probe(d) -> request.ProbeRequest:
    d = _keys(d, set(request.ProbeRequest.__dataclass_fields__), "probe")
    for k in ("src", "dst", "proto", "count", "timeout", "interval"):
        if k not in d:
            raise Refused(f"probe lacks {k}")
    if d.get("netns") is not None:
        raise Refused("probe.netns is refused: this agent finds the source pod's namespace by its address")
    src, dst = address(d["src"], "probe.src"), address(d["dst"], "probe.dst")
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise Refused("probe.src and probe.dst are of different IP families")
    proto = d["proto"]
    if proto not in PROTOS:
        raise Refused(f"probe.proto {str(proto)[:20]!r} is not one of {', '.join(PROTOS)}")
    port = None if d.get("port") is None else _int(d["port"], *PORT, "probe.port")
    if proto != "icmp" and port is None:
        raise Refused(f"a {proto} probe needs probe.port")
    size = None if d.get("size") is None else _int(d["size"], *SIZE, "probe.size")
    sport = None if d.get("sport") is None else _int(d["sport"], *PORT, "probe.sport")
    return request.ProbeRequest(
        netns=None, src=src, dst=dst, proto=proto, port=port,
        count=_int(d["count"], *COUNT, "probe.count"), timeout=_num(d["timeout"], *TIMEOUT_S, "probe.timeout"),
        interval=_num(d["interval"], *INTERVAL_S, "probe.interval"), size=size, sport=sport,
        settle=_num(d.get("settle", 0.05), *SETTLE_S, "probe.settle"))


def _devices(v) -> list[tuple[None, str]] | str:
    if v == "auto":
        return "auto"
    if not isinstance(v, list) or len(v) > MAX_DEVICES:
        raise Refused(f'tc_devices must be "auto" or a list of at most {MAX_DEVICES} devices')
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise Refused("tc_devices entries are [namespace, device] pairs")
        if item[0] is not None:
            raise Refused("tc_devices names a device of another namespace: this agent attaches on its node's only")
        out.append((None, ifname(item[1], "tc_devices device")))
    return out


def trace_request(doc, node: str | None = None) -> request.AgentRequest:
    """The typed request from a client's `request` payload, or Refused. `node`: the node
    this agent runs on (a request for another node is refused)."""
    d = _keys(doc, set(request.AgentRequest.__dataclass_fields__), "request")
    if type(d.get("version")) is not int or d["version"] != request.REQUEST_VERSION:
        raise Refused(f"unsupported request version {str(d.get('version'))[:10]} "
                      f"(this agent speaks {request.REQUEST_VERSION})")
    if "node" not in d or "addrs" not in d:
        raise Refused("request lacks node or addrs")
    name = node_name(d["node"])
    if node is not None and name != node:
        raise Refused(f"request for node {name!r} reached the agent of {node!r}")
    if d.get("node_netns") is not None:
        raise Refused("node_netns is refused: this agent traces the node it runs on")
    nf = d.get("netns_filter")
    if nf is not None:
        if not isinstance(nf, list) or len(nf) > MAX_NETNS:
            raise Refused(f"netns_filter must be a list of at most {MAX_NETNS} namespace inodes")
        nf = [_int(i, 1, (1 << 64) - 1, "netns_filter inode") for i in nf]
    disc = d.get("discover")
    if disc is not None:
        disc = _keys(disc, {"pod_ips", "node_ips"}, "discover")
        disc = request.Discovery(pod_ips=_addresses(disc.get("pod_ips", []), MAX_DISCOVER, "discover.pod_ips"),
                                 node_ips=_addresses(disc.get("node_ips", []), MAX_DISCOVER, "discover.node_ips"))
    probe = None if d.get("probe") is None else _probe(d["probe"])
    tc_observers = d.get("tc_observers")
    if tc_observers not in (None, "auto", "all"):
        raise Refused('tc_observers must be "auto" or "all"')
    if probe is not None and disc is None:
        raise Refused("a probe needs discover: the agent finds the source pod by its address")
    return request.AgentRequest(
        node=name, addrs=_addresses(d["addrs"], MAX_ADDRS, "addrs", at_least=1), node_netns=None,
        netns_filter=nf, tc_devices=_devices(d.get("tc_devices", [])), discover=disc, probe=probe,
        tc_observers=None if tc_observers == "auto" else tc_observers,
        sample=_int(d.get("sample", 1), *SAMPLE, "sample"), budget=_int(d.get("budget", 0), *BUDGET, "budget"),
        max_seconds=_num(d.get("max_seconds", 3600), *MAX_SECONDS, "max_seconds"))


def _query(q) -> dict:
    if isinstance(q, dict) and q.get("kind") == "source":
        q = _keys(q, {"kind", "pod", "src", "dst", "size"}, "source query")
        pod = q.get("pod")
        if pod is not None and (not isinstance(pod, str) or not POD_KEY.match(pod)):
            raise Refused(f"source query pod {str(pod)[:60]!r} is not NAMESPACE/NAME")
        return {"kind": "source", "pod": pod, "src": address(q.get("src"), "query src"),
                "dst": address(q.get("dst"), "query dst"),
                "size": None if q.get("size") is None else _int(q["size"], *SIZE, "query size")}
    q = _keys(q, {"src", "dst", "iif", "devs", "pod_netns", "pod_dev"}, "facts query")
    devs = q.get("devs", [])
    if not isinstance(devs, list) or len(devs) > MAX_DEVICES:
        raise Refused(f"query devs must be a list of at most {MAX_DEVICES} interface names")
    out = {"src": address(q.get("src"), "query src"), "dst": address(q.get("dst"), "query dst"),
           "iif": None if q.get("iif") is None else ifname(q["iif"], "query iif"),
           "devs": [ifname(x, "query device") for x in devs]}
    if q.get("pod_netns") is not None:
        out["pod_netns"] = _int(q["pod_netns"], 1, (1 << 64) - 1, "query pod_netns")
    if q.get("pod_dev") is not None:
        out["pod_dev"] = ifname(q["pod_dev"], "query pod_dev")
    return out


def command(doc) -> dict:
    """A steering command, rebuilt from its checked fields only."""
    if not isinstance(doc, dict) or doc.get("cmd") not in COMMANDS:
        raise Refused(f"unknown command (this agent takes {', '.join(COMMANDS)})")
    what = doc["cmd"]
    if what == "probe":
        d = _keys(doc, {"cmd", "progress"}, "probe command")
        return {"cmd": "probe", "progress": bool(d.get("progress", False) is True)}
    if what == "facts":
        d = _keys(doc, {"cmd", "queries"}, "facts command")
        qs = d.get("queries", [])
        if not isinstance(qs, list) or len(qs) > MAX_QUERIES:
            raise Refused(f"facts queries must be a list of at most {MAX_QUERIES}")
        return {"cmd": "facts", "queries": [_query(q) for q in qs]}
    if what == "sample":    # raise the kernel sampling to 1 packet in n (--sample's range)
        d = _keys(doc, {"cmd", "n"}, "sample command")
        if "n" not in d:
            raise Refused("sample command lacks n")
        return {"cmd": "sample", "n": _int(d["n"], *SAMPLE, "sample n")}
    _keys(doc, {"cmd"}, f"{what} command")
    return {"cmd": what}
