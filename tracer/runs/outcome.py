"""The outcome of a flow run: packets rebuilt from the events, judged, named and saved."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from tracer import testhooks
from tracer.reconstruct import diagnose
from tracer.reconstruct import packets as flows
from tracer.cluster import inventory as k8s
from tracer.node import netns
from tracer.node import facts as nodecheck
from tracer.node import prober as probe
from tracer.config import FlowConfig
from tracer.runs.plan import Plan


SCHEMA_VERSION = 1


@dataclass
class FlowResult:
    config: FlowConfig
    src: k8s.Endpoint
    dst: k8s.Endpoint
    proto: str
    port: int | None
    probes: list[probe.ProbeResult]
    packets: list[dict]
    verdict: dict
    summary: dict
    counters: dict
    timings: dict
    events: pd.DataFrame
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clock: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict["status"] == "ok"

    def as_json(self) -> dict:
        return {
            "version": SCHEMA_VERSION,
            "src": self.src.as_json(),
            "dst": self.dst.as_json(),
            "probe": {"proto": self.proto, "port": self.port,
                      "count": len(self.probes) if self.config.probe else 0},
            "packets": self.packets,
            "verdict": {"status": self.verdict["status"], "summary": self.verdict["summary"],
                        "problems": self.verdict.get("problems", [])},
            "summary": self.summary,
            "probes": [p.as_json() for p in self.probes],
            "counters": self.counters,
            "timings": self.timings,
            "notes": self.notes,
            "clock": self.clock,
        }


@dataclass
class Traced:
    """What tracing produced, whichever way it ran (one process, or agents)."""

    df: pd.DataFrame
    sent: list[probe.ProbeResult]
    counters: dict
    locations: dict[int, str | None]
    hooks: list[str]
    degraded: list[str]
    timings: dict
    t_tracing: float
    t_done: float
    evidence: Callable[[list[dict]], diagnose.Evidence]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    clock: dict = field(default_factory=dict)


def flow_input(plan: Plan, sent, locations, clock: dict | None = None) -> flows.FlowInput:
    return flows.FlowInput(plan.src, plan.dst, plan.proto, plan.port, sent, plan.placement,
                           plan.drop_reasons, lambda a: locations.get(a), plan.ct_names,
                           contiguous_agents=bool((clock or {}).get("offsets")), sample=plan.cfg.sample)


def fact_query(node: str, packet: dict) -> dict:
    """The question nodecheck.facts() answers for a packet on a node: its addresses at the
    node's last hop, and the device it came in by (the node's last rx hop), so the route is
    looked up as the kernel did for this packet, not as for the node's own traffic."""
    last = [h for h in packet["hops"] if h["node"] == node] or packet["hops"]
    rx = [h for h in last if h["point"] == "rx" and h["pod"] is None]
    iif = rx[-1]["dev"] if rx else None
    devs = list(dict.fromkeys(h["dev"] for h in packet["hops"] if h["node"] == node and h["pod"] is None))
    return {"src": last[-1]["src"], "dst": last[-1]["dst"], "iif": iif, "devs": devs}


def vtep(topo) -> dict:
    return topo.vtep() if topo is not None else {}


def local_evidence(topo, dst: k8s.Endpoint, refs, before, after) -> diagnose.Evidence:
    cache: dict[str, dict] = {}

    def facts(node: str, packet: dict) -> dict | None:
        ref = refs.get(node)
        if ref is None:
            return None
        q = fact_query(node, packet)
        key = json.dumps(q, sort_keys=True) + node
        if key not in cache:
            cache[key] = nodecheck.facts(ref, src=q["src"], dst=q["dst"], iif=q["iif"], devs=q["devs"])
        return cache[key]

    hits = {n: nodecheck.rule_hits(before[n], after[n]) for n in after if n in before}
    svc = dst.service
    return diagnose.Evidence(facts=facts, rule_hits=hits, vip=svc.cluster_ip if svc else None,
                             service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=vtep(topo))


def recording_evidence(plan: Plan, queries: dict[str, list[dict]]) -> diagnose.Evidence:
    def facts(node, packet):
        q = fact_query(node, packet)
        if q not in queries.setdefault(node, []):
            queries[node].append(q)
        return None
    svc = plan.dst.service
    return diagnose.Evidence(facts=facts, vip=svc.cluster_ip if svc else None,
                             service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=vtep(plan.topology))


def agent_evidence(plan: Plan, facts_by_node: dict[str, dict]) -> diagnose.Evidence:
    def facts(node, packet):
        q = fact_query(node, packet)
        for ans in (facts_by_node.get(node) or {}).get("answers", []):
            if ans.get("query") == q and "facts" in ans:
                return ans["facts"]
        return None
    svc = plan.dst.service
    return diagnose.Evidence(facts=facts,
                             rule_hits={n: f.get("rule_hits", []) for n, f in facts_by_node.items()},
                             vip=svc.cluster_ip if svc else None, service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=vtep(plan.topology))


def enrich(packets: list[dict], inv: k8s.Inventory) -> None:
    """Name each hop's addresses from the cluster metadata: the pod (and its workload), the
    Service of a VIP, the node of a node address."""
    cache: dict[str, dict | None] = {}

    def name(ip):
        if ip not in cache:
            cache[ip] = inv.describe_ip(ip)
        return cache[ip]
    for p in packets:
        for h in p["hops"]:
            h["src_is"], h["dst_is"] = name(h["src"]), name(h["dst"])


def finish(plan: Plan, t: Traced) -> FlowResult:
    cfg = plan.cfg
    testhooks.pause("reconstructing")
    fi = flow_input(plan, t.sent, t.locations, t.clock)
    packets = flows.build_packets(t.df, fi)
    enrich(packets, plan.inv)
    ev = t.evidence(packets)
    for p in packets:
        diagnose.explain(p, ev)
    verdict = flows.flow_verdict(packets, fi, cfg.probe)
    # A lab pod deleted while tracing: say so instead of letting the drops it causes pass
    # for the cause (the pod's own view is gone, not the network broken).
    gone = [f"{e.pod.key} was deleted during the trace (its network namespace is gone); "
            "verdicts after that are about a pod that no longer exists"
            for e in (plan.src, plan.dst) if plan.topology and e.pod and e.pod.netns and not netns.exists(e.pod.netns)]
    if t.problems or gone:
        verdict["problems"] = gone + verdict.get("problems", []) + t.problems
        verdict["status"] = "failed"
    summary = flows.summary(packets, fi, t.counters)
    timings = {
        "resolve_s": round(plan.t_resolved - plan.t_start, 4),
        "startup_s": round(t.t_tracing - plan.t_start, 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.timings.items()},
        "trace_s": round(t.t_done - t.t_tracing, 4),
        "reconstruct_s": round(time.monotonic() - t.t_done, 4),
    }
    notes = plan.notes + t.degraded + t.notes
    if t.counters.get("lost"):
        notes.append(f"{t.counters['lost']} events were lost (ring buffer full); the path may have gaps")
        if any(p["verdict"]["status"] == "lost" for p in packets):   # the trace's gap, or the network's?
            verdict.setdefault("problems", []).append(
                f"the tracer lost {t.counters['lost']} events (ring buffer full): a `lost` verdict may be "
                "a gap in the trace rather than a loss in the network")
    if t.counters.get("over_budget"):
        notes.append(f"{t.counters['over_budget']} events were not recorded to stay within the event budget "
                     f"({cfg.budget}/s per node); raise it with --max-events or sample with --sample")
    if cfg.sample > 1:
        notes.append(f"sampling: 1 packet in {cfg.sample} is traced (the same packets on every node)")
    result = FlowResult(cfg, plan.src, plan.dst, plan.proto, plan.port, t.sent, packets, verdict, summary,
                        t.counters, timings, t.df, notes=notes)
    result.clock = t.clock
    result.meta = {
        "version": SCHEMA_VERSION, "src": plan.src.as_json(), "dst": plan.dst.as_json(),
        "proto": plan.proto, "port": plan.port, "probes": [p.as_json() for p in t.sent],
        "placement": {str(k): list(v) for k, v in plan.placement.netns.items()},
        "drop_reasons": {str(k): v for k, v in plan.drop_reasons.items()},
        "locations": {str(k): v for k, v in t.locations.items()},
        "ct_info_names": {str(k): v for k, v in plan.ct_names.items()},
        "service": ({"key": plan.dst.service.key, "backends": plan.dst.service.backends,
                     "backend_ips": plan.dst.service.backend_ips} if plan.dst.service else None),
        "probing": cfg.probe, "counters": t.counters, "inventory": plan.inv.source,
        "hooks": t.hooks, "degraded": t.degraded, "clock": t.clock,
        "created_ns": time.time_ns(),
    }
    if cfg.save:
        from tracer import tracefile
        tracefile.save(cfg.save, t.df, result.meta)
    return result

