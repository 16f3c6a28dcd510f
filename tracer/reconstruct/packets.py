"""Reconstruction: hop events → packets → ordered hop paths, each with a verdict.

A packet is recognised by its content, not by the kernel buffer that carried it
(identity.py: protocol, IP ID or for IPv6 the flow label, IP length, TCP sequence and
flags, ICMP type/id/seq). None of these change under Service DNAT, reverse NAT or VXLAN
encapsulation (events carry the inner header), so one packet's hops on two nodes fall into
one group. Drop and free events are tied to the hop
event that preceded them on the same skb, since a dropped buffer may no longer parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from tracer.reconstruct import arrival, beyond, diagnose, dnat, identity, tcpflags
from tracer.kernel.record import ENCAP, FLAG_DF, HOOK_IDS, HOOKS
from tracer.reconstruct.model import Addr, ConntrackView, Encap, FiveTuple, Hop, NatChange, Packet

# hook number → (hop point, which kind of hook saw it). Kernel-function hooks keep their own
# point name (ip_forward, nat, …): they are steps inside a node, between rx and tx.
HOOK_POINT = {HOOK_IDS["rx"]: ("rx", "tracepoint"), HOOK_IDS["tx"]: ("tx", "tracepoint"),
              HOOK_IDS["tc_ingress"]: ("rx", "tc"), HOOK_IDS["tc_egress"]: ("tx", "tc")}
from tracer.cluster.inventory import Endpoint
from tracer.node.prober import ProbeResult

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd

TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
GAP_NS = 500_000_000     # the same content seen again after this pause is a new packet
# the content a packet is recognised by (identity.content_groups; sport/dport: ICMP echo only)
KEY_COLS = ["proto", "ip_id", "ip_len", "tcp_seq", "tcp_flags", "icmp_type", "sport_k", "dport_k", "flow_lbl"]
# the columns a packet's rows are read with (build_packets, _classify, _encap, _ct)
ROW_COLS = ("ts_ns", "hook", "netns", "ifname", "ifindex", "len", "proto", "saddr_str", "daddr_str", "sport",
            "dport", "ttl", "tcp_flags", "icmp_type", "ip_id", "ip_len", "flags", "encap", "outer_saddr_str",
            "outer_daddr_str", "vni", "ct_info", "ct_status", "ct_orig_src", "ct_orig_src_str", "ct_orig_dst_str",
            "ct_orig_sport", "ct_orig_dport", "ct_reply_src_str", "ct_reply_dst_str", "ct_reply_sport",
            "ct_reply_dport")
# the columns of a packet's drop and free events (build_packets, arrival.first_drop)
FREE_COLS = ("ts_ns", "hook", "netns", "ifname", "reason", "location", "proto", "icmp_type", "tcp_flags", "daddr_str")
_GROUP_COLS = ("proto", "ip_id", "ip_len", "tcp_seq", "tcp_flags", "icmp_type", "sport", "dport", "saddr",
               "flow_lbl", "netns", "ifindex", "hook", "ttl", "agent")


@dataclass
class Placement:
    """netns inode → where it is: (node name or None for the fabric, pod key or None)."""

    netns: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)

    def node(self, inum: int) -> str | None:
        return self.netns.get(int(inum), (None, None))[0]

    def pod(self, inum: int) -> str | None:
        return self.netns.get(int(inum), (None, None))[1]

    def pod_netns(self, pod_key: str) -> set[int]:
        return {k for k, (_, p) in self.netns.items() if p == pod_key}

    def node_netns(self, node: str) -> set[int]:
        return {k for k, (n, p) in self.netns.items() if n == node and p is None}


@dataclass
class FlowInput:
    src: Endpoint
    dst: Endpoint
    proto: str
    port: int | None
    probes: list[ProbeResult]
    placement: Placement
    drop_reasons: dict[int, str]
    ksym: Callable[[int], str | None]
    ct_info_names: dict[int, str] = field(default_factory=dict)
    # Set when node clocks were only estimated: within a packet, each agent's events stay
    # together (a packet crosses a node in one go), ordered by the agents' first events,
    # so an estimate off by a few µs cannot interleave two nodes' hops.
    contiguous_agents: bool = False
    sample: int = 1              # 1 in N packets traced: an unseen probe was not sampled
    view: beyond.View | None = None   # which nodes were traced (None: unknown, no `partial`)
    # address → (node, pod key) of the pods and nodes traced: where a DNAT target lives
    addresses: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    dnat: frozenset[str] = frozenset()   # addresses the requests were DNATed to (dnat.py)
    snat: frozenset[str] = frozenset()   # addresses the client's requests were SNATed to on the way


def assign_packets(df: pd.DataFrame) -> pd.DataFrame:
    """Adds `pkt` (a packet number) to every event; drop/consume events inherit the packet of
    the last hop event of the same skb."""
    import pandas as pd
    if df.empty:
        return df.assign(pkt=pd.Series(dtype="int64"))
    df = df.sort_values("ts_ns", kind="stable").reset_index(drop=True)
    hop_mask = ~df["hook"].isin([HOOK_IDS["drop"], HOOK_IDS["consume"]]).to_numpy()
    df["pkt"] = -1
    # The same content seen again after a pause is a new packet (a retransmission): the
    # rule of the vectorised path, so both paths cut packets alike.
    hop = df[hop_mask]
    group = identity.content_groups({k: hop[k].to_numpy() for k in _GROUP_COLS if k in hop})
    ts = df.loc[hop_mask, "ts_ns"].to_numpy().astype(np.int64)
    order = np.argsort(group, kind="stable")        # within a group: time order
    new = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        new[1:] = (group[order][1:] != group[order][:-1]) | (np.diff(ts[order]) > GAP_NS)
    pkt = np.empty(len(order), dtype=np.int64)
    pkt[order] = np.cumsum(new) - 1
    df.loc[hop_mask, "pkt"] = pkt
    hops = df[hop_mask]
    # Free events: the packet of the previous hop event on the same skb.
    frees = df[~hop_mask]
    if not frees.empty and not hops.empty:
        last = pd.merge_asof(frees[["ts_ns", "skb"]].reset_index(),
                             hops[["ts_ns", "skb", "pkt"]].sort_values("ts_ns"),
                             on="ts_ns", by="skb", direction="backward")
        df.loc[last["index"].to_numpy(), "pkt"] = last["pkt"].fillna(-1).astype("int64").to_numpy()
    return df


def _encap(row) -> Encap | None:
    kind = ENCAP.get(int(row.encap))
    if not kind:
        return None
    return Encap(row.outer_saddr_str, row.outer_daddr_str, int(row.vni), kind)


# IPS_* status bits: UAPI (include/uapi/linux/netfilter/nf_conntrack_common.h), stable.
IPS_BITS = [(0x2, "seen_reply"), (0x4, "assured"), (0x8, "confirmed"), (0x10, "src_nat"),
            (0x20, "dst_nat"), (0x80, "src_nat_done"), (0x100, "dst_nat_done"), (0x200, "dying")]


def _ct(r, names: dict[int, str]) -> ConntrackView | None:
    """The conntrack view of one hop, or None when the skb carried no entry yet."""
    if not r.ct_info:
        return None
    info = int(r.ct_info) - 1
    name = names.get(info, f"IP_CT_{info}")
    state = name.removeprefix("IP_CT_").removesuffix("_REPLY").lower()
    direction = "reply" if name.endswith("_REPLY") else "original"
    if not r.ct_orig_src:
        return ConntrackView(state, direction)
    status = int(r.ct_status)
    nat = ("dnat" if status & 0x20 else None) if not status & 0x10 else (
        "snat+dnat" if status & 0x20 else "snat")
    # the tunnel's own UDP flow, not the pod packet's
    of = "outer" if r.encap and r.ct_orig_src_str == r.outer_saddr_str else None
    return ConntrackView(state, direction, tuple(flag for bit, flag in IPS_BITS if status & bit), nat, of,
                         Addr(r.ct_orig_src_str, int(r.ct_orig_sport), r.ct_orig_dst_str, int(r.ct_orig_dport)),
                         Addr(r.ct_reply_src_str, int(r.ct_reply_sport), r.ct_reply_dst_str,
                              int(r.ct_reply_dport)))


def _classify(first, fi: FlowInput) -> tuple[str, int | None]:
    """(direction, probe seq) for a packet, from its first hop."""
    src_ips = set(fi.src.addresses())     # a node's: also its address on its CNI's devices
    dst_ips = set(fi.dst.addresses())
    proto = identity.PROTO_NAMES.get(int(first.proto))
    direction = None
    if first.saddr_str in src_ips and (first.daddr_str in dst_ips or not dst_ips):
        direction = "request"
    elif first.daddr_str in src_ips and (first.saddr_str in dst_ips or first.saddr_str in fi.dnat):
        direction = "reply"
    elif first.daddr_str in fi.snat and (first.saddr_str in fi.dnat or first.saddr_str in dst_ips):
        # the answer to a masqueraded request (a NodePort's, a Service's hairpin)
        direction = "reply"
    if direction is None:
        return ("other", None)
    # Probes that share an identity (a pinned --sport) are told apart by time: a packet
    # belongs to the last probe sent before it.
    candidates = sorted(fi.probes, key=lambda q: -q.sent_ns)
    for p in candidates:
        if not identity.same_proto(proto, p.proto):
            continue
        if p.sent_ns and int(first.ts_ns) < p.sent_ns and any(
                q is not p and q.sport == p.sport and q.proto == p.proto for q in fi.probes):
            continue
        if identity.is_icmp(first.proto):
            if (identity.is_echo(first.proto, first.icmp_type, direction == "request")
                    and int(first.sport) == p.sport and int(first.dport) == p.dport):
                return (direction, p.seq)
        else:
            port = int(first.sport) if direction == "request" else int(first.dport)
            if port == p.sport:
                if proto == "tcp":
                    flags = int(first.tcp_flags)
                    if direction == "request" and not (flags & TCP_SYN and not flags & TCP_ACK):
                        return ("other", p.seq)
                    if direction == "reply" and not (flags & TCP_RST or (flags & TCP_SYN and flags & TCP_ACK)):
                        return ("other", p.seq)
                return (direction, p.seq)
    return (direction, None) if not fi.probes else ("other", None)


def _targets(fi: FlowInput, direction: str) -> set[int]:
    pl = fi.placement
    if direction == "request":
        ep = fi.dst
        if ep.pod:
            return pl.pod_netns(ep.pod.key)
        if ep.service:
            out: set[int] = set()
            for b in ep.service.backends:
                out |= pl.pod_netns(b)
            return out
        if ep.node:
            return pl.node_netns(ep.node.name)
        return set()
    if fi.src.pod:
        return pl.pod_netns(fi.src.pod.key)
    if fi.src.node:
        return pl.node_netns(fi.src.node.name)
    return set()


def _target_ips(fi: FlowInput, direction: str) -> set[str]:
    if direction == "reply":
        return set(fi.src.addresses())
    ep = fi.dst
    if ep.service:
        return set(ep.service.backend_ips) | set(ep.service.addresses()) | {ep.ip}
    return {ep.ip}


def flow_vip(fi: FlowInput) -> str | None:
    """The VIP this flow's packets carry: the Service address of the family resolved (a
    dual-stack Service has one per family), or a DNATed destination."""
    if fi.dst.service:
        return fi.dst.ip if fi.dst.ip in fi.dst.service.addresses() else fi.dst.service.cluster_ip
    return fi.dst.ip if fi.dnat else None


def build_packets(df: pd.DataFrame, fi: FlowInput) -> list[Packet]:
    """The flow's packets, each with its hops in order and a first verdict (no evidence yet);
    `df` may already carry `pkt` (assign_packets)."""
    import pandas as pd
    if "pkt" not in df:
        df = assign_packets(df)
    packets: list[Packet] = []
    if df.empty:
        return packets
    pl = fi.placement
    rule = arrival.Rule.of(fi.drop_reasons, pods=[k for k, (_, p) in pl.netns.items() if p])
    fi = replace(fi, dnat=dnat.targets_in_events(df, fi))   # their answers are replies
    fi = replace(fi, snat=dnat.client_aliases(df, fi))
    # Every packet's events in time order (each agent's together, when clocks were only
    # estimated), read into rows once: a busy watch judges thousands of packets, and pandas
    # operations per packet cost milliseconds each.
    work = df[df["pkt"] >= 0]
    if fi.contiguous_agents and "agent" in work:
        seg = work.groupby(["pkt", "agent"])["ts_ns"].transform("min")
        work = work.assign(_seg=seg).sort_values(["pkt", "_seg", "ts_ns"], kind="stable")
    else:
        work = work.sort_values(["pkt", "ts_ns"], kind="stable")
    cols = [c for c in ROW_COLS if c in work]
    rows = list(work[cols].astype({c: object for c in cols if isinstance(work[c].dtype, pd.CategoricalDtype)})
                .itertuples(index=False, name="Row"))
    pk = work["pkt"].to_numpy()
    is_free_all = np.isin(work["hook"].to_numpy(), [HOOK_IDS["drop"], HOOK_IDS["consume"]])
    bounds = np.flatnonzero(np.r_[True, pk[1:] != pk[:-1], True]) if len(pk) else np.zeros(1, dtype=np.int64)
    free_cols = {c: (work[c].to_numpy(dtype=object) if isinstance(work[c].dtype, pd.CategoricalDtype)
                     else work[c].to_numpy()) for c in FREE_COLS if c in work}
    no_frees = arrival.Frees({c: v[:0] for c, v in free_cols.items()})
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        free_at = is_free_all[a:b]
        hop_rows = [r for r, f in zip(rows[a:b], free_at) if not f]
        if not hop_rows:
            continue
        frees = arrival.Frees({c: v[a:b][free_at] for c, v in free_cols.items()}) if free_at.any() else no_frees
        first = hop_rows[0]
        direction, seq = _classify(first, fi)
        if direction == "other":
            continue
        t0 = int(first.ts_ns)
        hops: list[Hop] = []
        prev_t = t0
        for r in hop_rows:
            point, via = HOOK_POINT.get(int(r.hook), (HOOKS.get(int(r.hook), "?"), "kprobe"))
            prev = hops[-1] if hops else None
            if (prev is not None and prev.netns == int(r.netns) and prev.dev == r.ifname
                    and prev.point == point and via not in prev.seen_by):
                # the same place seen by a second kind of hook (tracepoint + tc): one hop;
                # tc cannot read conntrack, the tracepoint can
                hops[-1] = replace(prev, seen_by=prev.seen_by + (via,),
                                   ct=prev.ct if prev.ct is not None else _ct(r, fi.ct_info_names))
                continue
            icmp = identity.is_icmp(r.proto)
            hops.append(Hop(
                node=pl.node(r.netns), pod=pl.pod(r.netns), dev=r.ifname, point=point,
                src=r.saddr_str, dst=r.daddr_str, seen_by=(via,),
                t_ns=int(r.ts_ns) - t0, dt_ns=int(r.ts_ns) - prev_t, encap=_encap(r),
                ifindex=int(r.ifindex), netns=int(r.netns), len=int(r.len),
                sport=None if icmp else int(r.sport), dport=None if icmp else int(r.dport),
                ct=_ct(r, fi.ct_info_names), ttl=int(r.ttl) if hasattr(r, "ttl") else None,
                tcp_flags=tcpflags.text(r.tcp_flags) if r.proto == tcpflags.PROTO_TCP else None))
            prev_t = int(r.ts_ns)
        targets = _targets(fi, direction)
        # Arrived at the pod it was addressed to: a frame flooded into another pod's namespace
        # (a stale DNAT to an address nobody has any more) is not a delivery.
        want = _target_ips(fi, direction)
        targets, want = dnat.retarget(fi, hops, direction, targets, want)
        reached = [h for h in hops if h.netns in targets and h.point == "rx"
                   and (not want or h.dst in want)]
        consumed_at_target = bool(len(frees)) and bool(
            ((frees["hook"] == HOOK_IDS["consume"]) & np.isin(frees["netns"], list(targets))
             & (np.isin(frees["daddr_str"], list(want)) if want else True)).any())
        last = hops[-1]
        at = reached[0] if reached else last
        # arrived, then freed with a drop reason by the receiving stack: dropped there
        late = arrival.first_drop(frees, rule, targets, t0 + at.t_ns, {at.netns} if reached else targets) \
            if reached or consumed_at_target else None
        first_drop = arrival.first_drop(frees, rule, targets)
        if late is not None:
            verdict = arrival.dropped(pl.node(late.netns), pl.pod(late.netns), late.ifname or at.dev,
                                      fi.drop_reasons.get(int(late.reason), f"reason {int(late.reason)}"),
                                      fi.ksym(int(late.location)))
            arrive_t = None
        elif reached or consumed_at_target:
            verdict = diagnose.delivered(at.node, at.dev, at.point)
            arrive_t = at.t_ns
        elif first_drop is not None:
            d = first_drop
            reason = fi.drop_reasons.get(int(d.reason), f"reason {int(d.reason)}")
            node = pl.node(d.netns) if d.netns else last.node
            dev = d.ifname or last.dev
            verdict = diagnose.dropped(node, dev, reason, fi.ksym(int(d.location)), last)
            arrive_t = None
        else:
            verdict = diagnose.lost(last.node, last.dev, last.point)
            if fi.view is not None:   # left towards a node nobody traced: no view, not lost
                verdict = beyond.left_view(hops, fi.view.traced, fi.view.node_of, fi.view.untraced) or verdict
            arrive_t = None
        icmp = identity.is_icmp(first.proto)
        v6 = ":" in first.saddr_str   # no fragmenting on the way in IPv6: DF always holds
        packets.append(Packet(
            direction=direction, seq=seq,
            five_tuple=FiveTuple(identity.PROTO_NAMES.get(int(first.proto), str(int(first.proto))),
                                 first.saddr_str, first.daddr_str,
                                 None if icmp else int(first.sport), None if icmp else int(first.dport)),
            ip_id=int(first.ip_id), ip_len=int(first.ip_len), df=bool(int(first.flags) & FLAG_DF) or v6,
            first_ts_ns=t0, one_way_ns=arrive_t, hops=tuple(hops), verdict=verdict,
            nat=tuple(nat_changes(hops, fi)), tcp_flags=hops[0].tcp_flags))
    packets.sort(key=lambda p: p.first_ts_ns)
    return packets


def nat_changes(hops, fi: FlowInput) -> list[NatChange]:
    """Address or port changes between consecutive hops: where DNAT picked a Service backend,
    where a reply was reverse-NATed back to the VIP, where SNAT happened."""
    out = []
    vip = flow_vip(fi)
    for i in range(1, len(hops)):
        a, b = hops[i - 1], hops[i]
        before = Addr(a.src, a.sport, a.dst, a.dport)
        after = Addr(b.src, b.sport, b.dst, b.dport)
        if before == after:
            continue
        if (a.dst, a.dport) != (b.dst, b.dport):
            kind = "dnat"
            if a.src == vip or b.dst == vip:
                kind = "reverse-snat"
        else:
            kind = "reverse-dnat" if a.src != vip and b.src == vip else "snat"
        out.append(NatChange(kind, i, b.node, b.dev, before, after,
                             b.dst if kind == "dnat" and vip and a.dst == vip and fi.dst.service else None))
    return out
