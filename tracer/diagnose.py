"""Verdicts: what happened to a packet, in one sentence, with the runbook to follow."""

from __future__ import annotations

RUNBOOK_DIR = "docs/runbooks"

# Drop reason (kernel name without SKB_DROP_REASON_) → (hint, runbook file).
REASON_HINTS: dict[str, tuple[str, str]] = {
    "NETFILTER_DROP": ("an iptables/nftables rule dropped it; forwarded pod traffic is filtered "
                       "in the FORWARD chain of the filter table on that node", "netfilter-drop.md"),
    "IP_RPFILTER": ("reverse-path filtering rejected the source address (rp_filter strict with an "
                    "asymmetric route)", "rp-filter.md"),
    "IP_OUTNOROUTES": ("the node has no route for the destination", "no-route.md"),
    "IP_INNOROUTES": ("the node has no route for the destination", "no-route.md"),
    "NEIGH_FAILED": ("the next hop's MAC address could not be resolved (ARP/neighbour entry "
                     "missing)", "neighbour.md"),
    "NEIGH_QUEUEFULL": ("too many packets waiting for ARP resolution of the next hop", "neighbour.md"),
    "PKT_TOO_BIG": ("the packet is larger than the path MTU and has DF set", "mtu.md"),
    "NO_SOCKET": ("nothing listens on the destination port", "no-socket.md"),
    "OTHERHOST": ("the frame was addressed to another host's MAC", "neighbour.md"),
    "IP_INADDRERRORS": ("the destination address is not valid on this node", "no-route.md"),
    "VXLAN_INVALID_HDR": ("the overlay received a malformed VXLAN header", "overlay.md"),
    "VXLAN_VNI_NOT_FOUND": ("the overlay has no device for this VNI", "overlay.md"),
    "TC_INGRESS": ("a tc ingress program or filter dropped it", "tc-drop.md"),
    "TC_EGRESS": ("a tc egress program or filter dropped it", "tc-drop.md"),
}


def _where(node: str | None, dev: str | None) -> str:
    return f"{node or 'the fabric'}" + (f" ({dev})" if dev else "")


def delivered(at: dict) -> dict:
    return {"status": "delivered", "node": at["node"], "dev": at["dev"], "point": at["point"],
            "reason": None, "location": None, "hint": None, "runbook": None}


def dropped(node: str | None, dev: str | None, reason: str, location: str | None, last: dict) -> dict:
    hint, book = REASON_HINTS.get(reason, (f"the kernel dropped it ({reason})", "kernel-drop.md"))
    return {"status": "dropped", "node": node, "dev": dev, "point": "drop", "reason": reason,
            "location": location, "hint": f"Dropped on {_where(node, dev)}: {hint}.",
            "runbook": f"{RUNBOOK_DIR}/{book}"}


def lost(last: dict) -> dict:
    return {"status": "lost", "node": last["node"], "dev": last["dev"], "point": last["point"],
            "reason": None, "location": None,
            "hint": (f"Last seen on {_where(last['node'], last['dev'])} ({last['point']}); no drop "
                     "was observed after it: check routes, neighbour/FDB entries and MTU there."),
            "runbook": f"{RUNBOOK_DIR}/packet-lost.md"}
