"""Which drop events count as a packet dropped: one rule, live or offline.

The rule is arrival.Rule's: every `kfree_skb` with a drop reason counts, also one in the
namespace the destination address lives in (the receiving stack dropped it after it
arrived), except socket housekeeping (a closed socket purging its queue), an ICMP echo reply
no ping socket wanted, and the OTHERHOST of a copy a bridge flooded into another pod.
"""

from __future__ import annotations

import numpy as np

from tracer import addrs
from tracer.kernel.record import HOOK_IDS
from tracer.reconstruct import arrival

# kfree_skb reasons of a socket's own cleanup (close, purge)
HOUSEKEEPING_DROPS = arrival.HOUSEKEEPING


def ip_num(s) -> int:
    """An address of either family as a frame's address column holds it (addrs.key), read as
    a signed 64-bit number (what `.astype(np.int64)` makes of the column); 0 for none or a
    bad one."""
    try:
        k = addrs.key(str(s)) if s else 0
    except ValueError:
        return 0
    return k - (1 << 64) if k >= 1 << 63 else k


def homes(meta: dict) -> dict[int, int]:
    """Address (ip_num) → the network namespace (inode) where it lives, when this machine has
    it: pods (Service backends among them, each of their addresses) and nodes, from a trace's
    metadata."""
    placement = {int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()}
    pod_ns = {pod: ino for ino, (node, pod) in placement.items() if pod}
    node_ns = {node: ino for ino, (node, pod) in placement.items() if node and not pod}
    out: dict[int, int] = {}
    for n in meta.get("nodes") or []:
        ino = n.get("netns_inode") or node_ns.get(n.get("name"))
        for ip in _ips(n):
            if ino:
                out[ip_num(ip)] = int(ino)
    for p in meta.get("pods") or []:
        ino = p.get("netns_inode") or pod_ns.get(p.get("key"))
        for ip in _ips(p):
            if ino:
                out[ip_num(ip)] = int(ino)
    out.pop(0, None)
    return out


def _ips(d: dict) -> list[str]:
    """A pod's or node's addresses: `ips` (every family), else `ip`."""
    return [ip for ip in (d.get("ips") or [d.get("ip")]) if ip]


def pod_homes(meta: dict) -> set[int]:
    """The pods' namespaces (inodes) a trace's metadata names."""
    placement = {int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()}
    out = {ino for ino, (node, pod) in placement.items() if pod}
    return out | {int(p["netns_inode"]) for p in meta.get("pods") or [] if p.get("netns_inode")}


def rule(meta: dict) -> arrival.Rule:
    """The drop rule for a trace's metadata: its kernel's reasons, addresses and pods."""
    return arrival.Rule.of(meta.get("drop_reasons") or {}, homes(meta), pod_homes(meta))


def housekeeping(hook: np.ndarray, reason: np.ndarray, rule: arrival.Rule, proto=None, tcp_flags=None,
                 netns=None, daddr=None) -> np.ndarray:
    """Mask of the drop events that are a socket's own work (arrival.Rule.socket_cleanup: a
    closing socket's cleanup, HOUSEKEEPING_DROPS, and a reset freed at its destination): the
    stack's ordinary drops, shown beside the drops of the traced packets, never among them."""
    is_drop = np.asarray(hook) == HOOK_IDS["drop"]
    home = rule.home_ns(daddr) if daddr is not None else None
    return is_drop & rule.socket_cleanup(reason, proto, tcp_flags, netns, home)


def housekeeping_in(events, meta: dict) -> int:
    """How many drop events of a trace's event table are a socket's own cleanup: the figure
    `capture` counts live as the stack's ordinary drops."""
    if not len(events) or "reason" not in events or "hook" not in events:
        return 0
    reason = events["reason"]
    if not np.issubdtype(np.asarray(reason).dtype, np.integer):   # reason names: back to the kernel's numbers
        code = {v: int(k) for k, v in (meta.get("drop_reasons") or {}).items()}
        reason = np.array([code.get(str(x), -1) for x in reason], dtype=np.int64)
    return int(housekeeping(events["hook"], reason, rule(meta), events["proto"].to_numpy(),
                            events["tcp_flags"].to_numpy() if "tcp_flags" in events else None,
                            events["netns"].to_numpy(), events["daddr"].to_numpy()).sum())


def counted(hook: np.ndarray, reason: np.ndarray, netns: np.ndarray, daddr: np.ndarray,
            proto: np.ndarray, icmp_type: np.ndarray, rule: arrival.Rule, tcp_flags=None) -> np.ndarray:
    """Mask of the drop events that are packets dropped (see the module doc)."""
    is_drop = np.asarray(hook) == HOOK_IDS["drop"]
    keep = is_drop.copy()
    if keep.any():
        at = np.flatnonzero(keep)
        keep[at] = ~rule.excused(np.asarray(reason)[at], np.asarray(proto)[at], np.asarray(icmp_type)[at],
                                 np.asarray(netns)[at], np.asarray(daddr)[at],
                                 tcp_flags=None if tcp_flags is None else np.asarray(tcp_flags)[at])
    return keep
