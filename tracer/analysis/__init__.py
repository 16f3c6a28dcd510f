"""Offline analysis of trace files (`podtrace capture`, `podtrace flow --save`), for Jupyter
and for `podtrace analyze FILE`.

    from tracer import analysis
    t = analysis.load("capture.parquet")
    t.flows.sort_values("dropped", ascending=False).head()

`load(path)` returns a `Trace` of pandas DataFrames; the columns are documented in
docs/analysis.md and in `COLUMNS` below.

Two reconstructions, one set of tables:

- capture files (and `mode="capture"`): vectorised. Events are grouped into packets by
  content (flows.KEY_COLS: protocol, IP ID, length, TCP seq/flags, ICMP type/id/seq — what
  survives NAT and encapsulation), split where the same content recurs after a pause
  (`GAP_NS`), with the skb address added for IP ID 0 datagrams (no identity of their own).
  Drop/free events join the last hop of their skb. Packets are tied into flows by their
  5-tuple, NAT included: a packet whose tuple changes on the way joins the flows of both
  tuples. Without probes nobody says which side asked: `direction` is `forward` for the
  direction of the first packet seen of a flow and `reverse` for the other.
- flow files: the packets exactly as `podtrace flow` judged them (flows.build_packets with
  the saved ends and probes), so a saved trace gives the same verdicts, `request`/`reply`
  directions and probe `seq`s offline.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tracer import tracefile
from tracer.reconstruct import diagnose, drops, evidence
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct import packets as flows
from tracer.cluster import inventory as k8s
from tracer.kernel.record import ENCAP, FLAG_FOLLOWED, HOOK_IDS, HOOKS, PROTOS
from tracer.node.prober import ProbeResult

GAP_NS = 500_000_000     # the same content seen again after this pause is a new packet

COLUMNS = {
    "events": "one row per hop event as captured (tracer/events.py fields, addresses as numbers, "
              "plus *_str address strings and hook_name)",
    "packets": ["packet", "flow", "direction", "seq", "proto", "src", "sport", "dst", "dport",
                "final_src", "final_sport", "final_dst", "final_dport", "ip_id", "ip_len",
                "first_ts_ns", "last_ts_ns", "hops", "first_node", "first_pod", "first_dev",
                "last_node", "last_pod", "last_dev", "last_point", "status", "verdict_node",
                "verdict_dev", "verdict_point", "reason", "location", "cause", "hint", "runbook",
                "one_way_ns", "duration_ns"],
    "hops": ["packet", "hop", "flow", "direction", "seq", "ts_ns", "t_ns", "dt_ns", "node", "pod",
             "dev", "point", "seen_by", "src", "sport", "dst", "dport", "encap", "encap_src",
             "encap_dst", "vni", "ifindex", "netns", "len", "ct_state"],
    "flows": ["flow", "proto", "src", "sport", "dst", "dport", "src_pod", "dst_pod", "service",
              "packets", "forward", "reverse", "delivered", "dropped", "lost", "left", "bytes",
              "p50_ns", "p99_ns", "first_ts_ns", "last_ts_ns", "nodes"],
    "drops": ["reason", "node", "dev", "location", "count", "flows", "first_ts_ns", "last_ts_ns"],
}
STATUSES = ["delivered", "dropped", "lost", "left"]

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


@dataclass
class Trace:
    """A loaded trace. Every table is a pandas DataFrame (see COLUMNS / docs/analysis.md)."""

    events: pd.DataFrame     # one row per hop event, as captured
    hops: pd.DataFrame       # one row per hop of every reconstructed packet
    packets: pd.DataFrame    # one row per packet with its verdict
    meta: dict
    flows: pd.DataFrame = field(default_factory=pd.DataFrame)   # one row per 5-tuple (NAT joined)
    drops: pd.DataFrame = field(default_factory=pd.DataFrame)   # drop reason × node × device × location
    mode: str = "capture"    # which reconstruction made the packets: "flow" or "capture"

    @property
    def counters(self) -> dict:
        return dict(self.meta.get("counters") or {})

    @property
    def events_lost(self) -> int:
        """Events the kernel could not hand over (ring buffer full): gaps in the paths."""
        return int(self.counters.get("lost", 0))

    def summary(self) -> dict:
        """The figures `podtrace analyze` prints first."""
        p = self.packets
        by = p["status"].value_counts().to_dict() if len(p) else {}
        t0 = int(self.events["ts_ns"].min()) if len(self.events) else 0
        t1 = int(self.events["ts_ns"].max()) if len(self.events) else 0
        return {
            "kind": self.meta.get("kind"), "format_version": self.meta.get("format_version"),
            "upgraded_from": self.meta.get("upgraded_from"),
            "events": len(self.events), "packets": len(p), "flows": len(self.flows),
            **{s: int(by.get(s, 0)) for s in STATUSES},
            "events_lost": self.events_lost, "span_s": round((t1 - t0) / 1e9, 3),
            "kernel": (self.meta.get("kernel") or {}).get("release"),
            "hooks": self.meta.get("hooks") or [],
        }

    def path(self, packet: int) -> pd.DataFrame:
        """The hops of one packet, in order."""
        return self.hops[self.hops["packet"] == packet]

    def flow_packets(self, flow: int) -> pd.DataFrame:
        return self.packets[self.packets["flow"] == flow]


# ---------------------------------------------------------------------------------------
# Loading

def load(path, mode: str = "auto") -> Trace:
    """Read a trace file and rebuild its packets, hops, flows and drops.

    mode: "auto" (flow files as `flow` judged them, captures vectorised), "flow" or
    "capture" (the vectorised reconstruction on any file)."""
    events, meta = tracefile.load(path)
    meta["path"] = str(path)
    return analyse(events, meta, mode)


def analyse(events: pd.DataFrame, meta: dict, mode: str = "auto") -> Trace:
    if mode not in ("auto", "flow", "capture"):
        raise ValueError(f"mode must be auto, flow or capture, not {mode!r}")
    is_flow = meta.get("kind") == "flow" and "src" in meta and "dst" in meta
    if mode == "flow" and not is_flow:
        raise tracefile.TraceFileError(meta.get("path", "trace"), "is not a `flow --save` trace",
                                       "use mode='capture'")
    if mode == "flow" or (mode == "auto" and is_flow):
        packets, hops = _flow_tables(events, meta)
        used = "flow"
    else:
        packets, hops = reconstruct_vectorised(events, meta)
        used = "capture"
    # the verdict under the names `flow -o json` gives it
    for name, col in (("node", "verdict_node"), ("dev", "verdict_dev"), ("point", "verdict_point")):
        packets[name] = packets[col]
    fl = flow_table(packets, meta)
    if len(packets):
        packets["flow"] = fl.attrs.pop("packet_flow")
        if len(hops):
            at = hops["packet"].to_numpy()
            hops["flow"] = packets["flow"].to_numpy()[at]
            if hops["direction"].isna().all():
                d = packets["direction"]
                hops["direction"] = (pd.Categorical.from_codes(d.cat.codes.to_numpy()[at], d.cat.categories)
                                     if hasattr(d, "cat") else d.to_numpy()[at])
    return Trace(events, hops, packets, meta, fl, drop_table(packets), used)


# ---------------------------------------------------------------------------------------
# Flow files: flow's own reconstruction

def _endpoint(d: dict, meta: dict) -> k8s.Endpoint:
    ep = k8s.Endpoint(d["spec"], d["ip"])
    if d.get("pod"):
        ns, name = d["pod"].split("/", 1)
        ep.pod = k8s.Pod(ns, name, d.get("node"), d["ip"])
    svc = meta.get("service")
    if d.get("service") and svc:
        ns, name = d["service"].split("/", 1)
        ep.service = k8s.Service(ns, name, d["ip"], backends=svc["backends"], backend_ips=svc["backend_ips"])
    if d.get("node") and not d.get("pod"):
        ep.node = k8s.Node(d["node"], d["ip"])
    return ep


def _flow_input(meta: dict) -> flows.FlowInput:
    """The flow's inputs from a file's metadata; metadata of the wrong shape is a damaged file."""
    try:
        return _flow_input_of(meta)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise tracefile.TraceFileError(meta.get("path", "trace"), "has damaged flow metadata "
                                       f"({type(exc).__name__}: {exc})") from None


def _flow_input_of(meta: dict) -> flows.FlowInput:
    placement = flows.Placement({int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()})
    locations = {int(k): v for k, v in (meta.get("locations") or {}).items()}
    return flows.FlowInput(
        _endpoint(meta["src"], meta), _endpoint(meta["dst"], meta), meta.get("proto"), meta.get("port"),
        [ProbeResult(**p) for p in meta.get("probes", [])], placement,
        {int(k): v for k, v in (meta.get("drop_reasons") or {}).items()}, lambda a: locations.get(a),
        {int(k): v for k, v in (meta.get("ct_info_names") or {}).items()}, **_agents_kw(meta))


def _agents_kw(meta: dict) -> dict:
    # Merged multi-node traces whose clocks were estimated keep each node's events together.
    if "contiguous_agents" in getattr(flows.FlowInput, "__dataclass_fields__", {}):
        return {"contiguous_agents": bool((meta.get("clock") or {}).get("offsets"))}
    return {}


def reconstruct(events: pd.DataFrame, meta: dict) -> list[dict]:
    """The packets of a flow trace as `podtrace flow` builds them (list of dicts, the JSON
    shape), with the causes that need no live node (stale DNAT, un-reversed replies)."""
    fi = _flow_input(meta)
    packets = flows.build_packets(events, fi)
    if isinstance(meta.get("evidence"), dict):
        # the evidence the live run judged with: the same causes as its `-o json`
        return diagnose.judge(packets, Evidence.from_json(meta["evidence"]))
    packets = diagnose.judge(packets, evidence.service_evidence(fi.dst.service))
    for p in packets:   # files written before the evidence was saved: no node facts to show
        p["verdict"].get("evidence", {}).pop("node_facts", None)
    return packets


def _ip_num(s) -> int:
    try:
        return int(ipaddress.IPv4Address(s)) if s else 0
    except ValueError:
        return 0


def _flow_tables(events: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    packets = reconstruct(events, meta)
    icmp_ev = events[events["proto"] == 1]
    echo_ids = dict(zip(icmp_ev["ts_ns"].tolist(), icmp_ev["sport"].tolist()))
    hop_rows, pkt_rows = [], []
    for i, p in enumerate(packets):
        v, hops, t = p["verdict"], p["hops"], p["tuple"]
        first, last = hops[0], hops[-1]
        icmp = t["proto"] == "icmp"
        pkt_rows.append({
            "packet": i, "direction": p["direction"], "seq": p["seq"],
            "proto": t["proto"], "src": t["src"], "sport": t["sport"], "dst": t["dst"], "dport": t["dport"],
            "final_src": last["src"], "final_sport": last["sport"], "final_dst": last["dst"],
            "final_dport": last["dport"], "ip_id": p["ip_id"], "ip_len": p["ip_len"],
            "first_ts_ns": p["first_ts_ns"], "last_ts_ns": p["first_ts_ns"] + last["t_ns"],
            "hops": len(hops), "first_node": first["node"], "first_pod": first["pod"],
            "first_dev": first["dev"], "last_node": last["node"], "last_pod": last["pod"],
            "last_dev": last["dev"], "last_point": last["point"], "status": v["status"],
            "verdict_node": v["node"], "verdict_dev": v["dev"], "verdict_point": v.get("point"),
            "reason": v["reason"], "location": v["location"], "cause": v.get("cause"),
            "hint": v.get("hint"), "runbook": v.get("runbook"), "one_way_ns": p["one_way_ns"],
            "duration_ns": last["t_ns"],
            # numeric keys for the flow table (ICMP: the echo id on both sides)
            "_proto": {"icmp": 1, "tcp": 6, "udp": 17}.get(t["proto"], 0),
            "_src": _ip_num(t["src"]), "_dst": _ip_num(t["dst"]),
            "_fsrc": _ip_num(last["src"]), "_fdst": _ip_num(last["dst"]),
            "_sport": echo_ids.get(p["first_ts_ns"], 0) if icmp else (t["sport"] or 0),
            "_dport": echo_ids.get(p["first_ts_ns"], 0) if icmp else (t["dport"] or 0),
            "_fsport": echo_ids.get(p["first_ts_ns"], 0) if icmp else (last["sport"] or 0),
            "_fdport": echo_ids.get(p["first_ts_ns"], 0) if icmp else (last["dport"] or 0),
        })
        for j, h in enumerate(hops):
            enc = h["encap"] or {}
            ct = h.get("ct") or {}
            hop_rows.append({"packet": i, "hop": j, "direction": p["direction"], "seq": p["seq"],
                             "ts_ns": p["first_ts_ns"] + h["t_ns"],
                             **{k: v for k, v in h.items() if k not in ("encap", "ct")},
                             "encap": enc.get("type"), "encap_src": enc.get("src"),
                             "encap_dst": enc.get("dst"), "vni": enc.get("vni"),
                             "ct_state": ct.get("state"), "ct": h.get("ct")})
    pk = pd.DataFrame(pkt_rows)
    if pk.empty:
        pk = _empty_packets()
    else:
        for c in ("tuple_proto", "tuple_src", "tuple_dst", "tuple_sport", "tuple_dport"):
            pk[c] = pk[c.removeprefix("tuple_")]
        for c in ("sport", "dport", "final_sport", "final_dport", "seq", "one_way_ns"):
            pk[c] = pk[c].astype("Int64")
    hp = pd.DataFrame(hop_rows) if hop_rows else _empty_hops()
    return pk, hp


def _empty_packets() -> pd.DataFrame:
    cols = COLUMNS["packets"] + ["tuple_proto", "tuple_src", "tuple_dst", "tuple_sport", "tuple_dport",
                                 "_proto", "_src", "_dst", "_fsrc", "_fdst", "_sport", "_dport",
                                 "_fsport", "_fdport"]
    return pd.DataFrame({c: pd.Series(dtype="int64" if c.startswith("_") or c == "packet" else "object")
                         for c in cols})


def _empty_hops() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("packet", "hop") else "object")
                         for c in COLUMNS["hops"]})


# ---------------------------------------------------------------------------------------
# Captures: the vectorised reconstruction

def _factorize(*cols: np.ndarray) -> np.ndarray:
    """Dense group codes for rows of several integer columns (hash-based, no sort)."""
    code = None
    for c in cols:
        c = np.asarray(c)
        if code is None:
            code = pd.factorize(c)[0].astype(np.int64)
        else:
            sub = pd.factorize(c)[0].astype(np.int64)
            code = pd.factorize((code << 32) | sub)[0].astype(np.int64)
    return code


def _placement(meta: dict) -> dict[int, tuple]:
    return {int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()}


def _cat_from(codes: np.ndarray, values: list) -> pd.Categorical:
    """A categorical from codes into `values` (-1: missing); values may repeat or be None.
    Strings as categoricals: no per-row Python objects, whatever the table's length."""
    uniq: dict = {}
    remap = np.empty(len(values) + 1, dtype=np.int64)
    for i, v in enumerate(values):
        remap[i] = -1 if v is None else uniq.setdefault(v, len(uniq))
    remap[-1] = -1
    return pd.Categorical.from_codes(remap[np.asarray(codes, dtype=np.int64)], categories=list(uniq))


def _lookup_cat(keys: np.ndarray, table: dict) -> pd.Categorical:
    """Map an integer column through a small dict into a categorical."""
    codes, uniq = pd.factorize(np.asarray(keys))
    return _cat_from(codes, [table.get(int(u)) for u in uniq])


def _lookup(keys: np.ndarray, table: dict, default=None) -> np.ndarray:
    """Map an integer column through a small dict, converting each distinct value once."""
    codes, uniq = pd.factorize(keys)
    vals = np.array([table.get(int(u), default) for u in uniq] + [default], dtype=object)
    return vals[codes]


def _by_ip(meta: dict) -> tuple[dict[int, str], dict[int, str]]:
    """(address → pod key, address → Service key for VIPs and backends' addresses are not
    Services: only cluster IPs)."""
    pods = {_ip_num(p["ip"]): p["key"] for p in meta.get("pods") or [] if p.get("ip")}
    svcs = {_ip_num(s["cluster_ip"]): s["key"] for s in meta.get("services") or [] if s.get("cluster_ip")}
    for side in ("src", "dst"):   # flow files of format 1 know only their two ends
        d = meta.get(side) or {}
        if d.get("pod") and d.get("ip"):
            pods.setdefault(_ip_num(d["ip"]), d["pod"])
        if d.get("service") and d.get("ip"):
            svcs.setdefault(_ip_num(d["ip"]), d["service"])
    return pods, svcs


def reconstruct_vectorised(events: pd.DataFrame, meta: dict, gap_ns: int = GAP_NS,
                           keep_followed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(packets, hops) for arbitrary traffic, with whole-column operations only."""
    n = len(events)
    if n == 0:
        return _empty_packets(), _empty_hops()
    col = {c: events[c].to_numpy() for c in
           ("ts_ns", "skb", "hook", "proto", "ip_id", "ip_len", "tcp_seq", "tcp_flags", "icmp_type",
            "sport", "dport", "netns", "saddr", "daddr", "reason", "location", "flags")}
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
    # drops that are no packet dropped on its way (drops.counted, the live count's rule too)
    # end their packet like a consume
    hk = drops.housekeeping_codes(meta.get("drop_reasons") or {})
    hook = np.where((hook == _DROP) & ~drops.counted(hook, c["reason"], c["netns"], c["daddr"], hk, home),
                    _CONSUME, hook)
    is_free = (hook == _DROP) | (hook == _CONSUME)
    hop_idx = np.flatnonzero(~is_free)

    # -- 1. packets by content, split by pauses ----------------------------------------------
    h = {k: c[k][hop_idx] for k in ("ts_ns", "skb", "proto", "ip_id", "ip_len", "tcp_seq", "tcp_flags",
                                    "icmp_type", "sport", "dport", "flags")}
    icmp = h["proto"] == 1
    no_id = (h["ip_id"] == 0) & ~icmp
    group = _factorize(h["proto"].astype(np.uint64) | (h["ip_id"].astype(np.uint64) << 8)
                       | (h["ip_len"].astype(np.uint64) << 24) | (h["tcp_flags"].astype(np.uint64) << 40)
                       | (h["icmp_type"].astype(np.uint64) << 48),
                       h["tcp_seq"].astype(np.uint64)
                       | (np.where(icmp, h["sport"], 0).astype(np.uint64) << 32)
                       | (np.where(icmp, h["dport"], 0).astype(np.uint64) << 48),
                       np.where(no_id, h["skb"], 0))
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
    # a drop ends a packet; a consume may come much later (a socket holds the buffer)
    last_free_t = np.zeros(n_all, dtype=np.int64)
    if len(drs):
        np.maximum.at(last_free_t, pkt_all[drs], c["ts_ns"][drs].astype(np.int64))

    last_point = np.where(has_hops, point[last_hop_pos], -1)
    delivered = (reached_pos >= 0) | consumed_at | (~target_here & consumed_any & (drop_ev < 0))
    dropped = ~delivered & (drop_ev >= 0)
    left = ~delivered & ~dropped & ~target_here & (last_point == 1)
    status = np.where(delivered, 0, np.where(dropped, 1, np.where(left, 3, 2)))

    # -- 5. the tables ------------------------------------------------------------------------
    first_ts = c["ts_ns"][first_row].astype(np.int64)
    last_ts = np.maximum(c["ts_ns"][last_row].astype(np.int64), last_free_t)
    # time to arrival: the rx hop in the destination, else (consumed there) the last hop
    one_way = np.where(reached_pos >= 0, ts[np.maximum(reached_pos, 0)] - first_ts,
                       np.where(delivered & has_hops, ts[last_hop_pos] - first_ts, -1))
    proto = c["proto"][first_row].astype(np.int64)
    p_icmp = proto == 1
    echo_id = np.where(p_icmp & np.isin(c["icmp_type"][first_row], (0, 8)), c["sport"][first_row], 0)
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
        "proto": _lookup_cat(proto, PROTOS),
        "src": tracefile.ip_categorical(c["saddr"][first_row]),
        "sport": _nullable(sport, p_icmp),
        "dst": tracefile.ip_categorical(c["daddr"][first_row]),
        "dport": _nullable(dport, p_icmp),
        "final_src": tracefile.ip_categorical(c["saddr"][last_row]),
        "final_sport": _nullable(fsport, p_icmp),
        "final_dst": tracefile.ip_categorical(c["daddr"][last_row]),
        "final_dport": _nullable(fdport, p_icmp),
        "ip_id": c["ip_id"][first_row].astype(np.int64),
        "ip_len": c["ip_len"][first_row].astype(np.int64),
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
    _verdict_text(packets)
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
        "src": tracefile.ip_categorical(c["saddr"][rows]),
        "sport": _nullable(c["sport"][rows].astype(np.int64), c["proto"][rows] == 1),
        "dst": tracefile.ip_categorical(c["daddr"][rows]),
        "dport": _nullable(c["dport"][rows].astype(np.int64), c["proto"][rows] == 1),
        "encap": _lookup_cat(events["encap"].to_numpy()[order[rows]], ENCAP),
        "encap_src": tracefile.ip_categorical(events["outer_saddr"].to_numpy()[order[rows]]),
        "encap_dst": tracefile.ip_categorical(events["outer_daddr"].to_numpy()[order[rows]]),
        "vni": events["vni"].to_numpy()[order[rows]].astype(np.int64),
        "ifindex": events["ifindex"].to_numpy()[order[rows]].astype(np.int64),
        "netns": netns,
        "len": events["len"].to_numpy()[order[rows]].astype(np.int64),
        "ct_state": _lookup_cat(events["ct_info"].to_numpy()[order[rows]],
                            _ct_states(meta)),
    })
    return packets, hops


def _map_unique(a: np.ndarray, fn) -> pd.Categorical:
    """fn applied once per distinct value of an integer column."""
    codes, uniq = pd.factorize(a)
    return _cat_from(codes, [fn(int(u)) for u in uniq])


def _nullable(v: np.ndarray, null: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.arrays.IntegerArray(v.astype(np.int64), np.asarray(null, dtype=bool))


def _ct_states(meta: dict) -> dict[int, str]:
    names = {int(k): v for k, v in (meta.get("ct_info_names") or {}).items()}
    out = {0: None}
    for k, v in names.items():
        out[k + 1] = v.removeprefix("IP_CT_").lower()
    return out


def _verdict_text(packets: pd.DataFrame) -> None:
    """hint and runbook per packet, made once per distinct (status, node, dev, reason)."""
    packets["cause"] = None
    packets["hint"] = None
    packets["runbook"] = None
    bad = packets["status"] != "delivered"
    if not bad.any():
        return
    cols = ["status", "verdict_node", "verdict_dev", "last_point", "reason", "location"]
    sub = packets.loc[bad, cols]
    codes = sub.astype(object).groupby(cols, dropna=False, sort=False).ngroup().to_numpy()
    _, first_at = np.unique(codes, return_index=True)
    firsts = sub.iloc[first_at]
    hints, books = [], []
    for r in firsts.itertuples(index=False):
        if r.status == "dropped":
            v = diagnose.dropped(r.verdict_node, r.verdict_dev, r.reason, r.location, {})
        elif r.status == "lost":
            v = diagnose.lost({"node": r.verdict_node, "dev": r.verdict_dev, "point": r.last_point})
        else:
            where = (r.verdict_node or "the fabric") + (f" ({r.verdict_dev})" if r.verdict_dev else "")
            v = {"hint": f"Left {where}; where it went next is outside this trace.", "runbook": None}
        hints.append(v["hint"])
        books.append(v["runbook"])
    packets.loc[bad, "hint"] = np.array(hints, dtype=object)[codes]
    packets.loc[bad, "runbook"] = np.array(books, dtype=object)[codes]


# ---------------------------------------------------------------------------------------
# Flows and drops (both reconstructions)

def _ep_key(ip: np.ndarray, port: np.ndarray) -> np.ndarray:
    return (ip.astype(np.int64) << 16) | (port.astype(np.int64) & 0xFFFF)


def flow_table(packets: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """One row per flow: a 5-tuple, with the tuples NAT turned it into joined to it."""
    if packets.empty:
        out = pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS["flows"]})
        out.attrs["packet_flow"] = np.zeros(0, dtype=np.int64)
        return out
    proto = packets["_proto"].to_numpy().astype(np.int64)
    a = _ep_key(packets["_src"].to_numpy(), packets["_sport"].to_numpy())
    b = _ep_key(packets["_dst"].to_numpy(), packets["_dport"].to_numpy())
    fa = _ep_key(packets["_fsrc"].to_numpy(), packets["_fsport"].to_numpy())
    fb = _ep_key(packets["_fdst"].to_numpy(), packets["_fdport"].to_numpy())
    t2_raw = np.stack([proto, np.minimum(fa, fb), np.maximum(fa, fb)])
    # one code space for first- and last-hop tuples
    allk = np.concatenate([np.stack([proto, np.minimum(a, b), np.maximum(a, b)]), t2_raw], axis=1)
    code = _factorize(allk[0], allk[1], allk[2])
    t1, t2 = code[: len(proto)], code[len(proto):]
    root = np.arange(code.max() + 1)
    changed = t1 != t2
    if changed.any():
        edges = np.unique(np.stack([t1[changed], t2[changed]], axis=1), axis=0)
        parent = list(range(len(root)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for x, y in edges.tolist():
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        root = np.array([find(i) for i in range(len(root))])
    comp = root[t1]
    first_ts = packets["first_ts_ns"].to_numpy()
    # flows numbered by their first packet; the first packet's tuple stands for the flow
    order = np.lexsort((first_ts, comp))
    firsts = order[np.r_[True, comp[order][1:] != comp[order][:-1]]]
    firsts = firsts[np.argsort(first_ts[firsts], kind="stable")]
    flow_of_comp = np.empty(comp.max() + 1, dtype=np.int64)
    flow_of_comp[comp[firsts]] = np.arange(len(firsts))
    flow = flow_of_comp[comp]
    rep = firsts[flow]
    fwd = (a == a[rep]) | (fb == b[rep])
    if packets["direction"].isna().all():
        packets["direction"] = pd.Categorical.from_codes(np.where(fwd, 0, 1), categories=["forward", "reverse"])
    nf = len(firsts)
    st = packets["status"]
    st_codes = (st.cat.codes.to_numpy() if hasattr(st, "cat") and list(st.cat.categories) == STATUSES
                else pd.Categorical(st.astype(str), categories=STATUSES).codes)
    pods, svcs = _by_ip(meta)
    ow = packets["one_way_ns"].astype("float64").to_numpy()
    by_time = np.lexsort((first_ts, flow))      # packets by flow, then time
    svc = _first_per(flow, by_time, nf, [_lookup(packets[cc].to_numpy(), svcs) for cc in ("_dst", "_src", "_fdst", "_fsrc")])
    peer = _first_per(flow, by_time, nf, [np.where(fwd, _lookup(packets["_fdst"].to_numpy(), pods),
                                                   _lookup(packets["_fsrc"].to_numpy(), pods))])
    q = (pd.DataFrame({"flow": flow, "ow": ow}).groupby("flow")["ow"].quantile([0.5, 0.99]).unstack()
         .reindex(range(nf)))
    p = packets.iloc[firsts]
    dst_pod = _lookup(p["_dst"].to_numpy(), pods)
    out = pd.DataFrame({
        "flow": np.arange(nf),
        "proto": p["proto"].to_numpy(),
        "src": p["src"].astype(str).to_numpy(), "sport": p["sport"].astype("Int64").array,
        "dst": p["dst"].astype(str).to_numpy(), "dport": p["dport"].astype("Int64").array,
        "src_pod": _lookup(p["_src"].to_numpy(), pods),
        # the pod itself, or for a Service (NATed) flow the backend it turned out to be
        "dst_pod": np.where(pd.isna(dst_pod), peer, dst_pod),
        "service": svc,
        "packets": np.bincount(flow, minlength=nf),
        "forward": np.bincount(flow, weights=fwd, minlength=nf).astype(np.int64),
        **{s: np.bincount(flow[st_codes == i], minlength=nf) for i, s in enumerate(STATUSES)},
        "bytes": np.bincount(flow, weights=packets["ip_len"].to_numpy(), minlength=nf).astype(np.int64),
        "p50_ns": q[0.5].to_numpy(), "p99_ns": q[0.99].to_numpy(),
        "first_ts_ns": first_ts[firsts],
        "last_ts_ns": _max_per(flow, packets["last_ts_ns"].to_numpy(), nf),
        "nodes": _flow_nodes(packets, flow, nf),
    })
    out.insert(out.columns.get_loc("forward") + 1, "reverse", out["packets"] - out["forward"])
    out.attrs["packet_flow"] = flow
    return out


def _first_per(group: np.ndarray, order: np.ndarray, n: int, candidates: list[np.ndarray]) -> np.ndarray:
    """Per group, the first (in `order`) non-missing value, trying candidates in turn."""
    out = np.full(n, None, dtype=object)
    for cand in candidates:
        vals = cand[order]
        ok = ~pd.isna(vals)
        idx = np.flatnonzero(ok)
        g = group[order][idx]
        ug, at = np.unique(g, return_index=True)
        fill = pd.isna(out[ug])
        out[ug[fill]] = vals[idx[at]][fill]
    return out


def _max_per(group: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(out, group, v.astype(np.int64))
    return out


def _flow_nodes(packets: pd.DataFrame, flow: np.ndarray, n: int) -> np.ndarray:
    """Nodes each flow's packets were seen on (first and last hop), as "node-1,node-2":
    one bit per node OR-ed per flow, then each distinct set named once."""
    names = pd.concat([packets["first_node"], packets["last_node"]]).to_numpy()
    codes, uniq = pd.factorize(names)
    if len(uniq) > 62:
        return np.full(n, "", dtype=object)
    bits = np.where(codes >= 0, np.left_shift(1, np.maximum(codes, 0)), 0).astype(np.int64)
    mask = np.zeros(n, dtype=np.int64)
    np.bitwise_or.at(mask, np.concatenate([flow, flow]), bits)
    mcodes, muniq = pd.factorize(mask)
    label = [",".join(sorted(str(uniq[i]) for i in range(len(uniq)) if m >> i & 1)) for m in muniq]
    return np.array(label, dtype=object)[mcodes]


def drop_table(packets: pd.DataFrame) -> pd.DataFrame:
    """Dropped packets by reason, node, device and kernel location."""
    cols = COLUMNS["drops"]
    d = packets[packets["status"].astype(str) == "dropped"] if len(packets) else packets
    if d.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("count", "flows") else "object")
                             for c in cols})
    keys = ["reason", "verdict_node", "verdict_dev", "location"]
    d = d.assign(**{k: d[k].astype(object).where(d[k].notna(), "") for k in keys})
    g = d.groupby(keys, sort=False, observed=True)
    out = g.agg(count=("packet", "size"), flows=("flow", "nunique"),
                first_ts_ns=("first_ts_ns", "min"), last_ts_ns=("last_ts_ns", "max")).reset_index()
    out = out.rename(columns={"verdict_node": "node", "verdict_dev": "dev"})
    for k in ("reason", "node", "dev", "location"):
        out[k] = out[k].replace("", None)
    return out.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)[cols]


# ---------------------------------------------------------------------------------------
# Pictures (matplotlib, imported only when drawing)

STATUS_COLOR = {"delivered": "tab:green", "dropped": "tab:red", "lost": "tab:orange", "left": "tab:gray"}


def hop_label(hops: pd.DataFrame) -> pd.Series:
    """"node/dev pt" per hop (pods by name), the key for per-hop statistics."""
    where = hops["pod"].astype(object).where(hops["pod"].notna(), hops["node"].astype(object)).fillna("(fabric)")
    return where.astype(str) + "/" + hops["dev"].astype(str) + " " + hops["point"].astype(str)


def plot_path(t: Trace, packet: int, ax=None):
    """The hop path of one packet as a diagram: one lane per pod/node/fabric namespace, hops
    left to right with Δt on the arrows, address changes (NAT) marked, the verdict at the end."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    hops = t.path(packet).reset_index(drop=True)
    pk = t.packets.loc[t.packets["packet"] == packet].iloc[0]
    lanes_of = hops["pod"].astype(object).where(hops["pod"].notna(), hops["node"].astype(object)).fillna("(fabric)")
    lanes = list(dict.fromkeys(lanes_of))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(8, 1.25 * len(hops) + 2), 1.0 + 0.9 * max(len(lanes), 1)))
    y = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    prev = None
    for i, h in hops.iterrows():
        yy = y[lanes_of[i]]
        enc = isinstance(h["encap"], str) and h["encap"]
        ax.add_patch(FancyBboxPatch((i - 0.42, yy - 0.28), 0.84, 0.56, boxstyle="round,pad=0.02",
                                    fc="#eef3fb" if not enc else "#fdf3e1", ec="#4a6fa5",
                                    ls="--" if enc else "-"))
        ax.text(i, yy + 0.06, str(h["dev"]), ha="center", va="center", fontsize=8)
        ax.text(i, yy - 0.14, str(h["point"]) + (f" {enc}" if enc else ""), ha="center", va="center",
                fontsize=7, color="#555")
        if prev is not None:
            py = y[lanes_of[i - 1]]
            ax.annotate("", xy=(i - 0.42, yy), xytext=(i - 0.58, py),
                        arrowprops=dict(arrowstyle="->", color="#333", lw=1))
            ax.text(i - 0.5, (yy + py) / 2 + 0.34, f"{h['dt_ns'] / 1000:.1f}µs", ha="center", fontsize=7)
            if (h["src"], h["dst"]) != (prev["src"], prev["dst"]):
                ax.text(i, yy + 0.4, f"{h['src']}→{h['dst']}", ha="center", fontsize=7, color="m")
        prev = h
    status = str(pk["status"])
    end = len(hops)
    ly = y[lanes_of.iloc[-1]] if len(hops) else 0
    mark = {"delivered": "✓", "dropped": "✗", "lost": "?", "left": "→"}.get(status, "?")
    why = f" {pk['reason']}" if status == "dropped" and pk["reason"] else ""
    ax.text(end - 0.35, ly, f"{mark} {status}{why}", color=STATUS_COLOR.get(status, "k"), fontsize=10,
            va="center", fontweight="bold")
    ax.set_yticks([y[lane] for lane in lanes], lanes)
    ax.set_xticks([])
    ax.set_xlim(-0.6, end + 1.6)
    ax.set_ylim(-0.7, len(lanes) - 0.3)
    sp = f":{pk['sport']}" if pd.notna(pk["sport"]) else ""
    dp = f":{pk['dport']}" if pd.notna(pk["dport"]) else ""
    ax.set_title(f"packet {packet} ({pk['direction']}) {pk['proto']} {pk['src']}{sp} → {pk['dst']}{dp}", fontsize=10)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return ax


# ---------------------------------------------------------------------------------------
# `podtrace analyze FILE`

def _analyze_command():
    import click

    @click.command("analyze")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--mode", type=click.Choice(["auto", "flow", "capture"]), default="auto", show_default=True,
                  help="Reconstruction: flow files as `flow` judged them, captures vectorised.")
    @click.option("--top", type=click.IntRange(1, 10000), default=20, show_default=True,
                  help="Rows per table.")
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
    def analyze(file, mode, top, output):
        """Summarise a trace file: packets, flows, drops and losses, as tables.

        FILE is a Parquet trace written by `podtrace capture` or `podtrace flow --save`.
        The same tables are in Jupyter: `from tracer import analysis; t = analysis.load(FILE)`.

        \b
        Examples:
          podtrace analyze capture.parquet
          podtrace analyze trace.parquet --top 50
          podtrace analyze capture.parquet -o json | jq .drops
        """
        import json
        import sys

        t = load(file, mode=mode)
        if t.meta.get("incomplete"):
            click.echo(f"podtrace: warning: {file} is an incomplete trace "
                       f"({' '.join(str(t.meta.get('incomplete_reason') or 'its writer did not finish').split())}); "
                       "what it holds is shown, the end of the recording is missing", err=True)
        doc = summary_doc(t, top)
        if output == "json":
            click.echo(json.dumps(doc, indent=2, default=str))
        else:
            from rich.console import Console

            out = Console()
            render_summary(doc, out if out.is_terminal else Console(width=160))
        sys.exit(0)

    return analyze


def summary_doc(t: Trace, top: int = 20) -> dict:
    """What `analyze` shows: the summary, the worst flows, the drops and the losses."""
    fl = t.flows
    if len(fl):
        bad = fl["dropped"] + fl["lost"]
        fl = fl.assign(_bad=bad).sort_values(["_bad", "packets"], ascending=False).drop(columns="_bad")
    cols = ["flow", "proto", "src", "sport", "dst", "dport", "src_pod", "dst_pod", "service", "packets",
            "delivered", "dropped", "lost", "left", "p50_ns", "p99_ns"]
    return {
        "file": t.meta.get("path"),
        "incomplete": t.meta.get("incomplete_reason") if t.meta.get("incomplete") else None,
        "summary": t.summary(),
        "counters": t.counters,
        "selection": t.meta.get("selection"),
        "flows": _records(fl[cols].head(top)) if len(fl) else [],
        "drops": _records(t.drops.head(top)),
        "not_delivered": _records(t.packets[t.packets["status"].astype(str) != "delivered"]
                                  [["packet", "flow", "direction", "proto", "src", "dst", "status",
                                    "verdict_node", "verdict_dev", "reason", "hint"]].head(top))
        if len(t.packets) else [],
    }


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for r in df.astype(object).where(df.notna(), None).to_dict("records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()})
    return out


def _us(ns) -> str:
    if ns is None or (isinstance(ns, float) and np.isnan(ns)):
        return "-"
    return f"{ns / 1000:.1f}µs" if ns < 10_000_000 else f"{ns / 1e6:.1f}ms"


def render_summary(doc: dict, console) -> None:
    from rich.table import Table

    s = doc["summary"]
    console.print(f"[bold]{s['kind'] or 'trace'}[/bold]: {s['events']} events, {s['packets']} packets, "
                  f"{s['flows']} flows over {s['span_s']}s"
                  + (f"  (format {s['format_version']}, upgraded from {s['upgraded_from']})"
                     if s.get("upgraded_from") else ""))
    console.print(f"delivered {s['delivered']}  [red]dropped {s['dropped']}[/red]  "
                  f"[yellow]lost {s['lost']}[/yellow]  left {s['left']}  "
                  + (f"[bold red]events lost {s['events_lost']} (ring buffer full: paths may have gaps)[/bold red]"
                     if s["events_lost"] else "events lost 0"))
    if doc["flows"]:
        t = Table(title="flows (worst first)", title_justify="left", show_edge=False)
        for c in ("flow", "proto", "source", "destination", "service", "pkts", "deliv", "drop", "lost",
                  "p50", "p99"):
            t.add_column(c, justify="right" if c in ("flow", "pkts", "deliv", "drop", "lost", "p50", "p99") else "left")
        for f in doc["flows"]:
            src = f"{f['src_pod'] or f['src']}" + (f":{f['sport']}" if f["sport"] is not None else "")
            dst = f"{f['dst_pod'] or f['dst']}" + (f":{f['dport']}" if f["dport"] is not None else "")
            t.add_row(str(f["flow"]), f["proto"] or "", src, dst, f["service"] or "", str(f["packets"]),
                      str(f["delivered"]), str(f["dropped"]), str(f["lost"]), _us(f["p50_ns"]), _us(f["p99_ns"]))
        console.print(t)
    if doc["drops"]:
        t = Table(title="drops", title_justify="left", show_edge=False)
        for c in ("reason", "node", "dev", "location", "count", "flows"):
            t.add_column(c, justify="right" if c in ("count", "flows") else "left")
        for d in doc["drops"]:
            t.add_row(d["reason"] or "", d["node"] or "(fabric)", d["dev"] or "", d["location"] or "",
                      str(d["count"]), str(d["flows"]))
        console.print(t)
    else:
        console.print("no drops")


analyze = _analyze_command()
