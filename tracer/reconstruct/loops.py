"""Routing loops: one packet going round the same devices until its TTL runs out.

A packet is recognised by its content (packets.py), which a loop does not change (only the
TTL drops by one per router), so a looping packet's hops show the same places again and again,
each time with a lower TTL. A place (namespace, device, point) seen with `MIN_ROUNDS` different
TTLs or more is a loop: nothing else sends one packet through one device in one direction
three times. Datagrams of equal content (IP ID 0 ones) may fall into one group; they pass a
place with the same TTL, which is why TTLs are counted, not visits (hops without a recorded
TTL count each visit).
"""

from __future__ import annotations

from collections import Counter

from tracer.reconstruct.model import Hop, Packet

MIN_ROUNDS = 3       # times one place must be seen before the packet is said to loop


def _place(h: Hop) -> tuple:
    return (h.netns, h.node, h.pod, h.dev, h.point)


def find_loop(hops: tuple[Hop, ...] | list[Hop]) -> dict | None:
    """The cycle a looping packet went round, or None: `rounds` (how many times round),
    `cycle` (the hops of one round, from the first place that repeats), `nodes` (the nodes
    the cycle crosses, in order, None for the fabric) and `left_to` (the outer destination
    of the tunnel the cycle left by, when a node of the loop was not traced)."""
    places = [_place(h) for h in hops]
    visits = Counter(places)
    ttls: dict[tuple, set] = {}
    for p, h in zip(places, hops):
        ttls.setdefault(p, set()).add(h.ttl)
    counts = {p: (n if ttls[p] & {None, 0} else len(ttls[p])) for p, n in visits.items()}
    first = next((i for i, p in enumerate(places) if counts[p] >= MIN_ROUNDS), None)
    if first is None:
        return None
    again = places.index(places[first], first + 1)
    cycle = list(hops[first:again])
    nodes = list(dict.fromkeys(h.node for h in cycle if h.node is not None))
    outer = [h.encap.dst for h in cycle if h.encap is not None and h.point == "tx"]
    return {"rounds": counts[places[first]], "cycle": cycle, "nodes": nodes,
            "left_to": outer[-1] if len(nodes) < 2 and outer else None}


def loop_nodes(packet: Packet) -> list[str]:
    """The nodes whose routes explain a looping packet (none when it does not loop or was
    delivered)."""
    if packet.verdict.status == "delivered":
        return []
    loop = find_loop(packet.hops)
    return loop["nodes"] if loop else []


def _route_text(route: dict | None) -> str:
    """`ip route get` facts → "via GATEWAY dev DEV" (or what is known)."""
    if not route:
        return "(route not read)"
    if route.get("error"):
        return f"(no route: {route['error']})"
    words = ([f"via {route['gateway']}"] if route.get("gateway") else []) + (
        [f"dev {route['dev']}"] if route.get("dev") else [])
    return " ".join(words) or "(route not read)"


def describe(packet: Packet, loop: dict, routes: dict[str, dict | None]) -> tuple[str, dict]:
    """(the sentence for a person, the evidence) of a loop; `routes`: node → its `ip route
    get` facts for the packet (None when not read)."""
    dst = packet.hops[-1].dst
    nodes = loop["nodes"]
    steps: list[tuple[str, str]] = []
    for h in loop["cycle"]:
        if h.node is not None and h.pod is None and (not steps or steps[-1] != (h.node, h.dev)):
            steps.append((h.node, h.dev))
    words = [(f"{n} {d}" if i == 0 or steps[i - 1][0] != n else d) for i, (n, d) in enumerate(steps)]
    path = " → ".join(words + ["…"])
    if len(nodes) >= 2:
        between = " and ".join([", ".join(nodes[:-1]), nodes[-1]])
    elif nodes and loop.get("left_to"):
        between = f"{nodes[0]} and the untraced node at {loop['left_to']}"
    else:
        between = nodes[0] if nodes else "the fabric"
    said = []
    for i, n in enumerate(nodes):
        r = _route_text(routes.get(n))
        said.append(f"{n} routes {dst} {r}" if i == 0 else f"{n} routes it {'back ' if i == len(nodes) - 1 else ''}{r}")
    sentence = (f"The packet looped between {between} ({path} {loop['rounds']} times) until its "
                "TTL ran out" + (": " + ", ".join(said) if said else "") + ".")
    evidence = {"loop": {"rounds": loop["rounds"], "nodes": nodes,
                         "cycle": [f"{h.node or 'fabric'}/{h.dev}/{h.point}" for h in loop["cycle"]],
                         "left_to": loop.get("left_to")},
                "routes": {n: routes.get(n) for n in nodes}}
    return sentence, evidence
