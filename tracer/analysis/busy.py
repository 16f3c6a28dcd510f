"""Busy flows: watched traffic of any rate, counted whole columns at a time.

A watch of a busy flow (`flow --no-probe` beside a transfer) sees hundreds of thousands of
packets. Judging each one by one (packets.build_packets, then diagnose) takes minutes; the
vectorised engine counts them in seconds. So above AGGREGATE_ABOVE packets a watch is
answered by an aggregate:

- counts per status, and per direction (request: sent by the client; reply: sent to it),
- the distinct hop paths (node, device, point per hop) with how many packets took each,
  their verdict and the percentiles of each hop's time since the first hop,
- one-way time percentiles of the delivered packets,
- and every failing packet (dropped, lost, left) judged in full, by the same per-packet
  engine and evidence as a probe, up to FULL_FAILING of them; the rest are counted.

Below AGGREGATE_ABOVE packets a watch keeps its per-packet tables, as probes always do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tracer.analysis.vectorised import reconstruct_vectorised, sequence_ids
from tracer.reconstruct import window as windows
from tracer.reconstruct.model import FlowVerdict
from tracer.reconstruct.verdict import NO_TRAFFIC

AGGREGATE_ABOVE = 1000     # packets: above this, a watch is answered by the aggregate
FULL_FAILING = 20          # failing packets judged in full (the rest are counted)
PATHS = 12                 # distinct paths listed (failing ones first, then the most taken)
AGGREGATE_EVENTS = 20_000  # a saved watch without an aggregate is read by the fast path above this
FAILING = ("dropped", "lost", "left")
STATUSES = ("delivered", "dropped", "lost", "left", "partial")
_PATH_COLS = ["node", "pod", "dev", "point"]


@dataclass
class Aggregate:
    """The aggregate of a busy watch, and the events of the packets to judge in full."""

    doc: dict                   # the `aggregate` of the flow's JSON
    full_events: pd.DataFrame   # the events of the failing packets judged in full


def with_places(meta: dict) -> dict:
    """A flow run's metadata as the vectorised engine reads a capture's: the pods and nodes
    with their addresses (where each address lives), from the flow's `addresses`."""
    out = dict(meta)
    pods: dict[str, list[str]] = {}
    nodes: dict[str, list[str]] = {}
    for ip, (node, pod) in (meta.get("addresses") or {}).items():
        if pod:
            pods.setdefault(pod, []).append(ip)
        elif node:
            nodes.setdefault(node, []).append(ip)
    out.setdefault("pods", [{"key": k, "ips": v} for k, v in pods.items()])
    out.setdefault("nodes", [{"name": k, "ips": v} for k, v in nodes.items()])
    return out


def _pcts(values: np.ndarray) -> dict | None:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if not len(values):
        return None
    p = np.percentile(values, [50, 90, 99])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2])}


def _none(v):
    return None if v is None or (isinstance(v, float) and v != v) or v is pd.NA else v


def aggregate(events: pd.DataFrame, meta: dict, client_ip: str | list[str] | None,
              force: bool = False) -> Aggregate | None:
    """The aggregate of a watched flow's events (None: AGGREGATE_ABOVE packets or fewer, and
    not `force`d: judge them one by one). `client_ip`: the source's address(es)."""
    out: dict = {}
    packets, hops = reconstruct_vectorised(events, with_places(meta), out=out)
    n = len(packets)
    if n <= AGGREGATE_ABOVE and not force:
        return None
    status = packets["status"].astype(str).to_numpy()
    src = packets["src"].astype(object).to_numpy()
    dst = packets["dst"].astype(object).to_numpy()
    fdst = packets["final_dst"].astype(object).to_numpy()
    clients = [client_ip] if isinstance(client_ip, str) or client_ip is None else list(client_ip)
    direction = np.where(np.isin(src, clients), "request",
                         np.where(np.isin(dst, clients) | np.isin(fdst, clients), "reply", "other"))
    counts = {s: int((status == s).sum()) for s in STATUSES}
    by_direction = {}
    for d in ("request", "reply", "other"):
        at = direction == d
        if at.any():
            by_direction[d] = {"packets": int(at.sum()),
                               **{s: int(((status == s) & at).sum()) for s in STATUSES if ((status == s) & at).any()}}
    one_way = packets["one_way_ns"].to_numpy(dtype="float64", na_value=np.nan)
    failing_at = np.flatnonzero(np.isin(status, FAILING))
    chosen = packets["packet"].to_numpy()[failing_at[:FULL_FAILING]]
    ev_pkt = out.get("event_packet", np.full(len(events), -1))
    full_events = events[np.isin(ev_pkt, chosen)] if len(chosen) else events.iloc[0:0]

    # -- paths: the hop sequence of each packet, grouped with direction and status -----------
    path_of = sequence_ids(hops, _PATH_COLS)
    pk_ids = packets["packet"].to_numpy()
    path = path_of.reindex(pk_ids).fillna(-1).to_numpy().astype(np.int64)
    groups = pd.DataFrame({"path": path, "direction": direction, "status": status, "row": np.arange(n)})
    sizes = groups.groupby(["path", "direction", "status"], sort=False)["row"].agg(["size", "first"]).reset_index()
    sizes["ok"] = sizes["status"].isin(["delivered", "partial"])
    sizes = sizes.sort_values(["ok", "size"], ascending=[True, False], kind="stable")
    shown, rest = sizes.iloc[:PATHS], sizes.iloc[PATHS:]
    hp = hops[["packet", "hop", "t_ns", *_PATH_COLS]]
    paths = []
    for g in shown.itertuples(index=False):
        row = int(g.first)
        example = int(pk_ids[row])
        members = np.flatnonzero((path == g.path) & (direction == g.direction) & (status == g.status))
        ex_hops = hp[hp["packet"] == example]
        member_hops = hp[hp["packet"].isin(pk_ids[members])]
        t_by_hop = member_hops.groupby("hop")["t_ns"]
        qs = t_by_hop.quantile([0.5, 0.9, 0.99]).unstack() if len(member_hops) else None
        hop_docs = []
        for h in ex_hops.itertuples(index=False):
            q = qs.loc[h.hop] if qs is not None and h.hop in qs.index else None
            hop_docs.append({"node": _none(h.node), "pod": _none(h.pod), "dev": _none(h.dev), "point": _none(h.point),
                             "t_ns": None if q is None else {"p50": int(q[0.5]), "p90": int(q[0.9]), "p99": int(q[0.99])}})
        pr = packets.iloc[row]
        paths.append({
            "direction": g.direction, "status": g.status, "packets": int(g.size),
            "verdict": {"node": _none(pr["verdict_node"]), "dev": _none(pr["verdict_dev"]),
                        "point": _none(pr["verdict_point"]), "reason": _none(pr["reason"]),
                        "hint": _none(pr["hint"]) if g.status != "delivered" else None},
            "one_way_ns": _pcts(one_way[members]),
            "hops": hop_docs,
        })
    delivered_one_way = {d: _pcts(one_way[(direction == d) & (status == "delivered")])
                         for d in ("request", "reply") if ((direction == d) & (status == "delivered")).any()}
    window = windows.from_meta(meta)
    why = _partial_why(packets, status, windows.from_meta(meta))
    doc = {
        "packets": n, **counts,
        **({"partial_why": why} if why else {}),
        "by_direction": by_direction,
        "failing": int(len(failing_at)), "failing_judged": int(len(chosen)),
        "one_way_ns": delivered_one_way,
        "paths": paths, "other_paths": int(len(rest)), "other_paths_packets": int(rest["size"].sum()),
        "events": int(len(events)),
        "first_ts_ns": int(packets["first_ts_ns"].min()) if n else None,
        "last_ts_ns": int(packets["last_ts_ns"].max()) if n else None,
    }
    return Aggregate(doc, full_events)


def _partial_why(packets: pd.DataFrame, status: np.ndarray, window) -> list[str]:
    """Why the partial packets were partial (window.outside's phrases), the most frequent
    first, from up to 1000 of them spread over the trace."""
    at = np.flatnonzero(status == "partial")
    if window is None or not len(at):
        return []
    at = at[np.linspace(0, len(at) - 1, min(len(at), 1000)).astype(np.int64)]
    first, last = packets["first_ts_ns"].to_numpy()[at], packets["last_ts_ns"].to_numpy()[at]
    count: dict[str, int] = {}
    for f, l in zip(first.tolist(), last.tolist()):
        w = window.outside(int(f), int(l))
        if w:
            count[w] = count.get(w, 0) + 1
    return sorted(count, key=lambda w: -count[w])


def verdict(doc: dict, judged: list) -> FlowVerdict:
    """The flow verdict of an aggregate: every packet seen whole was delivered (as for a
    watch judged packet by packet); the problems name the first failing packet of each
    status, as judged in full (`judged`), else as the path it took."""
    n, ok_n, part = doc["packets"], doc["delivered"], doc["partial"]
    whole = n - part
    problems: list[str] = []
    said: set[str] = set()
    for p in judged:
        v = p.verdict
        if v.status in FAILING and v.status not in said:
            said.add(v.status)
            problems.append(f"{p.direction or 'packet'} {v.status} at {v.node or 'fabric'}/{v.dev}"
                            + (f" ({v.reason})" if v.reason else "") + (f": {v.cause}" if v.cause else ""))
    for path in doc["paths"]:
        v = path["verdict"]
        if path["status"] in FAILING and path["status"] not in said:
            said.add(path["status"])
            problems.append(f"{path['direction']} {path['status']} at {v['node'] or 'fabric'}/{v['dev']}"
                            + (f" ({v['reason']})" if v.get("reason") else ""))
    if not n:
        return FlowVerdict("failed", "no packet between them was seen while watching", (NO_TRAFFIC,))
    summary = f"{ok_n}/{n} packets delivered"
    if part:
        why = "; ".join(doc.get("partial_why") or ["seen only while an observer on its path was not tracing"])
        summary += f" ({part} partial: {why})"
    if not whole:
        problems.append("every packet seen was seen only in part (an observer on its path was not tracing)")
    return FlowVerdict("ok" if whole and ok_n == whole else "failed", summary, tuple(problems))


def summary(doc: dict, counters: dict) -> dict:
    """The figures of a flow run (verdict.summary's keys) from an aggregate."""
    ow = (doc.get("one_way_ns") or {}).get("request") or {}
    return {"probes": 0, "packets": doc["packets"], "delivered": doc["delivered"], "partial": doc["partial"],
            "failed": doc["packets"] - doc["delivered"] - doc["partial"], "answered": 0,
            "median_one_way_ns": ow.get("p50"), "median_rtt_ns": None,
            "events_lost": int(counters.get("lost", 0))}


def is_busy(events: pd.DataFrame, meta: dict) -> bool:
    """Whether a saved flow is read by the fast path: a busy watch (its `aggregate`), or a
    watch interrupted before it was judged with more events than a quiet one has."""
    if meta.get("aggregate") is not None:
        return True
    return meta.get("probing") is False and len(events) > AGGREGATE_EVENTS


def tables(events: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(packets, hops) of a saved busy watch: the vectorised engine's, as the live run counted
    them, with `direction` from the client's address (request: sent by it; reply: to it)."""
    packets, hops = reconstruct_vectorised(events, with_places(meta))
    from tracer.analysis.flowfile import _endpoint

    clients = _endpoint(meta["src"], meta).addresses() if meta.get("src") else [None]
    if len(packets):
        src = packets["src"].astype(object).to_numpy()
        to = np.isin(packets["dst"].astype(object).to_numpy(), clients) | \
            np.isin(packets["final_dst"].astype(object).to_numpy(), clients)
        packets["direction"] = np.where(np.isin(src, clients), "request", np.where(to, "reply", None))
        if len(hops):
            hops["direction"] = packets["direction"].to_numpy()[hops["packet"].to_numpy()]
    return packets, hops
