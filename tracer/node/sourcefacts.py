"""Source facts: how the source pod's own kernel treats a packet to the destination.

Read from inside the pod's network namespace through a netlink socket made there (the
`ip route get`, `ip neigh` and `ip link` of the pod): the route and its MTU (a locked
route MTU or a cached path MTU), the neighbour entry of the next hop, and the state of the
device the route leaves by. Nothing here changes anything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

from tracer.node import netns

# NUD_* bits of a neighbour entry (include/uapi/linux/neighbour.h)
NUD = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE",
       0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT"}
IFF_UP, IFF_NOARP = 0x1, 0x80
RTAX_MTU = 2          # bit (1 << RTAX_MTU) of RTAX_LOCK: the MTU is locked


def _ipr(ns: str | None):
    from pyroute2 import IPRoute

    if ns is None:
        return IPRoute()
    with netns.entered(ns):
        return IPRoute()


def _err(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else f"{type(exc).__name__}: {exc}"


def _states(bits: int) -> list[str]:
    return [name for bit, name in NUD.items() if bits & bit] or ["NONE"]


def _link(m) -> dict:
    flags = int(m["flags"])
    return {"name": m.get_attr("IFLA_IFNAME"), "up": bool(flags & IFF_UP),
            "operstate": m.get_attr("IFLA_OPERSTATE"), "carrier": m.get_attr("IFLA_CARRIER"),
            "mtu": m.get_attr("IFLA_MTU"), "noarp": bool(flags & IFF_NOARP)}


def _route(ipr, dst: str, names: dict[int, str]) -> dict:
    try:
        found = ipr.route("get", dst=dst, family=socket.AF_INET6 if ":" in dst else socket.AF_INET)
    except Exception as exc:  # pyroute2's NetlinkError: ENETUNREACH when there is no route
        return {"dst": dst, "error": _err(exc)}
    if not found:
        return {"dst": dst, "error": "no answer"}
    m = found[0]
    out = {"dst": dst, "dev": names.get(m.get_attr("RTA_OIF")), "gateway": m.get_attr("RTA_GATEWAY"),
           "prefsrc": m.get_attr("RTA_PREFSRC"), "type": int(m["type"]), "mtu": None, "mtu_locked": False}
    metrics = m.get_attr("RTA_METRICS")
    if metrics is not None:
        out["mtu"] = metrics.get_attr("RTAX_MTU")
        out["mtu_locked"] = bool((metrics.get_attr("RTAX_LOCK") or 0) & (1 << RTAX_MTU))
    if int(m["type"]) != 1:   # RTN_UNICAST; unreachable/prohibit/blackhole routes answer too
        out["error"] = {2: "local", 6: "blackhole route", 7: "unreachable route",
                        8: "prohibit route"}.get(int(m["type"]), f"route type {int(m['type'])}")
        if out["error"] == "local":
            out.pop("error")
    return out


def _neigh(ipr, ip: str, ifindex: int) -> dict | None:
    """The neighbour entry of `ip` (an ARP entry, or an NDP entry for IPv6)."""
    v6 = ":" in ip
    try:
        entries = [n for n in ipr.get_neighbours(ifindex=ifindex, family=socket.AF_INET6 if v6 else socket.AF_INET)
                   if _same(n.get_attr("NDA_DST"), ip)]
    except Exception:  # pyroute2's NetlinkError
        return None
    if not entries:
        return None
    n = entries[0]
    return {"ip": ip, "lladdr": n.get_attr("NDA_LLADDR"), "state": _states(int(n["state"]))}


def _same(a: str | None, b: str) -> bool:
    if a == b:
        return True
    try:
        return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def read(ns: str | None, dst: str) -> dict:
    """The source pod's view of a packet to `dst`: its route (with MTU), the next hop's
    neighbour entry and the state of the device the route leaves by, plus every device."""
    ipr = _ipr(ns)
    with contextlib.closing(ipr):
        links = {int(m["index"]): _link(m) for m in ipr.get_links()}
        names = {i: lk["name"] for i, lk in links.items()}
        route = _route(ipr, dst, names)
        out: dict = {"of": "pod", "route": route, "links": {lk["name"]: lk for lk in links.values()},
                     "device": None, "next_hop": None}
        dev = route.get("dev")
        if dev and not route.get("error"):
            out["device"] = out["links"].get(dev)
            hop = route.get("gateway") or dst
            idx = next((i for i, n in names.items() if n == dev), None)
            nb = _neigh(ipr, hop, idx) if idx is not None else None
            out["next_hop"] = {"ip": hop, "dev": dev, "neigh": nb,
                               "noarp": bool(out["device"] and out["device"]["noarp"])}
        return out
