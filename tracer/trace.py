"""One `podtrace flow` run: resolve the ends, load the tracer, send the probes, collect the
events, reconstruct and judge. Everything the CLI's `flow` does lives here."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

import socket

from . import bpfprog, diagnose, flows, k8s, netns, nodecheck, probe, probes, tcattach, tracefs
from .config import FlowConfig
from .errors import BadInput, EnvironmentProblem
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
        }


def load_inventory(cfg: FlowConfig) -> tuple[k8s.Inventory, dict | None]:
    """--cluster FILE, else the lab's inventory when the lab is up. Lab namespaces are added
    to a cluster file's pods when they describe the same pods."""
    from .lab import build as labbuild

    lab = labbuild.status(cfg.lab_prefix)
    if cfg.cluster:
        inv = k8s.load_list(cfg.cluster)
        if lab:
            labinv = k8s.from_lab(lab)
            for key, pod in inv.pods.items():
                lp = labinv.pods.get(key)
                if lp and lp.ip == pod.ip:
                    pod.netns, pod.host_veth = lp.netns, lp.host_veth
        return inv, lab
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
    cache: dict[tuple, dict] = {}

    def facts(node: str, packet: dict) -> dict | None:
        ref = refs.get(node)
        if ref is None:
            return None
        last = [h for h in packet["hops"] if h["node"] == node] or packet["hops"]
        iif = last[-1]["dev"] if last[-1]["point"] == "rx" and last[-1]["pod"] is None else None
        key = (node, last[-1]["src"], last[-1]["dst"], iif)
        if key not in cache:
            devs = list(dict.fromkeys(h["dev"] for h in packet["hops"] if h["node"] == node and h["pod"] is None))
            cache[key] = nodecheck.facts(ref, src=last[-1]["src"], dst=last[-1]["dst"], iif=iif, devs=devs)
        return cache[key]

    hits = {n: nodecheck.rule_hits(before[n], after[n]) for n in after if n in before}
    vtep = {}
    for n in (lab or {}).get("nodes", []):
        if n.get("overlay_ip"):
            vtep[n["overlay_ip"]] = {"node": n["name"], "mac": n.get("mac"), "ip": n.get("ip")}
    svc = dst.service
    return diagnose.Evidence(facts=facts, rule_hits=hits, vip=svc.cluster_ip if svc else None,
                             service=svc.key if svc else None,
                             backends=list(svc.backend_ips) if svc else [], vtep=vtep)


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


def run_flow(cfg: FlowConfig, progress: Callable[[str], None] | None = None) -> FlowResult:
    say = progress or (lambda msg: None)
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                                 "run it again with sudo")
    if cfg.count < 1 or cfg.count > 1000:
        raise BadInput(f"--count {cfg.count} is out of range", "use 1..1000")
    if cfg.size is not None and not 28 + len(probe.PAYLOAD) <= cfg.size <= 65000:
        raise BadInput(f"--size {cfg.size} is out of range", f"use {28 + len(probe.PAYLOAD)}..65000 bytes")
    if not cfg.probe and cfg.duration <= 0:
        raise BadInput("--duration must be positive", "e.g. --no-probe --duration 5")
    inv, lab = load_inventory(cfg)
    src = k8s.resolve(cfg.src, inv)
    dst = k8s.resolve(cfg.dst, inv)
    proto, port, notes = _choose_proto(cfg, dst)
    if cfg.sport is not None and proto == "icmp":
        raise BadInput("--sport applies to TCP and UDP probes", "use --proto tcp|udp with --sport")
    if cfg.size is not None and proto == "tcp":
        raise BadInput("--size applies to ICMP and UDP probes (a TCP probe is a bare SYN)",
                       "use --proto icmp or udp with --size")
    if cfg.probe:
        if src.pod is None:
            raise BadInput(f"probes are sent from a pod; {cfg.src} is not a pod",
                           "give a pod as SRC, or watch real traffic with --no-probe")
        if not src.pod.netns or not netns.exists(src.pod.netns):
            raise EnvironmentProblem(
                f"the network namespace of {src.pod.key} is not on this machine",
                "run podtrace on its node (agent mode comes later) or use --no-probe")
    placement = placement_from_lab(lab)
    drop_reasons = tracefs.drop_reasons()
    ct_names = bpfprog.ct_info_names()
    t_resolved = time.monotonic()
    say("loading BPF programs")
    addrs = sorted(set(src.addresses() + dst.addresses()))
    hooks, degraded = probes.select(probes.detect(), tc=cfg.tc)
    notes += degraded
    session = TraceSession(SessionConfig(addrs=addrs, hooks=hooks))
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
                say(f"tracing: sending {cfg.count} {proto} probe(s) {src.ip} → {dst.ip}"
                    + (f":{port}" if port else ""))
                sent = probe.send(src.pod.netns, src.ip, dst.ip, proto, port, cfg.count,
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
            ksyms = _symbolizer(session)
            locations = {int(a): ksyms(int(a)) for a in df.loc[df["location"] != 0, "location"].unique()}
        finally:
            if tc is not None:
                tc.close()
            session.close()
    t_done = time.monotonic()
    fi = flows.FlowInput(src, dst, proto, port, sent, placement, drop_reasons,
                         lambda a: locations.get(a), ct_names)
    packets = flows.build_packets(df, fi)
    evidence = _evidence(lab, dst, refs, counters_before, counters_after)
    for p in packets:
        diagnose.explain(p, evidence)
    verdict = flows.flow_verdict(packets, fi, cfg.probe)
    summary = flows.summary(packets, fi, counters)
    timings = {
        "resolve_s": round(t_resolved - t_start, 4),
        "startup_s": round(t_tracing - t_start, 4),
        **{k: round(v, 4) for k, v in session.timings.items()},
        "trace_s": round(t_done - t_tracing, 4),
        "reconstruct_s": round(time.monotonic() - t_done, 4),
    }
    if counters.get("lost"):
        notes.append(f"{counters['lost']} events were lost (ring buffer full); the path may have gaps")
    result = FlowResult(cfg, src, dst, proto, port, sent, packets, verdict, summary, counters,
                        timings, df, notes=notes)
    result.meta = {
        "version": SCHEMA_VERSION, "src": src.as_json(), "dst": dst.as_json(),
        "proto": proto, "port": port, "probes": [p.as_json() for p in sent],
        "placement": {str(k): list(v) for k, v in placement.netns.items()},
        "drop_reasons": {str(k): v for k, v in drop_reasons.items()},
        "locations": {str(k): v for k, v in locations.items()},
        "ct_info_names": {str(k): v for k, v in ct_names.items()},
        "service": ({"key": dst.service.key, "backends": dst.service.backends,
                     "backend_ips": dst.service.backend_ips} if dst.service else None),
        "probing": cfg.probe, "counters": counters, "inventory": inv.source,
        "hooks": [h.name for h in hooks], "degraded": degraded,
        "created_ns": time.time_ns(),
    }
    if cfg.save:
        from . import tracefile
        tracefile.save(cfg.save, df, result.meta)
    return result


def _symbolizer(session: TraceSession) -> Callable[[int], str | None]:
    bpf = session.loaded.bpf if session.loaded else None

    def sym(addr: int) -> str | None:
        if not addr or bpf is None:
            return None
        try:
            return bpf.ksym(addr, show_offset=True).decode(errors="replace")
        except Exception:  # BCC raises bare Exception for unknown addresses
            return hex(addr)
    return sym
