"""Flow files (`flow --save`): the packets exactly as `podtrace flow` judged them, as tables.

The per-packet path of the one engine (packets.build_packets, then diagnose.judge with the
evidence the live run saved), so a saved flow gives offline the live verdicts, causes,
`request`/`reply` directions and probe `seq`s.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from tracer import tracefile
from tracer.analysis.trace import _empty_hops, _empty_packets
from tracer.cluster import inventory
from tracer.node.prober import ProbeResult
from tracer.reconstruct import beyond, diagnose, evidence, identity, window as windows
from tracer.reconstruct.packets import FlowInput, Placement, build_packets
from tracer.reconstruct.drops import ip_num as _ip_num
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import Packet

def _endpoint(d: dict, meta: dict) -> inventory.Endpoint:
    ep = inventory.Endpoint(d["spec"], d["ip"])
    if d.get("pod"):
        ns, name = d["pod"].split("/", 1)
        ep.pod = inventory.Pod(ns, name, d.get("node"), d["ip"])
    svc = meta.get("service")
    if d.get("service") and svc:
        ns, name = d["service"].split("/", 1)
        ep.service = inventory.Service(ns, name, d["ip"], backends=svc["backends"], backend_ips=svc["backend_ips"])
    if d.get("node") and not d.get("pod"):
        # the node's other addresses the live run traced it by (its CNI's, e.g. Cilium's router IP)
        own = [ip for ip, (node, pod) in (meta.get("addresses") or {}).items()
               if node == d["node"] and not pod and ip != d["ip"]]
        ep.node = inventory.Node(d["node"], d["ip"], cni_ips=own)
    return ep


def _flow_input(meta: dict) -> FlowInput:
    """The flow's inputs from a file's metadata; metadata of the wrong shape is a damaged file."""
    try:
        return _flow_input_of(meta)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise tracefile.TraceFileError(meta.get("path", "trace"), "has damaged flow metadata "
                                       f"({type(exc).__name__}: {exc})") from None


def _flow_input_of(meta: dict) -> FlowInput:
    placement = Placement({int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()})
    locations = {int(k): v for k, v in (meta.get("locations") or {}).items()}
    return FlowInput(
        _endpoint(meta["src"], meta), _endpoint(meta["dst"], meta), meta.get("proto"), meta.get("port"),
        [ProbeResult(**p) for p in meta.get("probes", [])], placement,
        {int(k): v for k, v in (meta.get("drop_reasons") or {}).items()}, lambda a: locations.get(a),
        {int(k): v for k, v in (meta.get("ct_info_names") or {}).items()}, **_agents_kw(meta),
        view=beyond.View.from_json(meta.get("view")),
        addresses={str(k): tuple(v) for k, v in (meta.get("addresses") or {}).items()})


def _agents_kw(meta: dict) -> dict:
    # Merged multi-node traces whose clocks were estimated keep each node's events together.
    if "contiguous_agents" in getattr(FlowInput, "__dataclass_fields__", {}):
        return {"contiguous_agents": bool((meta.get("clock") or {}).get("offsets"))}
    return {}


def reconstruct(events: pd.DataFrame, meta: dict) -> list[Packet]:
    """The packets of a flow trace as `podtrace flow` judged them: with the evidence the live
    run saved, or (older files) the causes that need no live node (stale DNAT, un-reversed
    replies)."""
    fi = _flow_input(meta)
    packets = build_packets(events, fi)
    window = windows.from_meta(meta)     # seen while an agent was not tracing: partial, as live
    if isinstance(meta.get("evidence"), dict):
        # the evidence the live run judged with: the same causes as its `-o json`
        return windows.apply(diagnose.judge(packets, Evidence.from_json(meta["evidence"])), window)
    packets = windows.apply(diagnose.judge(packets, evidence.service_evidence(fi.dst.service, fi.dst.ip)), window)
    # files written before the evidence was saved: no node facts to show
    return [replace(p, verdict=replace(p.verdict, evidence=_without_node_facts(p.verdict.evidence)))
            for p in packets]


def _without_node_facts(ev: dict | None) -> dict | None:
    rest = {k: v for k, v in (ev or {}).items() if k != "node_facts"}
    return rest or None


def _flow_tables(events: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    packets = reconstruct(events, meta)
    icmp_ev = events[events["proto"].isin(identity.ICMP_PROTOS)]
    echo_ids = dict(zip(icmp_ev["ts_ns"].tolist(), icmp_ev["sport"].tolist()))
    hop_rows, pkt_rows = [], []
    for i, p in enumerate(packets):
        v, t = p.verdict, p.five_tuple.as_json()
        hops = [h.as_json() for h in p.hops]
        first, last = hops[0], hops[-1]
        icmp = t["proto"] in ("icmp", "icmpv6")
        pkt_rows.append({
            "packet": i, "direction": p.direction, "seq": p.seq,
            "proto": t["proto"], "src": t["src"], "sport": t["sport"], "dst": t["dst"], "dport": t["dport"],
            "final_src": last["src"], "final_sport": last["sport"], "final_dst": last["dst"],
            "final_dport": last["dport"], "ip_id": p.ip_id, "ip_len": p.ip_len, "tcp_flags": p.tcp_flags,
            "first_ts_ns": p.first_ts_ns, "last_ts_ns": p.first_ts_ns + last["t_ns"],
            "hops": len(hops), "first_node": first["node"], "first_pod": first["pod"],
            "first_dev": first["dev"], "last_node": last["node"], "last_pod": last["pod"],
            "last_dev": last["dev"], "last_point": last["point"], "status": v.status,
            "verdict_node": v.node, "verdict_dev": v.dev, "verdict_point": v.point,
            "reason": v.reason, "location": v.location, "cause": v.cause,
            "hint": v.hint, "runbook": v.runbook, "one_way_ns": p.one_way_ns,
            "duration_ns": last["t_ns"],
            # numeric keys for the flow table (ICMP: the echo id on both sides)
            "_proto": identity.PROTO_IDS.get(t["proto"], 0),
            "_src": _ip_num(t["src"]), "_dst": _ip_num(t["dst"]),
            "_fsrc": _ip_num(last["src"]), "_fdst": _ip_num(last["dst"]),
            "_sport": echo_ids.get(p.first_ts_ns, 0) if icmp else (t["sport"] or 0),
            "_dport": echo_ids.get(p.first_ts_ns, 0) if icmp else (t["dport"] or 0),
            "_fsport": echo_ids.get(p.first_ts_ns, 0) if icmp else (last["sport"] or 0),
            "_fdport": echo_ids.get(p.first_ts_ns, 0) if icmp else (last["dport"] or 0),
        })
        for j, h in enumerate(hops):
            enc = h["encap"] or {}
            ct = h.get("ct") or {}
            hop_rows.append({"packet": i, "hop": j, "direction": p.direction, "seq": p.seq,
                             "ts_ns": p.first_ts_ns + h["t_ns"],
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
