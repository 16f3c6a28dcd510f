"""IPVS virtual servers and their real servers, as kube-proxy's ipvs mode leaves them.

Read from /proc/net/ip_vs inside the node's namespace (no `ipvsadm` needed); a kernel
without IPVS has no such file and the node simply has no virtual servers. Nothing here
changes anything.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from tracer.node import netns


def read(ns: str | None) -> list[dict] | None:
    """The node's virtual servers (None: this kernel or namespace has no IPVS)."""
    def text() -> str | None:
        try:
            return Path("/proc/net/ip_vs").read_text()
        except OSError:
            return None
    if ns:
        with netns.entered(ns):
            raw = text()
    else:
        raw = text()
    return None if raw is None else parse(raw)


def parse(text: str) -> list[dict]:
    """/proc/net/ip_vs → [{"proto", "vip", "port", "scheduler", "reals": [{"ip", "port",
    "forward", "weight", "active", "inactive"}]}]."""
    out: list[dict] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] in ("TCP", "UDP", "SCTP") and len(words) >= 3:
            ip, port = _addr(words[1])
            out.append({"proto": words[0].lower(), "vip": ip, "port": port, "scheduler": words[2],
                        "reals": []})
        elif words[0] == "->" and out and len(words) >= 6 and words[1] != "RemoteAddress:Port":
            ip, port = _addr(words[1])
            out[-1]["reals"].append({"ip": ip, "port": port, "forward": words[2], "weight": int(words[3]),
                                     "active": int(words[4]), "inactive": int(words[5])})
    return out


def _addr(word: str) -> tuple[str, int]:
    """"0A60000A:0050" or "[fd00:0010:…]:0050" → ("10.96.0.10", 80)."""
    host, port = word.rsplit(":", 1)
    if host.startswith("["):
        ip = str(ipaddress.IPv6Address(host.strip("[]")))
    else:
        ip = str(ipaddress.IPv4Address(int(host, 16)))
    return ip, int(port, 16)


def unserved(servers: list[dict] | None, ip: str | None, port: int | None, proto: str | None) -> dict | None:
    """The virtual server for ip:port/proto when it can take no new connection: no real
    server, or every one at weight 0 (quiescent: kube-proxy's terminating endpoints)."""
    for vs in servers or []:
        if vs["vip"] == ip and vs["port"] == port and vs["proto"] == proto:
            if not any(r["weight"] > 0 for r in vs["reals"]):
                return vs
    return None
