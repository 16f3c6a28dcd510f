"""Causes proven by node facts read on both sides: dead links, overlay ports, uncounted nftables rules.

Each rule returns (cause, hint, runbook file, evidence) or None, and names a cause only when
the facts that prove it were read and agree. `all_normal` says what was checked when no
cause fits, so a verdict without a cause still tells what it is not.
"""

from __future__ import annotations

from tracer.node import linkfacts, nftfacts
from tracer.reconstruct.model import Hop, Packet

Found = tuple[str, str, str, dict]

# Drop reasons (or none: lost) a dead link can explain: the packet waited for a neighbour
# that never answered, vanished on its way out, or (OTHERHOST) was flooded by the bridge to
# the other ports because the port that leads to its MAC is down.
_LINK_REASONS = (None, "NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "DEV_READY", "NOT_SPECIFIED",
                 "NO_TX_TARGET", "IP_OUTNOROUTES", "IP_INNOROUTES", "OTHERHOST")


def chain_sentence(hop: Hop | None, node_ips=()) -> str:
    """Where a netfilter drop happened, from the hop it was last seen on: the encapsulated
    overlay packet (or anything addressed to the node) meets INPUT; forwarded pod traffic
    meets FORWARD; without the hop, both are said."""
    if hop is None:
        return ("an iptables/nftables rule dropped it (forwarded pod traffic meets the FORWARD chain, "
                "traffic addressed to the node itself, such as the overlay's encapsulated packets, "
                "meets INPUT)")
    if hop.pod is not None:
        return f"an iptables/nftables rule inside the pod {hop.pod} dropped it (the pod's own netfilter rules)"
    if hop.encap is not None and hop.node is None:   # on the underlay itself (the lab's fabric)
        what = "IP protocol 4 (IP-in-IP)" if hop.encap.type == "ipip" else "the overlay's UDP port"
        return (f"a filter on the underlay between the nodes dropped the encapsulated packet ({hop.encap.type} "
                f"from {hop.encap.src} to {hop.encap.dst}): the network must let {what} pass between nodes")
    if hop.encap is not None:
        said = f" ({hop.encap.type} from {hop.encap.src} to {hop.encap.dst})" if hop.encap.src else ""
        return (f"an iptables/nftables rule dropped it; the encapsulated overlay packet{said} is "
                "addressed to the node itself, so the rules "
                "that see it are in PREROUTING and INPUT (not FORWARD): look for a rule on "
                + ("IP protocol 4 (IP-in-IP)" if hop.encap.type == "ipip" else "the overlay's UDP port"))
    if hop.dst in set(node_ips):
        return ("an iptables/nftables rule dropped it; the packet is addressed to the node itself, so the "
                "rules that see it are in PREROUTING and INPUT (not FORWARD)")
    return ("an iptables/nftables rule dropped it; forwarded pod traffic is filtered in the FORWARD chain "
            "of the filter table on that node")


def path_links(packet: Packet, node: str, f: dict) -> dict[str, dict]:
    """The state of every device of `node` the packet passed, and of the one its route leaves by."""
    lk = f.get("links") or {}
    devs = [h.dev for h in packet.hops if h.node == node and h.pod is None]
    out_dev = (f.get("route") or {}).get("dev")
    out = {}
    for d in dict.fromkeys([*devs, *([out_dev] if out_dev else [])]):
        if d in lk:
            link = lk[d]
            out[d] = {k: link.get(k) for k in ("admin_up", "carrier", "operstate") if k in link}
    return out


def link_down(packet: Packet, reason: str | None, node: str, f: dict) -> Found | None:
    """A device the packet passed, the one its route leaves by, or the bridge port that leads
    to its next hop cannot carry packets (admin down or no carrier)."""
    if reason not in _LINK_REASONS:
        return None
    lk = f.get("links") or {}
    seen = path_links(packet, node, f)
    states = {"links": seen}
    out_dev = (f.get("route") or {}).get("dev")
    for dev in seen:
        link = lk.get(dev) or {}
        if "carrier" in link and not linkfacts.usable(link):
            via = "the device its route leaves by" if dev == out_dev and dev not in _passed(packet, node) \
                else "a device on the packet's path"
            return ("link-down", f"On {node}, {linkfacts.why_down(dev, link)}, {via}, is down: "
                    "nothing passes it.", "link-down.md", states)
    nh = f.get("next_hop") or {}
    target = nh.get("ip") or packet.hops[-1].dst
    for port in f.get("down_links") or []:
        if target in (port.get("peer_addrs") or []) or packet.hops[-1].dst in (port.get("peer_addrs") or []):
            name = linkfacts.why_down(port["dev"], port)
            what = f"{port['master']}'s port {name}" if port.get("master") else name
            then = ("the bridge cannot deliver to it (its neighbour entry does not resolve, or frames for it are "
                    "flooded to the other ports)" if port.get("master")
                    else "the routes through it are gone with it")
            return ("link-down", f"On {node}, {what} is down, and it is the link to "
                    f"{target} ({port.get('peer_netns') or 'its namespace'}): {then}.", "link-down.md",
                    {**states, "down_links": f.get("down_links")})
    return None


def _passed(packet: Packet, node: str) -> set[str]:
    return {h.dev for h in packet.hops if h.node == node}


def sender_node(packet: Packet, receiver: str | None) -> str | None:
    """The node that encapsulated the packet: the last node other than the receiver it left encapsulated."""
    for h in reversed(packet.hops):
        if h.encap is not None and h.node is not None and h.node != receiver and h.point == "tx":
            return h.node
    return None


def overlay_suspect(packet: Packet, reason: str | None) -> bool:
    """NO_SOCKET on an encapsulated packet: no overlay socket on the UDP port it was sent to."""
    return reason == "NO_SOCKET" and packet.hops[-1].encap is not None


def overlay_port(packet: Packet, receiver: str, rf: dict | None, sf: dict | None) -> tuple[Found | None, dict]:
    """The overlay-port cause when the sender's VXLAN port and the receiver's were both read
    and differ; else None, with what was read (the evidence of the comparison)."""
    sender = sender_node(packet, receiver)
    rports = _vxlan_ports(rf)
    sport_dev, sport = _sender_port(packet, sender, sf)
    ev = {"overlay_ports": {"sender": {"node": sender, "dev": sport_dev, "port": sport},
                            "receiver": {"node": receiver, "ports": rports}}}
    if sport is None or not rports:
        ev["overlay_ports"]["compared"] = False
        return None, ev
    ev["overlay_ports"]["compared"] = True
    if sport in rports.values():
        return None, ev
    theirs = ", ".join(f"{d} {p}" for d, p in rports.items())
    return (("overlay-port", f"{sender}'s {sport_dev} sends VXLAN to UDP port {sport}, but {receiver}'s overlay "
             f"listens on {theirs}: nothing on {receiver} receives port {sport} (VXLAN port mismatch between "
             "nodes).", "overlay.md", ev), ev)


def _vxlan_ports(f: dict | None) -> dict[str, int]:
    lk = (f or {}).get("links") or {}
    return {d: link["vxlan_port"] for d, link in lk.items()
            if link.get("kind") == "vxlan" and link.get("vxlan_port") is not None}


def _sender_port(packet: Packet, sender: str | None, f: dict | None) -> tuple[str | None, int | None]:
    ports = _vxlan_ports(f)
    if sender is None or not ports:
        return None, None
    for h in packet.hops:
        if h.node == sender and h.dev in ports:
            return h.dev, ports[h.dev]
    if len(ports) == 1:
        return next(iter(ports.items()))
    return None, None


def uncounted_rule(packet: Packet, node: str, f: dict) -> Found | None:
    """A native nftables drop rule without a counter that names this packet's addresses
    (inner or outer): the likely rule of a NETFILTER_DROP nothing counted."""
    addrs = {a for h in packet.hops for a in (h.src, h.dst)}
    addrs |= {a for h in packet.hops if h.encap for a in (h.encap.src, h.encap.dst)}
    rules = [r for r in (f.get("nft_drop_rules") or []) if nftfacts.matches(r, addrs)]
    if not rules:
        return None
    r = rules[0]
    return ("netfilter-rule", f"Dropped on {node}, likely by {nft_where(r)} rule `{r['rule']}`: it drops "
            "packets with this packet's addresses and has no counter, so the drop was not counted.",
            "netfilter-drop.md", {"netfilter": [{**r, "counted": False}]})


def nft_where(hit: dict) -> str:
    """`table inet ptfault chain fwd (hook forward)`."""
    return f"table {hit['table']} chain {hit['chain']}" + (f" (hook {hit['hook']})" if hit.get("hook") else "")


def all_normal(node: str, f: dict, packet: Packet) -> str:
    """What was checked on the node and found normal, as one clause."""
    said = []
    if f.get("ip_forward") is not None:
        said.append(f"ip_forward {'on' if f['ip_forward'] else 'off'}")
    rpf = f.get("rp_filter") or {}
    if rpf:
        vals = sorted({v for v in rpf.values() if v is not None})
        said.append("rp_filter " + "/".join(str(v) for v in vals))
    rt = f.get("route") or {}
    if rt and not rt.get("error"):
        said.append(f"route via {rt['gateway'] + ' ' if rt.get('gateway') else ''}{rt.get('dev')}")
    nh = f.get("next_hop") or {}
    nb = nh.get("neigh")
    if nb:
        said.append(f"neighbour {nh.get('ip')} {'/'.join(nb.get('state') or []) or 'known'}")
    odd = bool(nb and set(nb.get("state") or []) & {"FAILED", "INCOMPLETE"})
    if nh.get("vxlan") is not None:
        said.append("FDB ok" if nh.get("fdb") else "FDB entry absent")
        odd = odd or not nh.get("fdb")
    links = path_links(packet, node, f)
    if links:
        down = [d for d, s in links.items() if s.get("admin_up") is False or s.get("carrier") is False]
        said.append("links up" if not down else f"links down: {', '.join(down)}")
        odd = odd or bool(down)
    ct = f.get("conntrack") or {}
    if ct.get("count") is not None and ct.get("max"):
        said.append(f"conntrack {ct['count']}/{ct['max']}")
    if not said:
        return ""
    return f"checked on {node}: {', '.join(said)}" + ("" if odd else ": all normal")
