"""Which drop events count as a packet dropped on its way: one rule, live or offline.

A packet that reached the namespace its destination address lives in was delivered (the
reconstruction says so); a `kfree_skb` there afterwards (an echo reply no ping socket
wanted, a datagram to a closed port) is the destination's own business, not a drop on the
way. Socket housekeeping (a closed socket purging its queue) is no drop either.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from tracer.kernel.record import HOOK_IDS

# kfree_skb reasons of a socket's own cleanup (close, purge)
HOUSEKEEPING_DROPS = frozenset({"QUEUE_PURGE", "SOCKET_CLOSE"})


def ip_num(s) -> int:
    """An IPv4 address as the events carry it (a number); 0 for none or a bad one."""
    try:
        return int(ipaddress.IPv4Address(s)) if s else 0
    except ValueError:
        return 0


def housekeeping_codes(drop_reasons: dict) -> np.ndarray:
    """The reason numbers (of this kernel) that are socket housekeeping."""
    return np.array(sorted(int(k) for k, v in drop_reasons.items() if v in HOUSEKEEPING_DROPS), dtype=np.int64)


def homes(meta: dict) -> dict[int, int]:
    """Address → the network namespace (inode) where it lives, when this machine has it:
    pods (Service backends among them) and nodes, from a trace's metadata."""
    placement = {int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()}
    pod_ns = {pod: ino for ino, (node, pod) in placement.items() if pod}
    node_ns = {node: ino for ino, (node, pod) in placement.items() if node and not pod}
    out: dict[int, int] = {}
    for n in meta.get("nodes") or []:
        ino = n.get("netns_inode") or node_ns.get(n.get("name"))
        if n.get("ip") and ino:
            out[ip_num(n["ip"])] = int(ino)
    for p in meta.get("pods") or []:
        ino = p.get("netns_inode") or pod_ns.get(p.get("key"))
        if p.get("ip") and ino:
            out[ip_num(p["ip"])] = int(ino)
    return out


def counted(hook: np.ndarray, reason: np.ndarray, netns: np.ndarray, daddr: np.ndarray,
            housekeeping: np.ndarray, home: dict[int, int]) -> np.ndarray:
    """Mask of the drop events that are packets dropped on their way (see the module doc)."""
    is_drop = np.asarray(hook) == HOOK_IDS["drop"]
    keep = is_drop & ~np.isin(np.asarray(reason, dtype=np.int64), housekeeping)
    if home and keep.any():
        at = np.flatnonzero(keep)
        dst = np.asarray(daddr)[at].astype(np.int64)
        codes, uniq = np.unique(dst, return_inverse=True)
        target = np.array([home.get(int(u), 0) for u in codes], dtype=np.int64)[uniq]
        keep[at] = ~((target != 0) & (np.asarray(netns)[at].astype(np.int64) == target))
    return keep
