"""The engine's fast path for captures: arbitrary traffic rebuilt whole columns at a time.

Events are grouped into packets by content (identity.content_groups: protocol, IP ID or
the IPv6 flow label, length, TCP seq/flags, ICMP type/id/seq — what survives NAT and
encapsulation), split where the same content recurs after a pause (`GAP_NS`), with the skb
address added for IPv4 datagrams of IP ID 0 (no identity of their own). Drop/free events join the last hop of their skb; which drops
count is drops.counted, the rule the live capture counts by. Verdict texts come from
diagnose, like the per-packet path's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracer import tracefile
from tracer.analysis.frames import _cat_from, _lookup, _lookup_cat, _map_unique, _nullable, _placement
from tracer.analysis.trace import STATUSES, _empty_hops, _empty_packets
from tracer.kernel.record import ENCAP, FLAG_FOLLOWED, HOOK_IDS, HOOKS
from tracer.reconstruct import arrival, beyond, diagnose, dnat, drops, identity, tcpflags, window as windows
from tracer.reconstruct import packets as flows
from tracer.reconstruct.model import Encap, Hop

GAP_NS = flows.GAP_NS     # the same content seen again after this pause is a new packet


_DROP, _CONSUME = HOOK_IDS["drop"], HOOK_IDS["consume"]
_POINT_NAMES = ["rx", "tx"] + [HOOKS[k] for k in sorted(HOOKS) if k not in (1, 2, 3, 4, 20, 21)]
_POINT_CODE = np.zeros(256, dtype=np.int16)       # hook number → index into _POINT_NAMES
_VIA_CODE = np.full(256, 2, dtype=np.int8)       # 0 tracepoint, 1 tc, 2 kprobe
_VIA_NAMES = ["tracepoint", "tc", "kprobe"]
for _h, _name in HOOKS.items():
    _pt = flows.HOOK_POINT.get(_h, (_name, "kprobe"))
    if _pt[0] in _POINT_NAMES:
        _POINT_CODE[_h] = _POINT_NAMES.index(_pt[0])
    _VIA_CODE[_h] = _VIA_NAMES.index(_pt[1])



def reconstruct_vectorised(events: pd.DataFrame, meta: dict, gap_ns: int = GAP_NS,
                           keep_followed: bool = False, out: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(packets, hops) for arbitrary traffic, with whole-column operations only. With `out`,
    `out["event_packet"]` is the packet of each row of `events` (-1: none), so the events of
    chosen packets can be judged one by one (busy.py)."""
    n = len(events)
    if n == 0:
        return _empty_packets(), _empty_hops()
    col = {c: events[c].to_numpy() for c in
           ("ts_ns", "skb", "hook", "proto", "ip_id", "ip_len", "tcp_seq", "tcp_flags", "icmp_type",
            "sport", "dport", "netns", "saddr", "daddr", "reason", "location", "flags", "ifindex", "ttl",
            "flow_lbl", "agent") if c in events}
    ts_raw = col["ts_ns"]
    if len(ts_raw) < 2 or bool((ts_raw[1:] >= ts_raw[:-1]).all()):
        order = np.arange(n)          # already in time order (captures nearly always are)
        c = col
    else:
        order = np.argsort(ts_raw, kind="stable")
        c = {k: v[order] for k, v in col.items()}
    ifcodes = events["ifname"].cat.codes.to_numpy()[order] if hasattr(events["ifname"], "cat") \
        else pd.factorize(events["ifname"].to_numpy()[order])[0]
    ifcats = np.asarray(events["ifname"].cat.categories if hasattr(events["ifname"], "cat")
                        else pd.factorize(events["ifname"].to_numpy()[order])[1], dtype=object)
    hook = c["hook"].astype(np.int64)
    home = drops.homes(meta)
    # drops that are no drop of the packet (drops.counted, the live count's rule too) end
    # their packet like a consume
    hook = np.where((hook == _DROP) & ~drops.counted(hook, c["reason"], c["netns"], c["daddr"], c["proto"],
                                                     c["icmp_type"], drops.rule(meta), c["tcp_flags"]), _CONSUME, hook)
    is_free = (hook == _DROP) | (hook == _CONSUME)
    hop_idx = np.flatnonzero(~is_free)

    # -- 1. packets by content, split by pauses ----------------------------------------------
    h = {k: v[hop_idx] for k, v in c.items() if k not in ("daddr", "reason", "location")}
    group = identity.content_groups(h, skb_when_no_id=True)
    by_group = np.argsort(group, kind="stable")          # within a group: time order
    g_sorted = group[by_group]
    t_sorted = h["ts_ns"][by_group].astype(np.int64)
    new = np.ones(len(by_group), dtype=bool)
    if len(by_group) > 1:
        new[1:] = (g_sorted[1:] != g_sorted[:-1]) | ((t_sorted[1:] - t_sorted[:-1]) > gap_ns)
    pkt_sorted = np.cumsum(new) - 1
    n_pkt = int(pkt_sorted[-1]) + 1 if len(pkt_sorted) else 0
    # number packets in the order of their first event
    first_t = t_sorted[new]
    rank = np.empty(n_pkt, dtype=np.int64)
    rank[np.argsort(first_t, kind="stable")] = np.arange(n_pkt)
    hop_pkt = np.empty(len(hop_idx), dtype=np.int64)
    hop_pkt[by_group] = rank[pkt_sorted]
    # A packet whose every event was only *followed* (the kernel kept it because its skb
    # address was tracked, never because it matched the selection) is a reused buffer
    # address, not traffic that was asked for: leave it out (the events stay in `events`).
    followed_only = 0
    if not keep_followed and n_pkt:
        direct = (h["flags"] & FLAG_FOLLOWED) == 0
        keep = np.bincount(hop_pkt, weights=direct, minlength=n_pkt) > 0
        followed_only = int((~keep).sum())
        if followed_only:
            new_id = np.cumsum(keep) - 1
            ok = keep[hop_pkt]
            hop_idx, hop_pkt = hop_idx[ok], new_id[hop_pkt[ok]]
            n_pkt = int(keep.sum())

    # -- 2. drop/free events join the last hop event of their skb ----------------------------
    pkt_all = np.full(n, -1, dtype=np.int64)
    pkt_all[hop_idx] = hop_pkt
    free_idx = np.flatnonzero(is_free)
    had_hop = np.zeros(n, dtype=bool)
    if len(free_idx):
        skb = c["skb"]
        o2 = np.lexsort((is_free, c["ts_ns"], skb))   # by skb, then time; hop before free on ties
        valid_hop = ~is_free[o2] & (skb[o2] != 0)
        pos = np.where(valid_hop, np.arange(n), -1)
        last = np.maximum.accumulate(pos)
        ok = last >= 0
        src_row = o2[np.where(ok, last, 0)]
        same = ok & (skb[src_row] == skb[o2])
        got = np.where(same, pkt_all[src_row], -1)
        frees_sorted = is_free[o2]
        pkt_all[o2[frees_sorted]] = got[frees_sorted]
        had_hop[o2[frees_sorted]] = same[frees_sorted]
    # A drop with no earlier hop (dropped before any device saw it, e.g. in the sender's
    # OUTPUT chain) is a packet of its own, with no hops.
    orphan = np.flatnonzero(is_free & ~had_hop & (hook == _DROP) & (c["proto"] != 0)
                            & ((c["flags"] & FLAG_FOLLOWED) == 0))
    pkt_all[orphan] = n_pkt + np.arange(len(orphan))
    n_all = n_pkt + len(orphan)
    if out is not None:
        ev_pkt = np.empty(n, dtype=np.int64)
        ev_pkt[order] = pkt_all
        out["event_packet"] = ev_pkt

    # -- 3. hops: hop events by packet and time, tc + tracepoint at one place merged ----------
    ho = np.lexsort((np.arange(len(hop_idx)), hop_pkt))    # hop_idx is in time order already
    rows = hop_idx[ho]
    pk = hop_pkt[ho]
    netns = c["netns"][rows].astype(np.int64)
    dev = ifcodes[rows]
    point = _POINT_CODE[hook[rows]]
    via = _VIA_CODE[hook[rows]]
    dup = np.zeros(len(rows), dtype=bool)
    if len(rows) > 1:
        dup[1:] = ((pk[1:] == pk[:-1]) & (netns[1:] == netns[:-1]) & (dev[1:] == dev[:-1])
                   & (point[1:] == point[:-1]) & (via[1:] != via[:-1]))
    seen_both = np.zeros(len(rows), dtype=bool)
    seen_both[:-1] = dup[1:]
    keep = ~dup
    rows, pk, netns, dev, point, via, seen_both = (x[keep] for x in (rows, pk, netns, dev, point, via, seen_both))
    ts = c["ts_ns"][rows].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, pk[1:] != pk[:-1]]) if len(pk) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(pk)] - 1 if len(pk) else np.zeros(0, dtype=np.int64)
    hop_no = np.arange(len(pk)) - np.repeat(starts, np.diff(np.r_[starts, len(pk)]))
    t0 = np.repeat(ts[starts], np.diff(np.r_[starts, len(pk)]))
    dt = np.zeros(len(pk), dtype=np.int64)
    if len(pk) > 1:
        dt[1:] = ts[1:] - ts[:-1]
    dt[starts] = 0
    placement = _placement(meta)
    node_of = {k: v[0] for k, v in placement.items()}
    pod_of = {k: v[1] for k, v in placement.items()}

    # -- 4. per packet: first/last hop, target, verdict --------------------------------------
    has_hops = np.zeros(n_all, dtype=bool)
    first_row = np.zeros(n_all, dtype=np.int64)
    last_row = np.zeros(n_all, dtype=np.int64)
    n_hops = np.zeros(n_all, dtype=np.int64)
    pkts_with = pk[starts]
    has_hops[pkts_with] = True
    first_row[pkts_with] = rows[starts]
    last_row[pkts_with] = rows[ends]
    n_hops[pkts_with] = ends - starts + 1
    first_row[n_pkt:] = orphan
    last_row[n_pkt:] = orphan
    last_hop_pos = np.zeros(n_all, dtype=np.int64)
    last_hop_pos[pkts_with] = ends

    ip_target = home
    final_dst = c["daddr"][last_row].astype(np.int64)
    target = _lookup(final_dst, ip_target, 0).astype(np.int64)
    target_here = (target != 0) & np.isin(target, np.fromiter(placement, dtype=np.int64, count=len(placement)))
    # reached: an rx hop in the destination's namespace
    rx_at = (point == 0) & (netns == target[pk]) & (target[pk] != 0)
    reached_pos = np.full(n_all, -1, dtype=np.int64)
    rp = np.flatnonzero(rx_at)
    if len(rp):
        up, first_hit = np.unique(pk[rp], return_index=True)
        reached_pos[up] = rp[first_hit]
    # frees of each packet
    fr = free_idx[pkt_all[free_idx] >= 0]

    consumed_at = np.zeros(n_all, dtype=bool)
    consumed_any = np.zeros(n_all, dtype=bool)
    cons = fr[hook[fr] == _CONSUME]
    consumed_any[pkt_all[cons]] = True
    at_t = cons[c["netns"][cons].astype(np.int64) == target[pkt_all[cons]]]
    consumed_at[pkt_all[at_t]] = True
    drop_ev = np.full(n_all, -1, dtype=np.int64)
    drs = fr[hook[fr] == _DROP]
    if len(drs):
        up, first_hit = np.unique(pkt_all[drs], return_index=True)   # drs in time order
        drop_ev[up] = drs[first_hit]
    # arrived, then dropped by the receiving stack (arrival.py): the drop in the destination's
    # namespace is the verdict, not the arrival
    home_drop = np.full(n_all, -1, dtype=np.int64)
    hd = drs[c["netns"][drs].astype(np.int64) == target[pkt_all[drs]]] if len(drs) else drs
    if len(hd):
        up, first_hit = np.unique(pkt_all[hd], return_index=True)
        home_drop[up] = hd[first_hit]
    drop_ev = np.where(home_drop >= 0, home_drop, drop_ev)
    # a drop ends a packet; a consume may come much later (a socket holds the buffer)
    last_free_t = np.zeros(n_all, dtype=np.int64)
    if len(drs):
        np.maximum.at(last_free_t, pkt_all[drs], c["ts_ns"][drs].astype(np.int64))

    last_point = np.where(has_hops, point[last_hop_pos], -1)
    delivered = ((reached_pos >= 0) | consumed_at | (~target_here & consumed_any & (drop_ev < 0))) & (home_drop < 0)
    reached_pos = np.where(delivered, reached_pos, -1)
    dropped = ~delivered & (drop_ev >= 0)
    left = ~delivered & ~dropped & ~target_here & (last_point == 1)
    status = np.where(delivered, 0, np.where(dropped, 1, np.where(left, 3, 2)))

    # -- 5. the tables ------------------------------------------------------------------------
    first_ts = c["ts_ns"][first_row].astype(np.int64)
    last_ts = np.maximum(c["ts_ns"][last_row].astype(np.int64), last_free_t)
    # seen while an observer was not tracing: a partial view, not a loss
    window = windows.from_meta(meta)
    status = np.where((status == 2) & windows.partial_mask(first_ts, last_ts, window), 4, status)
    # every hop recorded by the tc observers alone: a gap in the trace (windows.TC_ONLY)
    kernel_seen = np.zeros(n_all, dtype=bool)
    kernel_seen[pk[(via != _VIA_NAMES.index("tc")) | seen_both]] = True
    tc_only = has_hops & ~kernel_seen & ((status == 2) | (status == 3))
    status = np.where(tc_only, 4, status)
    # time to arrival: the rx hop in the destination, else (consumed there) the last hop
    one_way = np.where(reached_pos >= 0, ts[np.maximum(reached_pos, 0)] - first_ts,
                       np.where(delivered & has_hops, ts[last_hop_pos] - first_ts, -1))
    proto = c["proto"][first_row].astype(np.int64)
    p_icmp = identity.is_icmp(proto)
    echo_id = np.where(p_icmp & np.isin(c["icmp_type"][first_row], identity.ECHO_TYPES), c["sport"][first_row], 0)
    sport = c["sport"][first_row].astype(np.int64)
    dport = c["dport"][first_row].astype(np.int64)
    fsport = c["sport"][last_row].astype(np.int64)
    fdport = c["dport"][last_row].astype(np.int64)
    drop_row = np.maximum(drop_ev, 0)
    drop_ns = c["netns"][drop_row].astype(np.int64)
    v_netns = np.where(reached_pos >= 0, netns[np.maximum(reached_pos, 0)],
                       np.where(dropped & (drop_ns != 0), drop_ns, c["netns"][last_row].astype(np.int64)))
    v_dev = np.where(reached_pos >= 0, dev[np.maximum(reached_pos, 0)],
                     np.where(dropped & (ifcodes[drop_row] >= 0) & (drop_ns != 0), ifcodes[drop_row],
                              ifcodes[last_row]))
    reasons = {int(k): v for k, v in (meta.get("drop_reasons") or {}).items()}
    locations = {int(k): v for k, v in (meta.get("locations") or {}).items()}
    nodes_v = _lookup_cat(v_netns, node_of)
    reason_v = _map_unique(np.where(dropped, c["reason"][drop_row].astype(np.int64), -1),
                           lambda r: None if r < 0 else reasons.get(r, f"reason {r}"))
    loc_v = _map_unique(np.where(dropped, c["location"][drop_row].astype(np.uint64), 0),
                        lambda a: locations.get(a) or (hex(a) if a else None))
    packets = pd.DataFrame({
        "packet": np.arange(n_all),
        "direction": None,
        "seq": _nullable(np.zeros(n_all, dtype=np.int64), np.ones(n_all, dtype=bool)),
        "proto": _lookup_cat(proto, identity.PROTO_NAMES),
        "src": _addr_text(events, "saddr", order[first_row]),
        "sport": _nullable(sport, p_icmp),
        "dst": _addr_text(events, "daddr", order[first_row]),
        "dport": _nullable(dport, p_icmp),
        "final_src": _addr_text(events, "saddr", order[last_row]),
        "final_sport": _nullable(fsport, p_icmp),
        "final_dst": _addr_text(events, "daddr", order[last_row]),
        "final_dport": _nullable(fdport, p_icmp),
        "ip_id": c["ip_id"][first_row].astype(np.int64),
        "ip_len": c["ip_len"][first_row].astype(np.int64),
        "tcp_flags": tcpflags.column(c["tcp_flags"][first_row], proto),
        "first_ts_ns": first_ts, "last_ts_ns": last_ts, "hops": n_hops,
        "first_node": _lookup_cat(c["netns"][first_row], node_of),
        "first_pod": _lookup_cat(c["netns"][first_row], pod_of),
        "first_dev": _cat_from(np.where(has_hops, ifcodes[first_row], -1), list(ifcats)),
        "last_node": _lookup_cat(c["netns"][last_row], node_of),
        "last_pod": _lookup_cat(c["netns"][last_row], pod_of),
        "last_dev": _cat_from(np.where(has_hops, ifcodes[last_row], -1), list(ifcats)),
        "last_point": _cat_from(last_point, _POINT_NAMES),
        "status": pd.Categorical.from_codes(status, categories=STATUSES),
        "verdict_node": nodes_v,
        "verdict_dev": _cat_from(v_dev, list(ifcats)),
        "verdict_point": _cat_from(np.where(dropped, len(_POINT_NAMES), np.where(reached_pos >= 0, 0, last_point)),
                                   _POINT_NAMES + ["drop"]),
        "reason": reason_v, "location": loc_v,
        "one_way_ns": _nullable(np.where(one_way >= 0, one_way, 0), one_way < 0),
        "duration_ns": last_ts - first_ts,
        "_proto": proto, "_src": c["saddr"][first_row].astype(np.int64),
        "_dst": c["daddr"][first_row].astype(np.int64),
        "_fsrc": c["saddr"][last_row].astype(np.int64), "_fdst": final_dst,
        "_sport": np.where(p_icmp, echo_id, sport), "_dport": np.where(p_icmp, echo_id, dport),
        "_fsport": np.where(p_icmp, echo_id, fsport), "_fdport": np.where(p_icmp, echo_id, fdport),
    })
    # the last hop seen encapsulated: a netfilter drop there met INPUT, not FORWARD
    last_encap = has_hops & (events["encap"].to_numpy()[order][last_row] != 0) if "encap" in events else None
    _verdict_text(packets, last_encap)
    _after_arrival_text(packets, np.flatnonzero(dropped & (home_drop >= 0)), pod_of, drop_ns)
    _partial_text(packets, window, tc_only)
    dnat.mark_unreversed(packets)     # a DNAT target's answer that came back un-reversed
    packets.attrs["followed_only_packets"] = followed_only
    for cc in ("tuple_proto", "tuple_src", "tuple_dst", "tuple_sport", "tuple_dport"):
        packets[cc] = packets[cc.removeprefix("tuple_")]

    hop_node = _lookup_cat(netns, node_of)
    hops = pd.DataFrame({
        "packet": pk, "hop": hop_no, "direction": None,
        "seq": _nullable(np.zeros(len(pk), dtype=np.int64), np.ones(len(pk), dtype=bool)),
        "ts_ns": ts, "t_ns": ts - t0, "dt_ns": dt,
        "node": hop_node, "pod": _lookup_cat(netns, pod_of),
        "dev": pd.Categorical.from_codes(dev, categories=ifcats) if len(ifcats) else np.array([""], dtype=object)[dev],
        "point": pd.Categorical.from_codes(point, categories=_POINT_NAMES),
        "seen_by": _cat_from(np.where(seen_both, len(_VIA_NAMES), via), _VIA_NAMES + ["tracepoint+tc"]),
        "src": _addr_text(events, "saddr", order[rows]),
        "sport": _nullable(c["sport"][rows].astype(np.int64), identity.is_icmp(c["proto"][rows])),
        "dst": _addr_text(events, "daddr", order[rows]),
        "dport": _nullable(c["dport"][rows].astype(np.int64), identity.is_icmp(c["proto"][rows])),
        "tcp_flags": tcpflags.column(c["tcp_flags"][rows], c["proto"][rows]),
        "encap": _lookup_cat(events["encap"].to_numpy()[order[rows]], ENCAP),
        "encap_src": _addr_text(events, "outer_saddr", order[rows]),
        "encap_dst": _addr_text(events, "outer_daddr", order[rows]),
        "vni": events["vni"].to_numpy()[order[rows]].astype(np.int64),
        "ifindex": events["ifindex"].to_numpy()[order[rows]].astype(np.int64),
        "netns": netns,
        "len": events["len"].to_numpy()[order[rows]].astype(np.int64),
        "ct_state": _lookup_cat(events["ct_info"].to_numpy()[order[rows]],
                            _ct_states(meta)),
    })
    _partial(packets, hops, beyond.View.from_json(meta.get("view")))
    return packets, hops


def sequence_ids(hops: pd.DataFrame, cols: list[str]) -> pd.Series:
    """packet → an id of its hop sequence over `cols` (equal ids: the same path), from the
    hops table. Whole columns: each hop's values are coded (a categorical's own codes), hashed
    with its position and summed per packet with the packet's hop count."""
    if hops.empty:
        return pd.Series([], dtype=np.int64, index=pd.Index([], dtype=np.int64, name="packet"))
    h = np.zeros(len(hops), dtype=np.uint64)
    for c in cols:
        s = hops[c]
        codes = s.cat.codes.to_numpy() if hasattr(s, "cat") else \
            pd.factorize(s.astype(object).where(s.notna(), None), use_na_sentinel=False)[0]
        # + 2: a missing value (code -1) is a value of its own
        h = (h * np.uint64(0x100000001B3)) ^ (codes.astype(np.int64).astype(np.uint64) + np.uint64(2))
    pos = hops["hop"].to_numpy().astype(np.uint64) + np.uint64(1)
    h = (h ^ (pos * np.uint64(0x9E3779B97F4A7C15))) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    packet, row_of = np.unique(hops["packet"].to_numpy(), return_inverse=True)
    key = np.zeros(len(packet), dtype=np.uint64)
    np.add.at(key, row_of, h)                         # order within the packet is in `pos`
    count = np.bincount(row_of, minlength=len(packet)).astype(np.uint64)
    key = (key ^ (count * np.uint64(0xD6E8FEB86659FD93))) * np.uint64(0x9E3779B97F4A7C15)
    return pd.Series(pd.factorize(key)[0].astype(np.int64), index=pd.Index(packet, name="packet"))


def _addr_text(events: pd.DataFrame, name: str, idx: np.ndarray) -> pd.Categorical:
    """The text of an address column at rows `idx` of `events`: its `*_str` categorical (either
    family); a frame without one holds IPv4 numbers."""
    txt = events.get(name + "_str")
    if txt is None:
        return tracefile.ip_categorical(events[name].to_numpy()[idx])
    if not hasattr(txt, "cat"):
        return pd.Categorical(txt.to_numpy()[idx])
    return pd.Categorical.from_codes(txt.cat.codes.to_numpy()[idx], categories=txt.cat.categories)


def _partial(packets: pd.DataFrame, hops: pd.DataFrame, view: beyond.View | None) -> None:
    """Packets lost (or left) towards a node nobody traced: `partial` (beyond.left_view, the
    per-packet path's rule), in place."""
    if view is None:
        return
    lost = np.flatnonzero(packets["status"].isin(["lost", "left"]).to_numpy())
    if not len(lost):
        return
    sub = hops[hops["packet"].isin(packets["packet"].to_numpy()[lost])]
    cols = ["node", "pod", "dev", "point", "src", "dst", "encap", "encap_src", "encap_dst", "vni"]
    # one judgement per distinct path (a busy flow's lost packets mostly share a few)
    path_of = sequence_ids(sub, cols)
    firsts = pd.Series(path_of.index.to_numpy()).groupby(path_of.to_numpy()).first()
    judged: dict[int, object] = {}
    for path_id, pkt in firsts.items():
        g = sub.loc[sub["packet"] == pkt, cols].astype(object)
        path = [flows.Hop(None if pd.isna(r.node) else r.node, None if pd.isna(r.pod) else r.pod, str(r.dev),
                          str(r.point), str(r.src), str(r.dst),
                          encap=(flows.Encap(str(r.encap_src), str(r.encap_dst), int(r.vni), str(r.encap))
                                 if isinstance(r.encap, str) else None))
                for r in g.itertuples(index=False)]
        judged[int(path_id)] = beyond.left_view(path, view.traced, view.node_of, view.untraced)
    found = {int(k): judged[int(p)] for k, p in path_of.items() if judged[int(p)] is not None}
    if not found:
        return
    at = packets["packet"].isin(list(found)).to_numpy()
    order = [found[int(k)] for k in packets["packet"].to_numpy()[at]]
    if "partial" not in packets["status"].cat.categories:
        packets["status"] = packets["status"].cat.add_categories(["partial"])
    packets.loc[at, "status"] = "partial"
    for col, attr in (("verdict_node", "node"), ("verdict_dev", "dev"), ("verdict_point", "point")):
        vals = [getattr(v, attr) for v in order]
        if hasattr(packets[col], "cat"):
            packets[col] = packets[col].cat.add_categories([x for x in set(vals) - set(packets[col].cat.categories)
                                                            if x is not None])
        packets.loc[at, col] = vals
    packets.loc[at, "hint"] = [v.hint for v in order]
    packets.loc[at, "runbook"] = [v.runbook for v in order]


def _ct_states(meta: dict) -> dict[int, str]:
    names = {int(k): v for k, v in (meta.get("ct_info_names") or {}).items()}
    out = {0: None}
    for k, v in names.items():
        out[k + 1] = v.removeprefix("IP_CT_").lower()
    return out


def _partial_text(packets: pd.DataFrame, window, tc_only: np.ndarray) -> None:
    """A partial packet's hint names the observer that was not tracing, as the live one does
    (or says that only the tc observers saw it)."""
    rows = np.flatnonzero((packets["status"] == "partial").to_numpy())
    if (window is None and not tc_only.any()) or not len(rows):
        return
    cache: dict = {}
    sub = packets.iloc[rows]
    hints = []
    for node, dev, first, last, only_tc in zip(sub["verdict_node"].astype(object), sub["verdict_dev"].astype(object),
                                               sub["first_ts_ns"].to_numpy(), sub["last_ts_ns"].to_numpy(),
                                               tc_only[rows]):
        why = windows.TC_ONLY if only_tc else (
            (window.outside(int(first), int(last)) if window is not None else None)
            or "seen only while an observer on its path was not tracing")
        node, dev = (None if pd.isna(node) else node), (None if pd.isna(dev) else dev)
        key = (node, dev, why)
        if key not in cache:
            cache[key] = windows.partial(diagnose.lost(node, dev, None), why).hint
        hints.append(cache[key])
    packets.loc[packets.index[rows], "hint"] = np.array(hints, dtype=object)


def _verdict_text(packets: pd.DataFrame, last_encap: np.ndarray | None = None) -> None:
    """hint and runbook per packet, made once per distinct (status, node, dev, reason, and
    whether the last hop was encapsulated)."""
    packets["cause"] = None
    packets["hint"] = None
    packets["runbook"] = None
    bad = packets["status"] != "delivered"
    if not bad.any():
        return
    cols = ["status", "verdict_node", "verdict_dev", "last_point", "reason", "location"]
    sub = packets.loc[bad, cols]
    if last_encap is not None:
        sub = sub.assign(enc=np.asarray(last_encap, dtype=bool)[bad.to_numpy()])
        cols = [*cols, "enc"]
    codes = sub.astype(object).groupby(cols, dropna=False, sort=False).ngroup().to_numpy()
    _, first_at = np.unique(codes, return_index=True)
    firsts = sub.iloc[first_at]
    hints, books = [], []
    for r in firsts.itertuples(index=False):
        if r.status == "dropped":
            last = None
            if getattr(r, "enc", None) is not None:
                last = Hop(r.verdict_node, None, r.verdict_dev or "", "rx", "", "",
                           encap=Encap("", "", 0, "vxlan") if r.enc else None)
            v = diagnose.dropped(r.verdict_node, r.verdict_dev, r.reason, r.location, last)
            hint, book = v.hint, v.runbook
        elif r.status == "lost":
            v = diagnose.lost(r.verdict_node, r.verdict_dev, r.last_point)
            hint, book = v.hint, v.runbook
        elif r.status == "partial":
            v = windows.partial(diagnose.lost(r.verdict_node, r.verdict_dev, r.last_point),
                                "seen only while an observer on its path was not tracing")
            hint, book = v.hint, v.runbook
        else:
            where = (r.verdict_node if isinstance(r.verdict_node, str) else "the fabric") + (
                f" ({r.verdict_dev})" if isinstance(r.verdict_dev, str) else "")
            hint, book = f"Left {where}; where it went next is outside this trace.", None
        hints.append(hint)
        books.append(book)
    packets.loc[bad, "hint"] = np.array(hints, dtype=object)[codes]
    packets.loc[bad, "runbook"] = np.array(books, dtype=object)[codes]


def _after_arrival_text(packets: pd.DataFrame, rows: np.ndarray, pod_of: dict, drop_ns: np.ndarray) -> None:
    """hint and runbook of the drops after arrival, as arrival.dropped words them (the pod named)."""
    if not len(rows):
        return
    na = (lambda x: None if pd.isna(x) else x)
    sub = packets.iloc[rows]
    keys = [(na(n), pod_of.get(int(ns)), na(d), na(r), na(loc)) for n, ns, d, r, loc in
            zip(sub["verdict_node"].astype(object), drop_ns[rows], sub["verdict_dev"].astype(object),
                sub["reason"].astype(object), sub["location"].astype(object))]
    made = {k: arrival.dropped(*k) for k in set(keys)}
    packets.loc[packets.index[rows], "hint"] = [made[k].hint for k in keys]
    packets.loc[packets.index[rows], "runbook"] = [made[k].runbook for k in keys]
