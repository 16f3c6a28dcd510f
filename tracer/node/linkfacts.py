"""Link state facts: whether each device can carry a packet, and what sits behind a dead bridge port.

A device carries packets only when it is administratively up (flag UP) and has a carrier
(flag LOWER_UP; a veth loses it when its peer is set down). A VXLAN device's UDP port
(IFLA_VXLAN_PORT) is both where it sends to and where it listens.
Nothing here changes anything: reads go through `ip -j` in the node's namespace.
"""

from __future__ import annotations

import json
import subprocess
from typing import Callable

# run_json(*argv) -> (parsed JSON or None, error or None), in the node's namespace
RunJson = Callable[..., tuple]


def state(link: dict) -> dict:
    """The state entries of one `ip -j -d link show` entry."""
    flags = link.get("flags", [])
    info = link.get("linkinfo") or {}
    data = info.get("info_data") or {}
    out = {"admin_up": "UP" in flags,
           "carrier": "LOWER_UP" in flags and "NO-CARRIER" not in flags,
           "operstate": link.get("operstate"),
           "master": link.get("master"),
           "peer_netnsid": link.get("link_netnsid")}
    if info.get("info_kind") == "vxlan":
        rng = data.get("port_range") or {}
        out["vxlan_port"] = data.get("port")
        out["vxlan_srcports"] = [rng.get("low"), rng.get("high")] if rng else None
    return out


def usable(link: dict | None) -> bool:
    """A device that is up with a carrier (loopback and devices without state count as up)."""
    if not link:
        return True
    return bool(link.get("admin_up", link.get("up", True))) and bool(link.get("carrier", True))


def why_down(name: str, link: dict) -> str:
    """`veth1 (admin down)` / `veth1 (no carrier, operstate LOWERLAYERDOWN)`."""
    said = []
    if not link.get("admin_up", link.get("up", True)):
        said.append("admin down")
    elif not link.get("carrier", True):
        said.append("no carrier: its other end is down")
    if link.get("operstate"):
        said.append(f"operstate {link['operstate']}")
    return f"{name} ({', '.join(said)})"


def down_links(run_json: RunJson, links: dict[str, dict], bridge: str | None) -> list[dict]:
    """The links that cannot carry packets among the ports of `bridge` and the devices whose
    peer lives in another namespace (veths), each with the addresses of that namespace (when
    it has a name): the pod behind it."""
    names = None
    out = []
    for name, link in links.items():
        if usable(link) or not ((bridge and link.get("master") == bridge) or link.get("peer_netnsid") is not None):
            continue
        peer_ns = None
        addrs: list[str] = []
        nsid = link.get("peer_netnsid")
        if nsid is not None:
            if names is None:
                names = _nsid_names(run_json)
            peer_ns = names.get(nsid)
            if peer_ns:
                addrs = _addresses(peer_ns)
        out.append({"dev": name, "master": link.get("master"), "admin_up": link.get("admin_up"), "carrier": link.get("carrier"),
                    "operstate": link.get("operstate"), "peer_netns": peer_ns, "peer_addrs": addrs})
    return out


def _nsid_names(run_json: RunJson) -> dict[int, str]:
    data, err = run_json("ip", "-j", "netns", "list-id")
    if err or not data:
        return {}
    return {e["nsid"]: e["name"] for e in data if isinstance(e, dict) and e.get("name") and "nsid" in e}


def _addresses(ns: str) -> list[str]:
    """The addresses inside a named namespace (`ip -n NS`: a name is global to the host)."""
    try:
        r = subprocess.run(["ip", "-n", ns, "-j", "addr", "show"], capture_output=True, text=True, timeout=5)
        data = json.loads(r.stdout or "[]") if r.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return []
    return [a["local"] for link in data for a in link.get("addr_info", [])
            if a.get("local") and a.get("scope") != "host"]
