"""`podtrace agent`: the per-node tracer. It reads one trace request (a JSON line) on stdin,
traces its own node, and streams framed records (tracer.wire) on stdout: hello/ready,
events, probe results, node facts for diagnosis, clock readings, counters, end. Further
JSON lines on stdin steer it: {"cmd": "probe"}, {"cmd": "facts", "queries": [...]},
{"cmd": "stop"}. End of stdin means the coordinator is gone: the agent stops and cleans up.

The same code runs as a process per lab node and inside the DaemonSet pod on a real node.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from typing import BinaryIO

from tracer.node import facts as nodecheck
from tracer.node import prober as probe
from tracer.kernel import hooks as probes
from tracer.kernel import tc as tcattach
from tracer.agents import wire
from tracer.errors import PodtraceError
from tracer.kernel.session import SessionConfig, TerminateAsInterrupt, TraceSession

FLUSH_S = 0.05
REQUEST_VERSION = 1


def _clock() -> dict:
    return {"monotonic_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC) + _skew(),
            "realtime_ns": time.time_ns()}


def clock_domain() -> str:
    """Agents with the same domain read the same CLOCK_MONOTONIC (one booted kernel), so no
    offset between them is estimated: it is zero by construction."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = f"pid-{os.getpid()}"
    return boot + (f"+skew{_skew()}" if _skew() else "")


def _skew() -> int:
    # For tests of the coordinator's offset estimation: pretend this node's clock is off.
    return int(os.environ.get("PODTRACE_AGENT_CLOCK_SKEW_NS", "0"))


class _Out:
    """Frames to stdout from the main loop and the probe thread, never interleaved."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.lock = threading.Lock()

    def send(self, kind: str, payload) -> None:
        with self.lock:
            wire.write(self.f, kind, payload)


def _commands(stdin, q: queue.Queue) -> None:
    for line in stdin:
        line = line.strip()
        if line:
            try:
                q.put(json.loads(line))
            except json.JSONDecodeError:
                q.put({"cmd": "bad", "line": line[:200]})
    q.put({"cmd": "eof"})


def serve(stdin=None, stdout: BinaryIO | None = None) -> int:
    stdin = stdin or sys.stdin
    out = _Out(stdout or sys.stdout.buffer)
    try:
        req = json.loads(stdin.readline() or "null")
    except json.JSONDecodeError as exc:
        out.send("error", {"message": f"bad request: {exc}"})
        return 2
    if not isinstance(req, dict) or req.get("version") != REQUEST_VERSION:
        out.send("error", {"message": f"unsupported request (want version {REQUEST_VERSION})"})
        return 2
    node = nodecheck.NodeRef(req["node"], req.get("node_netns"))
    skew = _skew()
    local = {}
    if req.get("discover"):
        # A real node: find the pods' namespaces and hop devices here, by address.
        local = _discover(req["discover"], node.name)
        if req.get("probe") and not req["probe"].get("netns"):
            req["probe"]["netns"] = local["netns_by_ip"].get(req["probe"]["src"])
            if not req["probe"]["netns"]:
                out.send("error", {"message": f"{req['probe']['src']} is not the address of a pod on "
                                              f"{node.name} (no local pod namespace holds it)", "exit_code": 1})
                return 1
        req["tc_devices"] = [[None, d] for d in local["devices"]] if req.get("tc_devices") == "auto" else []
        if req.get("netns_filter") is None:
            req["netns_filter"] = local["netns_filter"]
    hooks, degraded = probes.select(probes.detect(), tc=bool(req.get("tc_devices")))
    session = TraceSession(SessionConfig(addrs=req["addrs"], hooks=hooks, netns=req.get("netns_filter"),
                                         sample=int(req.get("sample", 1)), budget=int(req.get("budget", 0))))
    tc = None
    sent_events = 0
    with TerminateAsInterrupt():
        try:
            session.start()
            if req.get("tc_devices"):
                tcattach.cleanup(scan=False)
                tc = tcattach.TcAttacher(session.loaded.bpf)
                for ns_name, dev in req["tc_devices"]:
                    tc.attach(ns_name, dev)
            if tc is not None and tc.failed:
                degraded = degraded + [f"{f} (the tracepoints still see that device)" for f in tc.failed]
            before = nodecheck.iptables_counters(node)
            out.send("hello", {"node": node.name, "pid": os.getpid(), "hooks": [h.name for h in hooks],
                               "degraded": degraded, "kernel": os.uname().release,
                               "clock_domain": clock_domain(),
                               "namespaces": local.get("namespaces", {}),
                               "timings": session.timings})
            out.send("clock", _clock())
            out.send("ready", {"node": node.name})
            if os.environ.get("PODTRACE_AGENT_DIE_AFTER_READY"):
                os._exit(9)   # tests: an agent that dies mid-trace
            cmds: queue.Queue = queue.Queue()
            threading.Thread(target=_commands, args=(stdin, cmds), daemon=True).start()
            prober: threading.Thread | None = None
            deadline = time.monotonic() + float(req.get("max_seconds", 3600))
            last_flush = 0.0
            guard = _Guard(session, out, node.name)
            while time.monotonic() < deadline:
                session.poll(int(FLUSH_S * 1000 / 2))
                now = time.monotonic()
                if now - last_flush >= FLUSH_S:
                    sent_events = _flush(session, out, sent_events, skew)
                    last_flush = now
                    guard.check(now)
                try:
                    cmd = cmds.get_nowait()
                except queue.Empty:
                    continue
                what = cmd.get("cmd")
                if what == "probe" and req.get("probe") and prober is None:
                    prober = threading.Thread(target=_probe, args=(req["probe"], out, skew), daemon=True)
                    prober.start()
                elif what == "facts":
                    session.drain()
                    sent_events = _flush(session, out, sent_events, skew)
                    after = nodecheck.iptables_counters(node)
                    out.send("facts", {"node": node.name,
                                       "rule_hits": nodecheck.rule_hits(before, after),
                                       "answers": [_facts(node, q) for q in cmd.get("queries", [])],
                                       "locations": _locations(session)})
                elif what in ("stop", "eof"):
                    break
                elif what == "bad":
                    out.send("log", {"message": f"ignored unparsable command: {cmd['line']}"})
            if prober is not None:
                prober.join(timeout=30)
            session.drain()
            sent_events = _flush(session, out, sent_events, skew)
            out.send("counters", session.counters())
            out.send("clock", _clock())
        except PodtraceError as exc:
            out.send("error", {"message": exc.line(), "exit_code": exc.exit_code})
            return exc.exit_code
        except KeyboardInterrupt:
            out.send("error", {"message": "agent interrupted"})
            return 130
        finally:
            if tc is not None:
                tc.close()
            session.close()
    out.send("end", {"node": node.name, "events": sent_events})
    return 0


class _Guard:
    """When the kernel starts refusing events for the budget, keep fewer packets instead:
    double the (deterministic) sampling, and say so in the stream."""

    def __init__(self, session: TraceSession, out: _Out, node: str):
        self.session, self.out, self.node = session, out, node
        self.over = 0
        self.next_check = 0.0

    def check(self, now: float) -> None:
        if now < self.next_check or not self.session.config.budget:
            return
        self.next_check = now + 1.0
        over = self.session.counters().get("over_budget", 0)
        if over > self.over and self.session.config.sample < 1024:
            n = self.session.config.sample * 2
            self.session.set_guard(n, self.session.config.budget)
            self.out.send("log", {"message": f"{self.node}: over the event budget "
                                  f"({self.session.config.budget}/s): now keeping 1 packet in {n}"})
        self.over = over


def _flush(session: TraceSession, out: _Out, sent: int, skew: int) -> int:
    total = session.sink.count()
    if total > sent:
        new = session.sink.since(sent)
        if skew:
            new = new.copy()
            new["ts_ns"] += skew
        out.send("events", new.tobytes())
    return total


def _discover(d: dict, node: str) -> dict:
    """On a real node: this node's pods with their addresses (so the coordinator can name hops
    inside pods), the namespace of the probing pod, the namespaces to trace and the hop
    devices of the pods this trace involves (tracer.node.pods finds them)."""
    from tracer.node import pods as nodepods

    local = nodepods.discover(node, d.get("pod_ips", []), d.get("node_ips", []))
    return {"namespaces": local.namespaces, "netns_by_ip": local.netns_by_ip, "devices": local.devices(),
            "netns_filter": local.netns_filter()}


def _locations(session: TraceSession) -> dict[str, str | None]:
    """Kernel symbols of the drop locations seen (kallsyms is this machine's)."""
    arr = session.sink.array()
    sym = session.symbolizer()
    return {str(int(a)): sym(int(a)) for a in set(arr["location"][arr["hook"] == 3].tolist()) if a}


def _probe(p: dict, out: _Out, skew: int) -> None:
    try:
        results = probe.send(p["netns"], p["src"], p["dst"], p["proto"], p.get("port"), p["count"],
                             p.get("timeout", 1.0), p.get("interval", 0.05), size=p.get("size"),
                             sport=p.get("sport"))
        time.sleep(p.get("settle", 0.05))
        docs = [r.as_json() for r in results]
        for d in docs:
            d["sent_ns"] += skew
        out.send("probes", docs)
    except Exception as exc:  # report, never kill the agent: its trace is still useful
        out.send("probes", {"error": f"{type(exc).__name__}: {exc}"})


def _facts(node: nodecheck.NodeRef, q: dict) -> dict:
    try:
        return {"query": q, "facts": nodecheck.facts(node, src=q["src"], dst=q["dst"], iif=q.get("iif"),
                                                     devs=q.get("devs", []))}
    except Exception as exc:  # one bad query must not lose the others
        return {"query": q, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    return serve()


def idle(every: float = 60.0) -> int:
    """The DaemonSet container's main process: no listener, no work, except removing what a
    killed `podtrace agent` exec left on this node. Exits 0 on SIGTERM."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(every):
        try:
            tcattach.cleanup(scan=False)
        except PodtraceError:
            pass
    return 0
