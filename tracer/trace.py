"""One `podtrace flow` run: resolve the ends, load the tracer, send the probes, collect the
events, reconstruct and judge. Everything the CLI's `flow` does lives here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

import socket

from . import agent as agent_mod
from . import bpfprog, coordinator, diagnose, events, flows, k8s, netns, nodecheck, probe, probes, tcattach, testhooks, tracefs
from .config import FlowConfig
from .errors import BadInput, EnvironmentProblem, require_capabilities
from .session import SessionConfig, TerminateAsInterrupt, TraceSession

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


def load_inventory(cfg: FlowConfig) -> tuple[k8s.Inventory, dict | None]:
    """--cluster FILE, else the kubeconfig / in-cluster config, else the lab's inventory when
    the lab is up (the contract's order). Lab namespaces are added to a cluster file's pods
    when they describe the same pods. A cluster connection is kept on cfg._conn."""
    from .lab import build as labbuild

    lab = labbuild.status(cfg.lab_prefix)
    cfg._conn = None
    if cfg.cluster:
        inv = k8s.load_list(cfg.cluster)
        if lab:
            labinv = k8s.from_lab(lab)
            for key, pod in inv.pods.items():
                lp = labinv.pods.get(key)
                if lp and lp.ip == pod.ip:
                    pod.netns, pod.host_veth = lp.netns, lp.host_veth
        return inv, lab
    from . import kube

    ref = kube.find_config(cfg.kubeconfig, cfg.context)
    if ref is not None:
        conn = kube.connect(cfg.kubeconfig, cfg.context, ref=ref)
        inv, _streams = kube.inventory_for(conn, [s for s in (cfg.src, cfg.dst) if s])
        cfg._conn = conn
        return inv, None
    if lab:
        return k8s.from_lab(lab), lab
    raise EnvironmentProblem(
        "no cluster metadata: no --cluster FILE and no lab is up",
        "pass --cluster FILE (kubectl get nodes,pods,services,endpointslices -A -o json) or run `podtrace lab up`")


def placement_from_lab(lab: dict | None) -> flows.Placement:
    pl = flows.Placement()
    if not lab:
        return pl
    fabric = lab.get("fabric_netns")
    if fabric and netns.exists(fabric):
        pl.netns[netns.inode(fabric)] = (None, None)
    for n in lab.get("nodes", []):
        if netns.exists(n["netns"]):
            pl.netns[netns.inode(n["netns"])] = (n["name"], None)
    for p in lab.get("pods", []):
        if netns.exists(p["netns"]):
            pl.netns[netns.inode(p["netns"])] = (p["node"], f"{p['namespace']}/{p['name']}")
    return pl


def node_refs(lab: dict | None) -> dict[str, nodecheck.NodeRef]:
    """The nodes whose configuration this process can read: every lab node, or this host."""
    if lab:
        return {n["name"]: nodecheck.NodeRef(n["name"], n["netns"]) for n in lab.get("nodes", [])
                if netns.exists(n["netns"])}
    host = socket.gethostname()
    return {host: nodecheck.NodeRef(host, None)}


def _evidence(lab, dst: k8s.Endpoint, refs, before, after) -> diagnose.Evidence:
    cache: dict[str, dict] = {}

    def facts(node: str, packet: dict) -> dict | None:
        ref = refs.get(node)
        if ref is None:
            return None
        q = _fact_query(node, packet)
        key = json.dumps(q, sort_keys=True) + node
        if key not in cache:
            cache[key] = nodecheck.facts(ref, src=q["src"], dst=q["dst"], iif=q["iif"], devs=q["devs"])
        return cache[key]

    hits = {n: nodecheck.rule_hits(before[n], after[n]) for n in after if n in before}
    svc = dst.service
    return diagnose.Evidence(facts=facts, rule_hits=hits, vip=svc.cluster_ip if svc else None,
                             service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=_vtep(lab))


def tc_devices(lab: dict | None, src: k8s.Endpoint, dst: k8s.Endpoint) -> list[tuple[str | None, str]]:
    """The hop devices on the path, per node: pod host veths, the bridge, the overlay and the
    uplink of every node a packet of this flow can cross (lab only for now)."""
    if not lab:
        return []
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.get("pods", [])}
    keys = [e.pod.key for e in (src, dst) if e.pod]
    if dst.service:
        keys += dst.service.backends
    involved = [pods[k] for k in keys if k in pods]
    out: list[tuple[str | None, str]] = []
    for n in lab.get("nodes", []):
        mine = [p for p in involved if p["node"] == n["name"]]
        if not mine:
            continue
        for p in mine:
            out.append((n["netns"], p["host_veth"]))
        for key in ("bridge", "overlay", "uplink"):
            if n.get(key):
                out.append((n["netns"], n[key]))
    return list(dict.fromkeys(out))


def _choose_proto(cfg: FlowConfig, dst: k8s.Endpoint) -> tuple[str, int | None, list[str]]:
    notes = []
    proto, port = cfg.proto, cfg.port
    if proto is None:
        if dst.service and dst.service.ports:
            first = dst.service.ports[0]
            proto, port = first["protocol"].lower(), port or int(first["port"])
            notes.append(f"{dst.service.key} is a Service: probing {proto}/{port} "
                         "(ClusterIPs do not answer ICMP)")
        else:
            proto = "icmp"
    if proto not in ("icmp", "tcp", "udp"):
        raise BadInput(f"unknown protocol {proto!r}", "use --proto icmp, tcp or udp")
    if proto == "icmp":
        if port is not None:
            raise BadInput("--port makes no sense with ICMP", "drop --port or use --proto tcp|udp")
    elif port is None:
        raise BadInput(f"--proto {proto} needs --port", f"e.g. --proto {proto} --port 8080")
    elif not 1 <= port <= 65535:
        raise BadInput(f"port {port} is out of range", "use a port between 1 and 65535")
    return proto, port, notes


@dataclass
class _Plan:
    """What a run needs before tracing starts: the ends, the probe, the metadata."""

    cfg: FlowConfig
    inv: k8s.Inventory
    lab: dict | None
    src: k8s.Endpoint
    dst: k8s.Endpoint
    proto: str
    port: int | None
    notes: list[str]
    placement: flows.Placement
    drop_reasons: dict[int, str]
    ct_names: dict[int, str]
    addrs: list[str]
    t_start: float
    t_resolved: float = 0.0


@dataclass
class _Traced:
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


def _prepare(cfg: FlowConfig) -> _Plan:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                                 "run it again with sudo")
    if cfg.save and not Path(cfg.save).parent.is_dir():   # before tracing, not after it
        raise BadInput(f"cannot write {cfg.save}: directory {Path(cfg.save).parent} does not exist",
                       "create it or choose another path")
    if cfg.count < 1 or cfg.count > 1000:
        raise BadInput(f"--count {cfg.count} is out of range", "use 1..1000")
    if cfg.size is not None and not 28 + len(probe.PAYLOAD) <= cfg.size <= 65000:
        raise BadInput(f"--size {cfg.size} is out of range", f"use {28 + len(probe.PAYLOAD)}..65000 bytes")
    if not cfg.probe and cfg.duration <= 0:
        raise BadInput("--duration must be positive", "e.g. --no-probe --duration 5")
    inv, lab = load_inventory(cfg)
    if getattr(cfg, "_conn", None) is None:   # tracing here (in a cluster, the agents trace)
        require_capabilities("tracing")
    src = k8s.resolve(cfg.src, inv)
    dst = k8s.resolve(cfg.dst, inv)
    proto, port, notes = _choose_proto(cfg, dst)
    if cfg.probe and proto == "icmp" and getattr(cfg, "_conn", None) is None:
        require_capabilities("ICMP probes (a raw socket)", ("CAP_NET_RAW",))
    if dst.service and not dst.service.backend_ips:
        notes.append(f"{dst.service.key} has no ready endpoints: nothing can answer on its ClusterIP")
    if cfg.sport is not None and proto == "icmp":
        raise BadInput("--sport applies to TCP and UDP probes", "use --proto tcp|udp with --sport")
    if cfg.size is not None and proto == "tcp":
        raise BadInput("--size applies to ICMP and UDP probes (a TCP probe is a bare SYN)",
                       "use --proto icmp or udp with --size")
    if cfg.probe:
        if src.pod is None:
            raise BadInput(f"probes are sent from a pod; {cfg.src} is not a pod",
                           "give a pod as SRC, or watch real traffic with --no-probe")
        in_cluster = getattr(cfg, "_conn", None) is not None   # the agent finds it on its node
        if not in_cluster and (not src.pod.netns or not netns.exists(src.pod.netns)):
            raise EnvironmentProblem(
                f"the network namespace of {src.pod.key} is not on this machine",
                "run podtrace against the lab, or on a cluster with the agent DaemonSet (manifests/)")
    return _Plan(cfg, inv, lab, src, dst, proto, port, notes, placement_from_lab(lab),
                 tracefs.drop_reasons(), bpfprog.ct_info_names(),
                 sorted(set(src.addresses() + dst.addresses())), t_start, time.monotonic())


def run_flow(cfg: FlowConfig, progress: Callable[[str], None] | None = None) -> FlowResult:
    """Trace one flow. On the lab the trace goes through one agent per node (the same
    coordinator and merge as in a cluster) unless cfg.mode is "single"."""
    say = progress or (lambda msg: None)
    with TerminateAsInterrupt():   # SIGTERM cleans up like Ctrl-C, also while reconstructing/saving
        plan = _prepare(cfg)
        if cfg.mode == "agents" and plan.lab:
            traced = _trace_agents(plan, say)
        elif getattr(cfg, "_conn", None) is not None:
            from .kubeexec import KubeExecTransport

            traced = _trace_agents(plan, say, transport=KubeExecTransport(cfg._conn), plans=_cluster_plans(plan))
        else:
            traced = _trace_single(plan, say)
        return _finish(plan, traced)


def _trace_single(plan: _Plan, say) -> _Traced:
    cfg, lab, src, dst = plan.cfg, plan.lab, plan.src, plan.dst
    say("loading BPF programs")
    hooks, degraded = probes.select(probes.detect(), tc=cfg.tc)
    # On the lab, only the lab's namespaces: other labs on this machine reuse the same addresses.
    session = TraceSession(SessionConfig(addrs=plan.addrs, hooks=hooks, sample=cfg.sample, budget=cfg.budget,
                                         netns=sorted(plan.placement.netns) if lab else None))
    tc = None
    sent: list[probe.ProbeResult] = []
    with TerminateAsInterrupt():
        try:
            session.start()
            if any(h.kind == "tc" for h in hooks):
                tcattach.cleanup(scan=False)   # what a killed run recorded
                tc = tcattach.TcAttacher(session.loaded.bpf)
                for ns_name, dev in tc_devices(lab, src, dst):
                    tc.attach(ns_name, dev)
            refs = node_refs(lab)
            counters_before = {n: nodecheck.iptables_counters(r) for n, r in refs.items()}
            t_tracing = time.monotonic()
            if cfg.probe:
                say(f"tracing: sending {cfg.count} {plan.proto} probe(s) {src.ip} → {dst.ip}"
                    + (f":{plan.port}" if plan.port else ""))
                sent = probe.send(src.pod.netns, src.ip, dst.ip, plan.proto, plan.port, cfg.count,
                                  cfg.timeout, cfg.interval,
                                  on_result=lambda r: (session.poll(0), say(f"probe {r.seq}: {r.outcome}")),
                                  size=cfg.size, sport=cfg.sport)
                time.sleep(cfg.settle)
            else:
                end = time.monotonic() + cfg.duration
                while (left := end - time.monotonic()) > 0:
                    n = session.poll(int(min(left, 0.2) * 1000))
                    say(f"tracing: {n} events, {left:.1f}s left")
            session.drain()
            counters_after = {n: nodecheck.iptables_counters(r) for n, r in refs.items()}
            counters = session.counters()
            df = session.frame()
            ksyms = session.symbolizer()
            locations = {int(a): ksyms(int(a)) for a in df.loc[df["location"] != 0, "location"].unique()}
        finally:
            if tc is not None:
                tc.close()
            session.close()
    evidence = _evidence(lab, dst, refs, counters_before, counters_after)
    return _Traced(df, sent, counters, locations, [h.name for h in hooks], degraded,
                   dict(session.timings), t_tracing, time.monotonic(), lambda packets: evidence)


def _agent_plans(plan: _Plan) -> list[coordinator.AgentPlan]:
    """One agent per lab node a packet of this flow can cross, plus the fabric (the lab's
    underlay switch, which in a real cluster is the physical network nobody traces)."""
    lab, src, dst, cfg = plan.lab, plan.src, plan.dst, plan.cfg
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.get("pods", [])}
    keys = [e.pod.key for e in (src, dst) if e.pod] + (dst.service.backends if dst.service else [])
    nodes = list(dict.fromkeys(pods[k]["node"] for k in keys if k in pods))
    if src.node and not src.pod:
        nodes.insert(0, src.node.name)
    if dst.node and not dst.pod and dst.node.name not in nodes:
        nodes.append(dst.node.name)
    devices = tc_devices(lab, src, dst) if cfg.tc else []
    out = []
    for n in lab.get("nodes", []):
        if n["name"] not in nodes:
            continue
        inodes = [netns.inode(n["netns"])] + [netns.inode(p["netns"]) for p in lab.get("pods", [])
                                               if p["node"] == n["name"] and netns.exists(p["netns"])]
        req = {"version": agent_mod.REQUEST_VERSION, "node": n["name"], "node_netns": n["netns"],
               "netns_filter": inodes, "addrs": plan.addrs,
               "tc_devices": [list(d) for d in devices if d[0] == n["netns"]],
               "sample": cfg.sample, "budget": cfg.budget,
               "max_seconds": (cfg.duration if not cfg.probe else cfg.count * (cfg.timeout + cfg.interval)) + 60}
        if cfg.probe and src.pod and src.pod.node == n["name"]:
            req["probe"] = {"netns": src.pod.netns, "src": src.ip, "dst": plan.dst.ip, "proto": plan.proto,
                            "port": plan.port, "count": cfg.count, "timeout": cfg.timeout,
                            "interval": cfg.interval, "size": cfg.size, "sport": cfg.sport,
                            "settle": cfg.settle}
        out.append(coordinator.AgentPlan(n["name"], req))
    fabric = lab.get("fabric_netns")
    if fabric and netns.exists(fabric) and len(out) > 1:
        out.append(coordinator.AgentPlan("fabric", {
            "version": agent_mod.REQUEST_VERSION, "node": "fabric", "node_netns": fabric,
            "netns_filter": [netns.inode(fabric)], "addrs": plan.addrs, "tc_devices": [],
            "sample": cfg.sample, "budget": cfg.budget,
            "max_seconds": out[0].request["max_seconds"]}))
    return out


def _cluster_plans(plan: _Plan) -> list[coordinator.AgentPlan]:
    """A real cluster: the agent of each node the flow's pods are on discovers the pods'
    namespaces and hop devices itself (by address); its view is its whole kernel."""
    src, dst, cfg = plan.src, plan.dst, plan.cfg
    pods = [e.pod for e in (src, dst) if e.pod]
    if dst.service:
        pods += [plan.inv.pods[k] for k in dst.service.backends if k in plan.inv.pods]
    nodes = list(dict.fromkeys(p.node for p in pods if p.node))
    pod_ips = sorted({p.ip for p in pods if p.ip})
    node_ips = sorted({n.ip for n in plan.inv.nodes.values() if n.ip})
    out = []
    for node in nodes:
        req = {"version": agent_mod.REQUEST_VERSION, "node": node, "node_netns": None, "netns_filter": None,
               "addrs": plan.addrs, "tc_devices": "auto" if cfg.tc else [],
               "discover": {"pod_ips": pod_ips, "node_ips": node_ips}, "sample": cfg.sample, "budget": cfg.budget,
               "max_seconds": (cfg.duration if not cfg.probe else cfg.count * (cfg.timeout + cfg.interval)) + 60}
        if cfg.probe and src.pod and src.pod.node == node:
            req["probe"] = {"netns": None, "src": src.ip, "dst": dst.ip, "proto": plan.proto, "port": plan.port,
                            "count": cfg.count, "timeout": cfg.timeout, "interval": cfg.interval,
                            "size": cfg.size, "sport": cfg.sport, "settle": cfg.settle}
        out.append(coordinator.AgentPlan(node, req))
    if cfg.probe and not any("probe" in p.request for p in out):
        raise BadInput(f"{cfg.src} has no node in the cluster metadata", "pick a running pod as SRC")
    return out


def _trace_agents(plan: _Plan, say, transport=None, plans=None) -> _Traced:
    cfg, src = plan.cfg, plan.src
    plans = plans if plans is not None else _agent_plans(plan)
    skews: dict[str, dict[str, str]] = {}
    for item in filter(None, os.environ.get("PODTRACE_TEST_AGENT_SKEW", "").split(",")):
        node, ns_ = item.split("=")   # tests only: pretend a node's clock is off
        skews.setdefault(node, {})["PODTRACE_AGENT_CLOCK_SKEW_NS"] = ns_
    for node in filter(None, os.environ.get("PODTRACE_TEST_AGENT_DIE", "").split(",")):
        skews.setdefault(node, {})["PODTRACE_AGENT_DIE_AFTER_READY"] = "1"   # tests only
    say(f"starting {len(plans)} agent(s): {', '.join(p.node for p in plans)}")
    sent: list[probe.ProbeResult] = []
    problems: list[str] = []
    notes: list[str] = []
    transport = transport or coordinator.LocalTransport(skews)
    with TerminateAsInterrupt(), coordinator.Coordinator(plans, transport) as co:
        co.wait_ready()
        _placement_from_agents(plan, co)
        t_tracing = time.monotonic()
        prober = next((r for r in co.runs if r.plan.request.get("probe")), None)
        if cfg.probe and prober is not None:
            say(f"tracing: sending {cfg.count} {plan.proto} probe(s) {src.ip} → {plan.dst.ip}")
            co.run(prober.plan.node, {"cmd": "probe"})
            co.wait_for(lambda: prober.probes is not None or prober.failure,
                        cfg.count * (cfg.timeout + cfg.interval) + cfg.settle + 10)
            if isinstance(prober.probes, list):
                sent = [probe.ProbeResult(**p) for p in prober.probes]
            elif isinstance(prober.probes, dict):
                problems.append(f"probes from {prober.plan.node} failed: {prober.probes.get('error')}")
        else:
            end = time.monotonic() + cfg.duration
            while (left := end - time.monotonic()) > 0:
                co.pump(min(left, 0.2))
                say(f"tracing: {sum(len(c) for r in co.runs for c in r.chunks)} events, {left:.1f}s left")
        co.pump(agent_mod.FLUSH_S * 3)      # the agents' last flush
        df, clock = _merge(co, plan)
        fi = _flow_input(plan, sent, {}, clock)
        # Which node facts the diagnosis will need: a dry run records the questions.
        queries: dict[str, list[dict]] = {}
        dry = coordinator.deep(flows.build_packets(df, fi))
        for p in dry:
            diagnose.explain(p, _recording_evidence(plan, queries))
        for r in co.runs:
            if not r.failure:
                r.facts = None
                co.run(r.plan.node, {"cmd": "facts", "queries": queries.get(r.plan.node, [])})
        co.wait_for(lambda: all(r.facts is not None or r.failure for r in co.runs), 20)
        df, clock = _merge(co, plan)   # events flushed with the facts
    t_done = time.monotonic()
    for r in co.runs:
        if r.failure:
            problems.append(f"{r.plan.node}'s view is missing: {r.failure}")
        notes += r.logs
    counters: dict[str, int] = {}
    locations: dict[int, str | None] = {}
    hooks: list[str] = []
    degraded: list[str] = []
    timings: dict = {}
    for r in co.runs:
        for k, v in (r.counters or {}).items():
            counters[k] = counters.get(k, 0) + v
        for k, v in ((r.facts or {}).get("locations") or {}).items():
            locations[int(k)] = v
        if r.hello:
            hooks = hooks or r.hello.get("hooks", [])
            degraded = degraded or r.hello.get("degraded", [])
            timings.setdefault("agent_start_s", {})[r.plan.node] = round(r.hello.get("timings", {}).get("start_s", 0), 4)
    facts = {r.plan.node: r.facts for r in co.runs if r.facts}

    def evidence(packets):
        return _agent_evidence(plan, facts)
    return _Traced(df, sent, counters, locations, hooks, degraded, timings, t_tracing, t_done, evidence,
                   notes, problems, clock)


def _placement_from_agents(plan: _Plan, co: coordinator.Coordinator) -> None:
    """On a real node the agent reports its namespaces and their addresses; name them."""
    for r in co.runs:
        for ino, info in ((r.hello or {}).get("namespaces") or {}).items():
            ino = int(ino)
            if ino in plan.placement.netns:
                continue
            if info.get("host"):
                plan.placement.netns[ino] = (r.plan.node, None)
                continue
            pod = next((plan.inv.by_ip().get(ip) for ip in info.get("ips", []) if ip in plan.inv.by_ip()), None)
            if pod and pod[0] == "pod":
                plan.placement.netns[ino] = (r.plan.node, pod[1])


def _merge(co: coordinator.Coordinator, plan: _Plan) -> tuple[pd.DataFrame, dict]:
    """All agents' events in one table, timestamps corrected by the estimated offsets."""
    arr, origin = co.merged()
    df = events.to_frame(arr)
    df["agent"] = origin
    df["ts_ns"] = df["ts_ns"].astype("int64")   # offsets may be negative
    df = flows.assign_packets(df)
    names = [r.plan.node for r in co.runs]
    ref = next((i for i, r in enumerate(co.runs) if r.plan.request.get("probe")), 0)
    src_ip = plan.src.ip

    def direction(g):
        if (g["saddr_str"] == src_ip).any():
            return "request"
        if (g["daddr_str"] == src_ip).any():
            return "reply"
        return None
    domains = {i: (r.hello or {}).get("clock_domain") for i, r in enumerate(co.runs)}
    offsets = coordinator.estimate_offsets(df, ref, direction, domains)
    # Agents sharing a clock domain with an estimated agent get its offset too.
    for i, d in domains.items():
        if i not in offsets and i != ref and d is not None and d != domains.get(ref):
            twin = next((j for j in offsets if domains.get(j) == d), None)
            if twin is not None:
                offsets[i] = dict(offsets[twin], shared_with=names[twin])
    for i, o in offsets.items():
        df.loc[df["agent"] == i, "ts_ns"] -= o["offset_ns"]
    clock = {"reference": names[ref] if names else None,
             "offsets": {names[i]: o for i, o in offsets.items()},
             "same_clock": [names[i] for i, d in domains.items() if i != ref and d == domains.get(ref)]}
    return df.drop(columns=["pkt"]), clock


def _flow_input(plan: _Plan, sent, locations, clock: dict | None = None) -> flows.FlowInput:
    return flows.FlowInput(plan.src, plan.dst, plan.proto, plan.port, sent, plan.placement,
                           plan.drop_reasons, lambda a: locations.get(a), plan.ct_names,
                           contiguous_agents=bool((clock or {}).get("offsets")), sample=plan.cfg.sample)


def _fact_query(node: str, packet: dict) -> dict:
    """The question nodecheck.facts() answers for a packet on a node: its addresses at the
    node's last hop, and the device it came in by (the node's last rx hop), so the route is
    looked up as the kernel did for this packet, not as for the node's own traffic."""
    last = [h for h in packet["hops"] if h["node"] == node] or packet["hops"]
    rx = [h for h in last if h["point"] == "rx" and h["pod"] is None]
    iif = rx[-1]["dev"] if rx else None
    devs = list(dict.fromkeys(h["dev"] for h in packet["hops"] if h["node"] == node and h["pod"] is None))
    return {"src": last[-1]["src"], "dst": last[-1]["dst"], "iif": iif, "devs": devs}


def _vtep(lab) -> dict:
    return {n["overlay_ip"]: {"node": n["name"], "mac": n.get("mac"), "ip": n.get("ip")}
            for n in (lab or {}).get("nodes", []) if n.get("overlay_ip")}


def _recording_evidence(plan: _Plan, queries: dict[str, list[dict]]) -> diagnose.Evidence:
    def facts(node, packet):
        q = _fact_query(node, packet)
        if q not in queries.setdefault(node, []):
            queries[node].append(q)
        return None
    svc = plan.dst.service
    return diagnose.Evidence(facts=facts, vip=svc.cluster_ip if svc else None,
                             service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=_vtep(plan.lab))


def _agent_evidence(plan: _Plan, facts_by_node: dict[str, dict]) -> diagnose.Evidence:
    def facts(node, packet):
        q = _fact_query(node, packet)
        for ans in (facts_by_node.get(node) or {}).get("answers", []):
            if ans.get("query") == q and "facts" in ans:
                return ans["facts"]
        return None
    svc = plan.dst.service
    return diagnose.Evidence(facts=facts,
                             rule_hits={n: f.get("rule_hits", []) for n, f in facts_by_node.items()},
                             vip=svc.cluster_ip if svc else None, service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=_vtep(plan.lab))


def _enrich(packets: list[dict], inv: k8s.Inventory) -> None:
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


def _finish(plan: _Plan, t: _Traced) -> FlowResult:
    cfg = plan.cfg
    testhooks.pause("reconstructing")
    fi = _flow_input(plan, t.sent, t.locations, t.clock)
    packets = flows.build_packets(t.df, fi)
    _enrich(packets, plan.inv)
    ev = t.evidence(packets)
    for p in packets:
        diagnose.explain(p, ev)
    verdict = flows.flow_verdict(packets, fi, cfg.probe)
    # A lab pod deleted while tracing: say so instead of letting the drops it causes pass
    # for the cause (the pod's own view is gone, not the network broken).
    gone = [f"{e.pod.key} was deleted during the trace (its network namespace is gone); "
            "verdicts after that are about a pod that no longer exists"
            for e in (plan.src, plan.dst) if plan.lab and e.pod and e.pod.netns and not netns.exists(e.pod.netns)]
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
        from . import tracefile
        tracefile.save(cfg.save, t.df, result.meta)
    return result


