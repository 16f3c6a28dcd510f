"""The outcome of a flow run: packets rebuilt from the events, judged, named, saved."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from tracer import testhooks
from tracer.reconstruct import beyond, diagnose, evidence, source, window as windows
from tracer.reconstruct.packets import FlowInput, build_packets
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import FlowVerdict, Packet
from tracer.cluster import inventory
from tracer.node import netns
from tracer.node import facts
from tracer.node import prober
from tracer.node import sourcefacts
from tracer.config import WATCH_BUDGET_SECONDS, FlowConfig
from tracer.errors import ExitStatus, PodtraceError
from tracer.kernel import contract
from tracer.runs.interrupt import Interrupted
from tracer.runs.plan import Plan

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd


SCHEMA_VERSION = 1


@dataclass
class FlowResult:
    config: FlowConfig
    src: inventory.Endpoint
    dst: inventory.Endpoint
    proto: str
    port: int | None
    probes: list[prober.ProbeResult]
    packets: list[Packet]
    verdict: FlowVerdict
    summary: dict
    counters: dict
    timings: dict
    events: pd.DataFrame
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clock: dict = field(default_factory=dict)
    names: dict[str, dict | None] = field(default_factory=dict)   # hop address → what it is
    interrupted: Interrupted | None = None     # Ctrl-C/SIGTERM while tracing: how far it got
    aggregate: dict | None = None      # a busy watch: the counts and paths (busy.py); packets: its failing ones

    @property
    def ok(self) -> bool:
        return self.verdict.status == "ok"

    def as_json(self) -> dict:
        return {
            "version": SCHEMA_VERSION,
            "src": self.src.as_json(),
            "dst": self.dst.as_json(),
            "probe": {"proto": self.proto, "port": self.port,
                      "count": len(self.probes) if self.config.probe else 0},
            "packets": [p.as_json(self.names) for p in self.packets],
            "verdict": self.verdict.as_json(),
            "summary": self.summary,
            "probes": [p.as_json() for p in self.probes],
            "counters": self.counters,
            "timings": self.timings,
            "notes": self.notes,
            "clock": self.clock,
            "interrupted": self.interrupted is not None,
            **({"interruption": self.interrupted.as_json()} if self.interrupted else {}),
            **({"aggregate": self.aggregate} if self.aggregate is not None else {}),
        }


@dataclass
class Traced:
    """What tracing produced, whichever way it ran (one process, or agents)."""

    df: pd.DataFrame
    sent: list[prober.ProbeResult]
    counters: dict
    locations: dict[int, str | None]
    hooks: list[str]
    degraded: list[str]
    timings: dict
    t_tracing: float
    t_done: float
    evidence: Callable[[list[Packet]], "Evidence | LocalEvidence"]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    clock: dict = field(default_factory=dict)
    packets: list[Packet] | None = None   # already built by the tracing (agents); None: build from df
    window: windows.Window | None = None  # when every observer was tracing; None: all along
    view: "beyond.View | None" = None     # the nodes traced, and why the others were not
    interrupted: Interrupted | None = None   # stopped by Ctrl-C/SIGTERM while tracing
    saving: bool = False                  # finish() got to writing --save
    judging_stopped: bool = False         # Ctrl-C while the agents' packets were judged
    aggregate: dict | None = None         # a busy watch's aggregate, when the tracing made it (agents)
    sample: int = 1                       # 1 in N packets kept at the end (the guard may raise it)
    kernel_budget: int | None = None      # events/s each kernel kept to, when not --max-events (a watch's own)


def keep_sampled(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The events of the packets kept when keeping 1 in n (the kernel's own rule): the guard
    raises sampling on each node on its own, so a packet kept early on one node may be gone
    on the next; only the packets every node kept count. Events without a protocol (a drop
    of an unparsed buffer) stay."""
    if n <= 1 or df.empty:
        return df
    return df[contract.kept(df, n)]


def engine_meta(plan: Plan, fi: FlowInput, locations: dict, window, view) -> dict:
    """What the vectorised engine reads of a flow (the same keys the saved metadata has)."""
    return {"placement": {str(k): list(v) for k, v in plan.placement.netns.items()},
            "addresses": {k: list(v) for k, v in fi.addresses.items()},
            "drop_reasons": {str(k): v for k, v in plan.drop_reasons.items()},
            "locations": {str(k): v for k, v in locations.items()},
            "ct_info_names": {str(k): v for k, v in plan.ct_names.items()},
            **({"window": window.as_json()} if window is not None else {}),
            **({"view": view.as_json()} if view is not None else {})}


def watch_packets(plan: Plan, df: pd.DataFrame, fi: FlowInput, locations: dict, window, view,
                  sample: int = 1) -> tuple[list[Packet], dict | None]:
    """The packets of a watch to judge one by one, and the aggregate of a busy one (None:
    few enough packets to judge them all). `sample`: 1 in N packets kept at the end; above
    the user's own sampling, the guard raised it for the event budget, and the flow is busy
    however few packets were kept."""
    from tracer.analysis import busy

    agg = busy.aggregate(df, engine_meta(plan, fi, locations, window, view), plan.src.addresses(),
                         force=sample > plan.cfg.sample and not df.empty)
    if agg is None:
        return build_packets(df, fi), None
    return build_packets(agg.full_events, fi), agg.doc


def flow_input(plan: Plan, sent, locations, clock: dict | None = None, view=None) -> FlowInput:
    return FlowInput(plan.src, plan.dst, plan.proto, plan.port, sent, plan.placement,
                           plan.drop_reasons, lambda a: locations.get(a), plan.ct_names,
                           contiguous_agents=bool((clock or {}).get("offsets")), sample=plan.cfg.sample,
                           view=view, addresses=addresses(plan))


def traced_view(plan: Plan, traced, why: dict[str, str] | None = None) -> beyond.View:
    """The run's View: the inventory's nodes, those traced, why the others were not."""
    return beyond.view_of(plan.inv.nodes.values(), traced, why)


def addresses(plan: Plan) -> dict[str, tuple[str | None, str | None]]:
    """Address → (node, pod key) of every pod and node traced: where a DNAT target lives."""
    traced = set(plan.placement.netns.values())
    out: dict[str, tuple[str | None, str | None]] = {}
    for node, pod in traced:
        p = plan.inv.pods.get(pod) if pod else None
        if p is not None and not p.host_network:
            out.update({a: (node, pod) for a in p.addresses()})      # each family's address
    for node, pod in traced:
        n = plan.inv.nodes.get(node) if node and not pod else None
        if n is not None:
            out.update({a: (node, None) for a in [*n.internal_ips(), *n.cni_ips]})
    return out


def vtep(topo) -> dict:
    return topo.vtep() if topo is not None else {}


def service_evidence(plan: Plan) -> Evidence:
    """The evidence known before any node is asked: the Service and the overlay map."""
    e = evidence.service_evidence(plan.dst.service, plan.dst.ip)
    return Evidence(vip=e.vip, service=e.service, backends=e.backends, vtep=vtep(plan.topology))


@dataclass
class LocalEvidence:
    """Node facts read from this machine's namespaces, asked once the packets are known."""

    base: Evidence
    refs: dict
    source: tuple[str, str, dict] | None = None   # (node, pod netns, query) of the source pod

    def resolve(self, packets: list[Packet], probes: list[prober.ProbeResult] = ()) -> Evidence:
        answers: dict[str, list[dict]] = {}
        if self.source and source.needed(packets, list(probes), self.source[2]["pod"]):
            node, ns, q = self.source
            answers.setdefault(node, []).append({"query": q, "facts": sourcefacts.read(ns, q["dst"])})
        for node, queries in diagnose.facts_needed(packets, self.base).items():
            ref = self.refs.get(node)
            if ref is None:
                continue
            answers[node] = [{"query": q, "facts": facts.facts(ref, src=q["src"], dst=q["dst"],
                                                                   iif=q["iif"], devs=q["devs"],
                                                                   pod_netns=q.get("pod_netns"),
                                                                   pod_dev=q.get("pod_dev"))}
                             for q in queries]
        return self.base.with_answers(answers)


def pod_hits(plan: Plan, by_inode: dict) -> dict[str, list[dict]]:
    """Rule hits read in pod namespaces (inode → hits), keyed by the pod's name."""
    out: dict[str, list[dict]] = {}
    for ino, hits in (by_inode or {}).items():
        pod = plan.placement.pod(int(ino))
        if pod and hits:
            out.setdefault(pod, []).extend(hits)
    return out


def local_evidence(topo, dst: inventory.Endpoint, refs, before, after, pods: dict | None = None,
                   src_query: tuple[str, str, dict] | None = None) -> LocalEvidence:
    hits = {n: facts.rule_hits(before[n], after[n]) for n in after if n in before}
    hits.update(pods or {})
    e = evidence.service_evidence(dst.service, dst.ip)
    return LocalEvidence(Evidence(rule_hits=hits, vip=e.vip, service=e.service, backends=e.backends,
                                  vtep=vtep(topo)), refs, src_query)


def source_query(plan: Plan) -> dict | None:
    """The question about the source pod's own view (answered only when a probe never left it)."""
    pod = plan.src.pod
    if pod is None or not plan.cfg.probe:
        return None
    return source.query(pod.key, plan.src.ip, plan.dst.ip, plan.cfg.size)


def agent_evidence(plan: Plan, facts_by_node: dict[str, dict]) -> Evidence:
    """The evidence the agents sent back with their facts."""
    hits = {n: f.get("rule_hits", []) for n, f in facts_by_node.items()}
    for f in facts_by_node.values():
        hits.update(pod_hits(plan, f.get("netns_rule_hits")))
    return service_evidence(plan).with_answers(
        {n: list(f.get("answers") or []) for n, f in facts_by_node.items()}, hits)


def names(packets: list[Packet], inv: inventory.Inventory) -> dict[str, dict | None]:
    """Every hop address → what the cluster metadata calls it: the pod (and its workload),
    the Service of a VIP, the node of a node address (None: nothing known)."""
    out: dict[str, dict | None] = {}
    for p in packets:
        for h in p.hops:
            for ip in (h.src, h.dst):
                if ip not in out:
                    out[ip] = inv.describe_ip(ip)
    return out


def finish(plan: Plan, t: Traced) -> FlowResult:
    cfg = plan.cfg
    testhooks.pause("reconstructing")
    fi = flow_input(plan, t.sent, t.locations, t.clock, t.view)
    if t.sample > fi.sample:     # the guard raised it: a probe no node kept was not sampled
        fi = replace(fi, sample=t.sample)
    agg = t.aggregate
    if t.packets is not None:
        packets = t.packets
    elif cfg.probe:
        packets = build_packets(t.df, fi)
    else:
        packets, agg = watch_packets(plan, t.df, fi, t.locations, t.window, t.view, t.sample)
    named = names(packets, plan.inv)
    ev = t.evidence(packets)
    if isinstance(ev, LocalEvidence):
        ev = ev.resolve(packets, t.sent)
    # The window is about watched traffic: probes are sent once every agent is ready, and
    # every agent is drained after the last one, so a probe's packet is never outside it.
    window = None if cfg.probe else t.window
    packets = windows.apply(diagnose.judge(packets, ev), window)
    verdict, probes = verdicts.flow_verdict(packets, fi, cfg.probe, ev)
    if agg is not None:
        from tracer.analysis import busy

        verdict = busy.verdict(agg, packets)
    # A lab pod deleted while tracing: say so instead of letting the drops it causes pass
    # for the cause (the pod's own view is gone, not the network broken).
    gone = [f"{e.pod.key} was deleted during the trace (its network namespace is gone); "
            "verdicts after that are about a pod that no longer exists"
            for e in (plan.src, plan.dst) if plan.topology and e.pod and e.pod.netns and not netns.exists(e.pod.netns)]
    if t.problems or gone:
        verdict = replace(verdict, status="failed", problems=(*gone, *verdict.problems, *t.problems))
    summary = verdicts.summary(packets, probes, t.counters, cfg.probe)
    if agg is not None:
        from tracer.analysis import busy

        summary = busy.summary(agg, t.counters)
    timings = {
        "resolve_s": round(plan.t_resolved - plan.t_start, 4),
        "startup_s": round(t.t_tracing - plan.t_start, 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.timings.items()},
        "trace_s": round(t.t_done - t.t_tracing, 4),
        "reconstruct_s": round(time.monotonic() - t.t_done, 4),
    }
    notes = ([t.interrupted.note()] if t.interrupted else []) + plan.notes + t.degraded + t.notes
    if t.counters.get("lost"):
        notes.append(f"{t.counters['lost']} events were lost (ring buffer full); the path may have gaps")
        if any(p.verdict.status == "lost" for p in packets):   # the trace's gap, or the network's?
            verdict = replace(verdict, problems=(
                *verdict.problems, f"the tracer lost {t.counters['lost']} events (ring buffer full): a `lost` "
                "verdict may be a gap in the trace rather than a loss in the network"))
    if t.counters.get("over_budget"):
        notes.append(f"{t.counters['over_budget']} events were not recorded to stay within the event budget "
                     f"({t.kernel_budget or cfg.budget}/s per node); raise it with --max-events or sample with --sample")
    if t.sample > cfg.sample:
        within = "the event budget"
        if not cfg.probe and cfg.watch_budget() < cfg.budget:
            within += (f" (a watch keeps {WATCH_BUDGET_SECONDS:g} s of it in all: {cfg.watch_budget()} events/s "
                       f"over {cfg.duration:g} s)")
        notes.append(f"sampling raised to 1 packet in {t.sample} to stay within {within}: the packets "
                     "counted are those every node kept")
    elif cfg.sample > 1:
        notes.append(f"sampling: 1 packet in {cfg.sample} is traced (the same packets on every node)")
    if agg is not None:
        notes.append(f"busy flow: {agg['packets']} packets counted by path; {agg['failing_judged']} of "
                     f"{agg['failing']} failing judged in full")
    result = FlowResult(cfg, plan.src, plan.dst, plan.proto, plan.port, probes, packets, verdict, summary,
                        t.counters, timings, t.df, notes=notes, names=named, interrupted=t.interrupted,
                        aggregate=agg)
    result.clock = t.clock
    result.meta = {
        **base_meta(plan, t, fi), "probes": [p.as_json() for p in probes],
        "evidence": ev.as_json(),
        "complete": t.interrupted is None, "interrupted": t.interrupted is not None,
        # what the live run concluded, so `analyze` and the notebooks say the same
        "flow_verdict": verdict.as_json(), "summary": summary,
    }
    if agg is not None:
        result.meta["aggregate"] = agg
    if t.interrupted:
        result.meta["interruption"] = t.interrupted.as_json()
    if cfg.save:
        from tracer import tracefile
        t.saving = True
        tracefile.save(cfg.save, t.df, result.meta)
    return result


def base_meta(plan: Plan, t: Traced, fi: FlowInput) -> dict:
    """What a saved flow records whatever its packets were judged to be."""
    cfg = plan.cfg
    out = {
        "version": SCHEMA_VERSION, "src": plan.src.as_json(), "dst": plan.dst.as_json(),
        "proto": plan.proto, "port": plan.port, "probes": [p.as_json() for p in t.sent],
        "placement": {str(k): list(v) for k, v in plan.placement.netns.items()},
        "addresses": {k: list(v) for k, v in fi.addresses.items()},
        "drop_reasons": {str(k): v for k, v in plan.drop_reasons.items()},
        "locations": {str(k): v for k, v in t.locations.items()},
        "ct_info_names": {str(k): v for k, v in plan.ct_names.items()},
        "service": ({"key": plan.dst.service.key, "backends": plan.dst.service.backends,
                     "backend_ips": plan.dst.service.backend_ips} if plan.dst.service else None),
        "probing": cfg.probe, "counters": t.counters, "inventory": plan.inv.source,
        "hooks": t.hooks, "degraded": t.degraded, "clock": t.clock,
        "created_ns": time.time_ns(),
        "sample": max(cfg.sample, t.sample),
    }
    if t.view is not None:
        out["view"] = t.view.as_json()
    if not cfg.probe and t.window is not None:
        out["window"] = t.window.as_json()
    return out


def judging_interrupted(plan: Plan, t: Traced) -> PodtraceError:
    """Ctrl-C (or SIGTERM) while the packets were being judged, after tracing ended: every
    node is already cleaned up, so what was collected is the events. With --save they are
    written (marked incomplete: no verdicts) for `analyze` or a notebook; the error says so."""
    from tracer import tracefile

    cfg = plan.cfg
    n = len(t.df)
    if not cfg.save:
        return Stopped(f"interrupted while judging the packets of {n} events; nothing was saved",
                       "run it again with --save FILE to keep the events of an interrupted run")
    meta = {**base_meta(plan, t, flow_input(plan, t.sent, t.locations, t.clock, t.view)),
            "complete": False, "interrupted": True,
            "interruption": {"after": "while judging the packets", "traced_s": round(t.t_done - t.t_tracing, 3)}}
    tracefile.save(cfg.save, t.df, meta)
    return Stopped(f"interrupted while judging the packets; the {n} events traced were saved to {cfg.save} "
                   "(marked incomplete)", f"podtrace analyze {cfg.save} judges them")


class Stopped(PodtraceError):
    """The run was interrupted after tracing: what was kept is said in one line."""

    exit_code = ExitStatus.INTERRUPTED

