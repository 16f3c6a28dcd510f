"""One `podtrace flow` run: plan, trace on every node involved, then judge the outcome."""

from __future__ import annotations

import importlib
import threading
import time
from typing import TYPE_CHECKING, Callable

from tracer.agents import coordinator
from tracer import settings, testhooks
from tracer.reconstruct import beyond, diagnose, window as windows
from tracer.kernel import record
from tracer.reconstruct.packets import assign_packets, build_packets
from tracer.node.prober import ProbeResult, send
from tracer.config import FlowConfig
from tracer.node import facts
from tracer.runs.outcome import (FlowResult, Traced, agent_evidence, finish, flow_input, judging_interrupted,
                                 keep_sampled, local_evidence, pod_hits, service_evidence, source_query, traced_view,
                                 watch_packets)
from tracer.reconstruct import source
from tracer.runs.plan import Plan, agent_plans, flow_pods, node_refs, prepare, tc_devices
from tracer.kernel.session import TerminateAsInterrupt
from tracer.runs.node import OVER_BUDGET, NodeJob, NodeRunner
from tracer.runs import interrupt

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd


def run_flow(cfg: FlowConfig, progress: Callable[[str], None] | None = None, early=None) -> FlowResult:
    """Trace one flow. On the lab the trace goes through one agent per node (the same
    coordinator and merge as in a cluster) unless cfg.mode is "single"; `early`: agent
    processes already started for it (`spawn.Early`)."""
    say = progress or (lambda msg: None)
    with TerminateAsInterrupt():   # SIGTERM cleans up like Ctrl-C, also while reconstructing/saving
        plan = prepare(cfg)
        if cfg.mode == "agents" and plan.topology:
            traced = _trace_agents(plan, say, transport=coordinator.LocalTransport(testhooks.agent_env(), early))
        elif plan.conn is not None:
            traced = _trace_agents(plan, say, transport=cluster_transport(cfg.transport, plan.conn))
        else:
            traced = _trace_single(plan, say)
        if traced.judging_stopped:
            raise judging_interrupted(plan, traced)
        say("judging the packets")
        try:
            return finish(plan, traced)
        except KeyboardInterrupt:
            # the first Ctrl-C after tracing ended: keep the events (a second one, or one
            # while saving, aborts at once)
            if traced.interrupted is not None or traced.saving:
                raise
            raise judging_interrupted(plan, traced) from None


def cluster_transport(name: str, conn):
    """How the coordinator reaches a cluster's agents: port-forward to their loopback server,
    or exec (the fallback: it needs pods/exec, a shell in the agent pods)."""
    if name == "exec":
        from tracer.agents.exectransport import KubeExecTransport

        return KubeExecTransport(conn)
    from tracer.agents.portforward import KubePortForwardTransport

    return KubePortForwardTransport(conn)


def probe_counter(count: int, outcomes: list) -> str:
    """The live counter while probing: `probes 2/3 sent, 2 answered` (and how the others ended)."""
    answered = sum(1 for o in outcomes if o == "answered")
    others = {o: sum(1 for x in outcomes if x == o) for o in dict.fromkeys(outcomes) if o != "answered"}
    return (f"probes {len(outcomes)}/{count} sent, {answered} answered"
            + "".join(f", {n} {o}" for o, n in others.items()))


def _import_frames_meanwhile(watch: bool = False) -> None:
    """pandas (0.3–0.4 s to import) is first needed once the trace is over: imported in a
    thread while the programs load and the agents start (probes: the trace is short), or once
    tracing (a watch: then nothing waits for this process, and the start does not share the
    CPU with it). A watch also needs the aggregate's engine (tracer.analysis, ~0.1 s)."""
    names = ["pandas", *(["tracer.analysis.busy"] if watch else [])]
    threading.Thread(target=lambda: [importlib.import_module(n) for n in names], name="podtrace-import-frames",
                     daemon=True).start()


def _trace_single(plan: Plan, say) -> Traced:
    """The same node runner an agent wraps, run in this process for every node at once."""
    cfg, topo, src, dst = plan.cfg, plan.topology, plan.src, plan.dst
    say("loading BPF programs")
    refs = node_refs(topo)
    # On the lab, only the lab's namespaces: other labs on this machine reuse the same addresses.
    ends = {p.key for p in flow_pods(src, dst, plan.inv)}
    pods = facts.named_netns(k for k, (_, p) in plan.placement.netns.items() if p in ends) if topo else {}
    budget = cfg.budget if cfg.probe else cfg.watch_budget()   # one kernel for every node: the watch's own
    runner = NodeRunner(NodeJob(addrs=plan.addrs, tc=cfg.tc, tc_devices=tc_devices(topo, src, dst), nodes=refs,
                                tc_observers=settings.tc_observers(),
                                pods=pods,
                                netns=sorted(plan.placement.netns) if topo else None,
                                sample=cfg.sample, budget=budget))
    sent: list[ProbeResult] = []
    problems: list[str] = []
    stopped: interrupt.Interrupted | None = None
    if cfg.probe:
        _import_frames_meanwhile()
    with TerminateAsInterrupt(), runner:
        if not cfg.probe:
            _import_frames_meanwhile(watch=True)
        t_tracing = time.monotonic()
        ready_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the events' clock
        try:   # Ctrl-C while probing or watching: stop, and show what was traced so far
            if cfg.probe:
                say(f"tracing: sending {cfg.count} {plan.proto} probe(s) {src.ip} → {dst.ip}"
                    + (f":{plan.port}" if plan.port else ""))
                try:
                    send(src.pod.netns, src.ip, dst.ip, plan.proto, plan.port, cfg.count,
                         cfg.timeout, cfg.interval,
                         on_result=lambda r: (sent.append(r), runner.poll(0),
                                              say(probe_counter(cfg.count, [x.outcome for x in sent]))),
                         size=cfg.size, sport=cfg.sport)
                except Exception as exc:   # as from an agent: the trace so far is still the answer
                    problems.append(f"probes from {src.pod.node} failed: {type(exc).__name__}: {exc}")
                time.sleep(cfg.settle)
            else:
                end = time.monotonic() + cfg.duration
                while (left := end - time.monotonic()) > 0:
                    n = runner.poll(int(min(left, 0.1) * 1000))
                    runner.watch_gaps()
                    said = runner.guard(time.monotonic())
                    if said:
                        say(said)
                    say(f"tracing: {runner.sink.count()} events, {left:.1f}s left")
        except KeyboardInterrupt:
            stopped = interrupt.Interrupted.of(cfg, len(sent), time.monotonic() - t_tracing)
            say(f"interrupted: {stopped.after}; collecting what was traced")
        stop_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        runner.drain()
        gaps = list(runner.watch_gaps())
        runner.after_window_meanwhile()   # the rule counters, then the tc observers' removal
        counters = runner.counters()
        sample = runner.session.config.sample
        df = keep_sampled(runner.session.frame(sample), sample)
        locations = runner.symbols(df.loc[df["location"] != 0, "location"].unique())
        counters_after = runner.iptables_after()
    sq = source_query(plan)
    evidence = local_evidence(topo, dst, refs, runner.iptables_before, counters_after,
                              pod_hits(plan, runner.pod_rule_hits()),
                              (src.pod.node, src.pod.netns, sq) if sq and src.pod.netns else None)
    return Traced(df, sent, counters, locations, runner.hook_names, runner.degraded,
                   dict(runner.timings), t_tracing, time.monotonic(), lambda packets: evidence,
                   view=traced_view(plan, refs), interrupted=stopped, problems=problems,
                   # every node traced from ready to drain: a packet still on its way then is
                   # a partial view, as with agents, not a loss
                   window=windows.from_observers({n: (ready_ns, stop_ns) for n in refs}, {},
                                                 {n: gaps for n in refs} if gaps else None),
                   sample=sample, kernel_budget=budget)


def _trace_agents(plan: Plan, say, transport=None, plans=None) -> Traced:
    cfg, src = plan.cfg, plan.src
    plans = plans if plans is not None else agent_plans(plan)
    say(f"starting {len(plans)} agent(s): {', '.join(p.node for p in plans)}")
    sent: list[ProbeResult] = []
    problems: list[str] = []
    notes: list[str] = []
    transport = transport or coordinator.LocalTransport(testhooks.agent_env())
    merge_budget = 0 if cfg.probe else cfg.watch_budget()
    with TerminateAsInterrupt(), coordinator.Coordinator(plans, transport, budget=merge_budget) as co:
        if cfg.probe:
            _import_frames_meanwhile()
        co.wait_ready()
        if not cfg.probe:
            _import_frames_meanwhile(watch=True)
        _placement_from_agents(plan, co)
        testhooks.pause("tracing")
        t_tracing = time.monotonic()
        prober = next((r for r in co.runs if r.plan.wire.get("probe")), None)
        probing = cfg.probe and prober is not None
        stopped: interrupt.Interrupted | None = None
        try:   # Ctrl-C while probing or watching: stop, and show what was traced so far
            if probing:
                say(f"tracing: sending {cfg.count} {plan.proto} probe(s) {src.ip} → {plan.dst.ip}")
                co.run(prober.plan.node, {"cmd": "probe", "progress": True})
                shown = [0]

                def probed():
                    if len(prober.progress) != shown[0]:
                        shown[0] = len(prober.progress)
                        say(probe_counter(cfg.count, [p.get("outcome") for p in prober.progress]))
                    return prober.probes is not None or prober.failure
                co.wait_for(probed, cfg.count * (cfg.timeout + cfg.interval) + cfg.settle + 10)
            else:
                end = time.monotonic() + cfg.duration
                while (left := end - time.monotonic()) > 0:
                    co.pump(min(left, 0.2))
                    say(f"tracing: {sum(r.events() for r in co.runs)} events, {left:.1f}s left")
        except KeyboardInterrupt:
            if probing:   # the prober stops after the probe in flight and reports those sent
                co.run(prober.plan.node, {"cmd": "stop-probes"})
                co.wait_for(lambda: prober.probes is not None or prober.failure, cfg.timeout + cfg.settle + 5)
            stopped = interrupt.Interrupted.of(cfg, len(prober.probes) if probing and isinstance(
                prober.probes, list) else 0, time.monotonic() - t_tracing)
            say(f"interrupted: {stopped.after}; collecting what the agents traced")
        if probing and isinstance(prober.probes, list):
            sent = [ProbeResult(**p) for p in prober.probes]
        elif probing and isinstance(prober.probes, dict):
            problems.append(f"probes from {prober.plan.node} failed: {prober.probes.get('error')}")
        # The trace window ends here on every node: the packets are built once, from what the
        # agents delivered up to their `drained` frame, and name the facts to ask for.
        say("collecting the agents' events")
        co.drain()
        df, clock = _merge(co, plan, packets=probing)
        say(f"reconstructing {len(df)} events")
        # the guard of each node, and the merge's, may have raised the sampling: keep the
        # packets every node kept (sampling by powers of two nests), as the merge did
        sample = max(cfg.sample, co.sampling())
        df = keep_sampled(df, sample)
        # when every agent was tracing, on the reference clock: what is seen outside is partial,
        # as is what is seen while a node's kernel refused events
        window = windows.from_observers(coordinator.spans(co.runs),
                                        {n: o.get("offset_ns", 0) for n, o in clock["offsets"].items()},
                                        coordinator.gaps(co.runs))
        locations: dict[int, str | None] = {}
        for r in co.runs:
            for k, v in ((r.drained or {}).get("locations") or {}).items():
                locations[int(k)] = v
            if r.hello and "drain" not in r.hello.commands and not r.failure:
                notes.append(f"{r.plan.node}'s agent is older than this podtrace: its drop locations are "
                             "not named and its last events may be missing; update the agent image")
        view = traced_view(plan, [r.plan.node for r in co.runs],
                           {r.plan.node: beyond.agent_failed(r.failure) for r in co.runs if r.failure})
        aggregate = None
        packets = []
        judging_stopped = False
        try:
            testhooks.pause("reconstructing")
            fi = flow_input(plan, sent, locations, clock, view)
            if probing:
                packets = build_packets(df, fi)
            else:
                packets, aggregate = watch_packets(plan, df.drop(columns=["pkt"], errors="ignore"), fi, locations,
                                                   window, view, sample)
            queries = diagnose.facts_needed(packets, service_evidence(plan))
            sq = source_query(plan)
            if sq and prober is not None and source.needed(packets, sent, sq["pod"]):
                # the source pod's own view, answered by the agent that probed from it
                queries.setdefault(prober.plan.node, []).append(sq)
            say("reading the nodes' counters and facts")
            for r in co.runs:
                if not r.failure:
                    r.facts = None
                    co.run(r.plan.node, {"cmd": "facts", "queries": queries.get(r.plan.node, [])})
            co.wait_for(lambda: all(r.facts is not None or r.failure for r in co.runs), 20)
        except KeyboardInterrupt:
            if stopped is not None:    # the second Ctrl-C: abort at once
                raise
            judging_stopped = True
        say("stopping the agents")
    t_done = time.monotonic()
    for r in co.runs:
        if r.failure:
            problems.append(f"{r.plan.node}'s view is missing: {r.failure}")
        notes += last_raise_only(r.logs)
    counters: dict[str, int] = {}
    hooks: list[str] = []
    degraded: list[str] = []
    timings: dict = {}
    for r in co.runs:
        for k, v in (r.counters or {}).items():
            counters[k] = counters.get(k, 0) + v
        if r.hello:
            hooks += [h for h in r.hello.hooks if h not in hooks]   # a node's tc hooks: where it put observers
            degraded = degraded or r.hello.degraded
            timings.setdefault("agent_start_s", {})[r.plan.node] = round(r.hello.timings.get("start_s", 0), 4)
            timings.setdefault("agent_phases_s", {})[r.plan.node] = {
                k: round(v, 4) for k, v in r.hello.timings.items() if k != "start_s"}
    facts = {r.plan.node: r.facts for r in co.runs if r.facts}

    def evidence(packets):
        return agent_evidence(plan, facts)
    return Traced(df.drop(columns=["pkt"], errors="ignore"), sent, counters, locations, hooks, degraded, timings, t_tracing,
                  t_done, evidence, notes, problems, clock, packets=packets, window=window, view=view,
                  interrupted=stopped, aggregate=aggregate, sample=sample, judging_stopped=judging_stopped)


def last_raise_only(logs: list[str]) -> list[str]:
    """An agent's log lines with its sampling raises said once: the last one, which names the
    sampling the node ended at (a busy node raises it several times in a few seconds)."""
    raises = [i for i, m in enumerate(logs) if OVER_BUDGET in m]
    return [m for i, m in enumerate(logs) if OVER_BUDGET not in m or i == raises[-1]]


def _placement_from_agents(plan: Plan, co: coordinator.Coordinator) -> None:
    """On a real node the agent reports its namespaces and their addresses; name them."""
    for r in co.runs:
        for ino, info in (r.hello.namespaces if r.hello else {}).items():
            ino = int(ino)
            if ino in plan.placement.netns:
                continue
            if info.get("host"):
                plan.placement.netns[ino] = (r.plan.node, None)
                continue
            pod = next((plan.inv.by_ip().get(ip) for ip in info.get("ips", []) if ip in plan.inv.by_ip()), None)
            if pod and pod[0] == "pod":
                plan.placement.netns[ino] = (r.plan.node, pod[1])


def _merge(co: coordinator.Coordinator, plan: Plan, packets: bool = True) -> tuple[pd.DataFrame, dict]:
    """All agents' events in one table, timestamps on the reference agent's clock, with their
    packet numbers (`pkt`, assigned once) when `packets` are wanted or the clocks are refined
    from them (a watch judges its packets itself; agents on one clock need no refinement).

    Nodes' monotonic clocks differ by their uptimes (seconds to days): each agent's events are
    first moved by the difference of its (monotonic − realtime) readings to the reference's
    (realtime is NTP-synchronised to within milliseconds), so one packet's hops on two nodes
    fall into one packet; the offsets are then refined from the packets themselves. What is
    left after the refinement is far below the pause that starts a new packet
    (packets.GAP_NS), so the cut made on the coarse clocks is the cut the refined clocks give."""
    cols, origin = co.merged()
    df = record.to_frame(cols)
    df["agent"] = origin
    df["ts_ns"] = df["ts_ns"].astype("int64")   # offsets may be negative
    names = [r.plan.node for r in co.runs]
    ref = next((i for i, r in enumerate(co.runs) if r.plan.wire.get("probe")), 0)
    domains = {i: r.hello.clock_domain if r.hello else None for i, r in enumerate(co.runs)}
    coarse = coordinator.realtime_offsets([r.clocks for r in co.runs], ref, domains)
    for i, c in coarse.items():
        df.loc[df["agent"] == i, "ts_ns"] -= c
    own = domains.get(ref)
    if packets or any(i != ref and (d is None or d != own) for i, d in domains.items()):
        df = assign_packets(df)
        fine = coordinator.estimate_offsets(df, ref, plan.src.ip, domains)
    else:
        fine = {}
    # Agents sharing a clock domain with an estimated agent get its offset too.
    for i, d in domains.items():
        if i not in fine and i != ref and d is not None and d != domains.get(ref):
            twin = next((j for j in fine if domains.get(j) == d), None)
            if twin is not None:
                fine[i] = dict(fine[twin], shared_with=names[twin])
    offsets: dict[int, dict] = {}
    for i in sorted(set(coarse) | set(fine)):
        f = fine.get(i)
        if f is not None:
            df.loc[df["agent"] == i, "ts_ns"] -= f["offset_ns"]
        entry = dict(f or {"method": "realtime"})
        entry["offset_ns"] = coarse.get(i, 0) + (f["offset_ns"] if f else 0)
        if i in coarse:
            entry["realtime_ns"] = coarse[i]
        offsets[i] = entry
    clock = {"reference": names[ref] if names else None,
             "offsets": {names[i]: o for i, o in offsets.items()},
             "same_clock": [names[i] for i, d in domains.items() if i != ref and d == domains.get(ref)]}
    # the events are on the reference agent's clock: its realtime − monotonic dates them
    reading = next((c for c in (co.runs[ref].clocks if co.runs else ())
                    if "monotonic_ns" in c and "realtime_ns" in c), None)
    if reading is not None:
        clock["realtime_offset_ns"] = int(reading["realtime_ns"]) - int(reading["monotonic_ns"])
    return df, clock

