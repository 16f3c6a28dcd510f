"""Offline analysis of saved traces, for Jupyter: `load(FILE)` → DataFrames."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import flows, k8s, tracefile
from .probe import ProbeResult


@dataclass
class Trace:
    events: pd.DataFrame     # one row per hop event, as captured
    hops: pd.DataFrame       # one row per hop of every reconstructed packet
    packets: pd.DataFrame    # one row per packet with its verdict
    meta: dict


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


def reconstruct(events: pd.DataFrame, meta: dict) -> list[dict]:
    placement = flows.Placement({int(k): tuple(v) for k, v in meta["placement"].items()})
    locations = {int(k): v for k, v in meta.get("locations", {}).items()}
    fi = flows.FlowInput(
        _endpoint(meta["src"], meta), _endpoint(meta["dst"], meta), meta["proto"], meta["port"],
        [ProbeResult(**p) for p in meta.get("probes", [])], placement,
        {int(k): v for k, v in meta.get("drop_reasons", {}).items()}, lambda a: locations.get(a),
        {int(k): v for k, v in meta.get("ct_info_names", {}).items()})
    return flows.build_packets(events, fi)


def load(path: str) -> Trace:
    events, meta = tracefile.load(path)
    packets = reconstruct(events, meta)
    hop_rows, pkt_rows = [], []
    for i, p in enumerate(packets):
        pkt_rows.append({"packet": i, "direction": p["direction"], "seq": p["seq"],
                         **{f"tuple_{k}": v for k, v in p["tuple"].items()},
                         "status": p["verdict"]["status"], "verdict_node": p["verdict"]["node"],
                         "verdict_dev": p["verdict"]["dev"], "reason": p["verdict"]["reason"],
                         "one_way_ns": p["one_way_ns"], "hops": len(p["hops"])})
        for j, h in enumerate(p["hops"]):
            enc = h["encap"] or {}
            hop_rows.append({"packet": i, "hop": j, "direction": p["direction"], "seq": p["seq"],
                             **{k: v for k, v in h.items() if k != "encap"},
                             "encap_src": enc.get("src"), "encap_dst": enc.get("dst"),
                             "vni": enc.get("vni")})
    return Trace(events, pd.DataFrame(hop_rows), pd.DataFrame(pkt_rows), meta)
