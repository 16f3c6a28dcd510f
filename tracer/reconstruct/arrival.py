"""After arrival: the fate of the copy meant for the destination once it reached that namespace.

A packet seen arriving on its destination's device is not yet delivered: the receiving
stack may still free it with a drop reason (a netfilter rule in the pod, a frame whose
destination MAC is not the pod's, no socket, a bad checksum). Such a `kfree_skb` makes the
packet `dropped` there. A few frees are no drop of the packet (`excused`): a socket's own
cleanup, an ICMP echo reply nobody's ping socket wanted (the prober's raw socket took its
copy), and the OTHERHOST of a copy a bridge flooded into another pod's namespace (that copy's
own fate, not the verdict of the copy meant for the destination).

The same rule serves the per-packet path (packets.py), the vectorised path and the capture's
running drop count (drops.counted), so live, saved and captured answers agree. The causes a
drop after arrival can have (`explain`) read the pod's netfilter counters and the MAC facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from tracer import addrs
from tracer.kernel.record import HOOK_IDS
from tracer.reconstruct.model import Packet, Verdict

RUNBOOK_DIR = "docs/runbooks"
# kfree_skb reasons of a socket's own cleanup (close, purge)
# a socket's own cleanup: a closing socket purging its queue, data for a socket already
# closed (answered by a reset): the stack's ordinary work, not a drop of the network
HOUSEKEEPING = frozenset({"QUEUE_PURGE", "SOCKET_CLOSE", "TCP_ABORT_ON_DATA"})
# a reset, once the receiving TCP acted on it (closed its connection), is freed with these
RST_FREED = ("NOT_SPECIFIED", "TCP_RESET")
TCP_RST = 0x04
CHECKSUM = frozenset({"TCP_CSUM", "UDP_CSUM", "ICMP_CSUM", "IP_CSUM", "SKB_CSUM"})

# reason → (what happened inside the receiving stack, runbook)
_HINTS: dict[str, tuple[str, str]] = {
    "NETFILTER_DROP": ("a netfilter rule in that namespace (its INPUT chain or a hook before it) "
                       "dropped it", "netfilter-drop.md"),
    "OTHERHOST": ("the frame's destination MAC address was not its own, so its stack discarded "
                  "it (kernel reason OTHERHOST)", "wrong-mac.md"),
    "NO_SOCKET": ("no socket was bound to the destination port", "no-socket.md"),
}


@dataclass(frozen=True)
class Rule:
    """Which drop events are no drop of the packet, for one kernel's reason numbers."""

    housekeeping: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    no_socket: int = -1
    otherhost: int = -1
    home: dict[int, int] = field(default_factory=dict)      # address (drops.ip_num) → its namespace
    pods: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pod namespaces
    rst_freed: tuple[int, ...] = ()   # reasons the receiving TCP frees a reset with once it acted on it

    @classmethod
    def of(cls, drop_reasons: dict, home: dict[int, int] | None = None, pods=()) -> "Rule":
        names = {int(k): v for k, v in (drop_reasons or {}).items()}
        code = {v: k for k, v in names.items()}
        return cls(np.array(sorted(k for k, v in names.items() if v in HOUSEKEEPING), dtype=np.int64),
                   code.get("NO_SOCKET", -1), code.get("OTHERHOST", -1), dict(home or {}),
                   np.array(sorted(int(p) for p in pods), dtype=np.int64),
                   tuple(code[n] for n in RST_FREED if n in code))

    def home_ns(self, daddr: np.ndarray) -> np.ndarray:
        """The namespace each destination address lives in (0: not known here). `daddr`: a
        frame's address keys, or raw records' 16-byte addresses (n x 16 bytes)."""
        dst = np.asarray(daddr)
        dst = raw_keys(dst) if dst.ndim == 2 else dst.astype(np.int64)
        if not self.home or not len(dst):
            return np.zeros(len(dst), dtype=np.int64)
        codes, uniq = np.unique(dst, return_inverse=True)
        return np.array([self.home.get(int(u), 0) for u in codes], dtype=np.int64)[uniq]

    def socket_cleanup(self, reason, proto=None, tcp_flags=None, netns=None, home=None) -> np.ndarray:
        """Mask of the drop events that are a socket's own work: its cleanup (HOUSEKEEPING),
        and a TCP reset freed by the receiving stack of its destination once it acted on it."""
        reason = np.asarray(reason, dtype=np.int64)
        out = np.isin(reason, self.housekeeping)
        if tcp_flags is not None and proto is not None and self.rst_freed and len(reason):
            rst = (np.asarray(proto) == 6) & ((np.asarray(tcp_flags).astype(np.int64) & TCP_RST) != 0)
            rst &= np.isin(reason, np.array(self.rst_freed, dtype=np.int64))
            if netns is not None and home is not None:
                home = np.asarray(home, dtype=np.int64)
                rst &= (home == 0) | (np.asarray(netns, dtype=np.int64) == home)
            out |= rst
        return out

    def excused(self, reason, proto, icmp_type, netns, daddr=None, home_ns=None, tcp_flags=None) -> np.ndarray:
        """Mask of the drop events that are no drop of the packet (see the module doc).
        `home_ns` (the destination's namespace per event, 0 unknown) overrides `daddr`."""
        reason = np.asarray(reason, dtype=np.int64)
        netns = np.asarray(netns, dtype=np.int64)
        home = self.home_ns(daddr) if home_ns is None else np.asarray(home_ns, dtype=np.int64)
        out = self.socket_cleanup(reason, proto, tcp_flags, netns, home)
        proto, icmp_type = np.asarray(proto), np.asarray(icmp_type)
        out |= (reason == self.no_socket) & (((proto == 1) & (icmp_type == 0)) | ((proto == 58) & (icmp_type == 129)))
        out |= ((reason == self.otherhost) & (home != 0) & (netns != home) & np.isin(netns, self.pods))
        return out


def raw_keys(raw: np.ndarray) -> np.ndarray:
    """Raw records' 16-byte addresses (network order) → their keys as drops.ip_num gives them
    (addrs.key as a signed 64-bit number). An address whose last 12 bytes are zero is taken
    for IPv4 (the record's layout), anything else for IPv6."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 16)
    out = raw[:, :4].copy().view(">u4").reshape(-1).astype(np.int64)
    v6 = raw[:, 4:].any(axis=1)
    if v6.any():
        uniq, inv = np.unique(raw[v6], axis=0, return_inverse=True)
        keys = [addrs.key_of_packed(bytes(u), True) for u in uniq]
        out[v6] = np.array([k - (1 << 64) for k in keys], dtype=np.int64)[np.asarray(inv).reshape(-1)]
    return out


def after(v: Verdict) -> bool:
    """Whether a verdict is a drop after arrival (made by `dropped`)."""
    return v.status == "dropped" and bool((v.evidence or {}).get("after_arrival"))


def dropped(node: str | None, pod: str | None, dev: str | None, reason: str, location: str | None) -> Verdict:
    """Freed with a drop reason after arriving in the destination's namespace (a pod's, or a
    node's own when pod is None)."""
    what, book = _HINTS.get(reason, (None, None))
    if what is None:
        what, book = ((f"its checksum was wrong ({reason})", "bad-checksum.md") if reason in CHECKSUM
                      else (f"its stack dropped it ({reason})", "kernel-drop.md"))
    where = f"pod {pod}" if pod else f"{node or 'the host'}'s own stack"
    return Verdict("dropped", node, dev, "drop", reason, location,
                   f"Dropped inside {where} after arriving on its {dev}: {what}.", f"{RUNBOOK_DIR}/{book}",
                   evidence={"after_arrival": True, **({"pod": pod} if pod else {})})


def pod_query(packet: Packet) -> dict:
    """What a fact query adds for a drop after arrival in a pod: the pod's namespace (inode)
    and device, whose MAC the node's neighbour entry is compared with."""
    v = packet.verdict
    pod = (v.evidence or {}).get("pod") if after(v) else None
    if not pod:
        return {}
    hop = next((h for h in packet.hops if h.pod == pod and h.dev == v.dev), None)
    return {"pod_netns": hop.netns, "pod_dev": v.dev} if hop is not None and hop.netns else {}


def _set(v: Verdict, cause: str, hint: str, book: str, **evidence) -> Verdict:
    return replace(v, cause=cause, hint=hint, runbook=f"{RUNBOOK_DIR}/{book}",
                   evidence={**(v.evidence or {}), **evidence})


def explain(packet: Packet, v: Verdict, ev) -> Verdict:
    """A drop after arrival with the cause the facts prove, or with its reason alone."""
    pod = (v.evidence or {}).get("pod")
    where = f"pod {pod}" if pod else (v.node or "the host")
    reason = v.reason or ""
    if reason == "NETFILTER_DROP":
        hits = ev.rule_hits.get(pod or v.node or "", []) if pod or v.node else []
        if not hits:
            return v
        hit = sorted(hits, key=lambda h: (-_names(h, packet), -h.get("packets", 0)))[0]
        chain = f"the {hit['chain']} chain of the {hit['table']} table"
        if hit.get("base_chain") and hit["base_chain"] != hit["chain"]:
            chain += f" (reached from {hit['base_chain']})"
        rule = hit["rule"] if not hit.get("policy") else f"-P {hit['chain']} {hit['policy']}"
        return _set(v, "netfilter-rule", f"Dropped inside {where} after arriving on its {v.dev}: rule "
                    f"`{rule}` in {chain} of {where} dropped it.", "netfilter-drop.md", netfilter=hits)
    if reason == "OTHERHOST":
        f = ev.facts(v.node, packet) if v.node else None
        nb = ((f or {}).get("next_hop") or {}).get("neigh") or {}
        mac = ((f or {}).get("pod") or {}).get("mac")
        if not f or not mac or not nb.get("lladdr"):
            return v
        if nb["lladdr"].lower() == mac.lower():
            return replace(v, evidence={**(v.evidence or {}), "mac": {"neighbour": nb["lladdr"], "pod": mac}})
        ip = f["next_hop"].get("ip")
        return _set(v, "wrong-mac", f"{v.node}'s neighbour entry for {ip} on {nb.get('dev') or f['next_hop'].get('dev')} "
                    f"says {nb['lladdr']}, but {where}'s {v.dev} has MAC {mac}: frames to it are addressed "
                    "to another host and its stack discards them (OTHERHOST).", "wrong-mac.md",
                    mac={"neighbour": nb["lladdr"], "neighbour_state": nb.get("state"), "pod": mac,
                         "dev": f["next_hop"].get("dev")})
    if reason == "NO_SOCKET":
        last = packet.hops[-1]
        port = f" port {packet.five_tuple.proto.upper()}/{last.dport}" if last.dport else ""
        return _set(v, "no-socket", f"Nothing listens on{port} in {where}: the packet arrived on its "
                    f"{v.dev} and was dropped for want of a socket.", "no-socket.md")
    if reason in CHECKSUM:
        return _set(v, "bad-checksum", f"The packet arrived in {where} with a wrong checksum "
                    f"({reason}): it was damaged or mis-offloaded before it got there.", "bad-checksum.md")
    return v


def _names(hit: dict, packet: Packet) -> int:
    """How many of the packet's addresses a rule names."""
    text = hit.get("rule", "")
    addrs = {a for h in packet.hops for a in (h.src, h.dst)}
    return sum(1 for a in addrs if a and (f"{a}/32" in text or f"{a}/128" in text or f" {a} " in text))


class Frees:
    """A packet's drop and consume events, column by column (numpy arrays of equal length):
    judging packets one by one, a pandas operation per packet costs a millisecond."""

    def __init__(self, cols: dict[str, np.ndarray]):
        self.cols = cols

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def __contains__(self, name: str) -> bool:
        return name in self.cols

    def __len__(self) -> int:
        return len(self.cols["hook"])

    def row(self, i: int) -> SimpleNamespace:
        """Event `i` with its fields as attributes."""
        return SimpleNamespace(**{k: v[i] for k, v in self.cols.items()})


def first_drop(frees: Frees, rule: Rule, targets: set[int], since: int | None = None, where: set[int] | None = None):
    """The first drop event among a packet's frees that is a drop of the packet (a row), or
    None: after `since` (ns) and in `where` when given. `targets`: the destination's
    namespaces, the home a flooded copy elsewhere is told apart from."""
    if not len(frees):
        return None
    m = frees["hook"] == HOOK_IDS["drop"]
    if since is not None:
        m &= frees["ts_ns"] >= since
    if where is not None:
        m &= np.isin(frees["netns"], list(where))
    at = np.flatnonzero(m)
    if not len(at):
        return None
    ns = frees["netns"][at].astype(np.int64)
    home = np.where(np.isin(ns, list(targets)), ns, -1 if targets else 0)
    keep = ~rule.excused(frees["reason"][at], frees["proto"][at], frees["icmp_type"][at], ns, home_ns=home,
                         tcp_flags=frees["tcp_flags"][at] if "tcp_flags" in frees else None)
    hit = at[keep]
    return frees.row(int(hit[0])) if len(hit) else None
