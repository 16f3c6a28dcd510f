"""`podtrace agent`: the wire protocol around one node's runner (tracer/runs/node.py).

It reads one trace request (a JSON line, tracer/agents/request.py) on stdin, traces its own node, and streams framed records (tracer.wire) on stdout: hello/ready,
events, probe results, node facts for diagnosis, clock readings, counters, end. Further
JSON lines on stdin steer it: {"cmd": "probe"} (with "progress": true, a `probe` frame per
outcome as it comes), {"cmd": "stop-probes"} (no further probe: the
probes frame reports those sent), {"cmd": "drain"} (deliver every event seen
so far, then a `drained` frame: the end of the trace window), {"cmd": "facts", "queries": [...]},
{"cmd": "sample", "n": N} (raise the kernel sampling to 1 in N, N in 1..65536; from then on a
`sample` frame says when the guard raises it), {"cmd": "stop"}. The hello frame lists the commands this agent understands. End of stdin means the coordinator is gone: the agent stops and cleans up,
also when that happens while it is still loading or attaching (no device is attached after it);
before any request (an agent `flow` started early and did not need) it exits 0 saying nothing.

The same code runs as a process per lab node and inside the DaemonSet pod on a real node,
where the pod's agent server (tracer/agents/server.py) starts it for each checked request.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import replace
from typing import BinaryIO

from tracer import testhooks
from tracer.agents import request, wire
from tracer.errors import PodtraceError
from tracer.kernel import record
from tracer.kernel.session import TerminateAsInterrupt
from tracer.node import facts, netns
from tracer.node import prober as probe
from tracer.node import sourcefacts
from tracer.runs.node import MAX_SAMPLE, NodeJob, NodeRunner

FLUSH_S = 0.05
REQUEST_VERSION = request.REQUEST_VERSION
COMMANDS = ["probe", "stop-probes", "drain", "facts", "stop", "sample"]


def _clock() -> dict:
    return {"monotonic_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC) + testhooks.clock_skew_ns(),
            "realtime_ns": time.time_ns()}


def clock_domain() -> str:
    """Agents with the same domain read the same CLOCK_MONOTONIC (one booted kernel), so no
    offset between them is estimated: it is zero by construction."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = f"pid-{os.getpid()}"
    skew = testhooks.clock_skew_ns()
    return boot + (f"+skew{skew}" if skew else "")


class _Out:
    """Frames to stdout from the main loop and the probe thread, never interleaved."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.lock = threading.Lock()

    def send(self, kind: str, payload) -> None:
        with self.lock:
            wire.write(self.f, kind, payload)


def _commands(stdin, q: queue.Queue, gone: threading.Event) -> None:
    """Steering lines → `q`; the end of stdin (the coordinator is gone) also sets `gone`,
    which the runner watches while it is still attaching."""
    try:
        for line in stdin:
            line = line.strip()
            if line:
                try:
                    cmd = json.loads(line)
                except json.JSONDecodeError:
                    cmd = {"cmd": "bad", "line": line[:200]}
                if isinstance(cmd, dict) and cmd.get("cmd") == "stop":
                    gone.set()
                q.put(cmd if isinstance(cmd, dict) else {"cmd": "bad", "line": line[:200]})
    except (OSError, ValueError):
        pass
    gone.set()
    q.put({"cmd": "eof"})


def _read_request(stdin, out: _Out) -> request.AgentRequest | int:
    line = stdin.readline()
    if not line:
        return 0    # the coordinator went away before asking anything (an agent it started early)
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        out.send("error", {"message": f"bad request: {exc}"})
        return 2
    if not isinstance(doc, dict) or doc.get("version") != REQUEST_VERSION:
        out.send("error", {"message": f"unsupported request (want version {REQUEST_VERSION})"})
        return 2
    try:
        return request.AgentRequest.from_wire(doc)
    except (ValueError, TypeError, KeyError) as exc:
        out.send("error", {"message": f"bad request: {type(exc).__name__}: {exc}"})
        return 2


def _ahead() -> None:
    """What every trace needs, whatever it is asked, done before the request is read: an
    agent started early waits for it meanwhile (BCC's import, the kernel's offsets). A
    failure here is met, and reported, where the trace needs the thing."""
    from tracer.kernel import btf, program

    with contextlib.suppress(Exception):
        program._bcc()
        btf.kernel_offsets()


def serve(stdin=None, stdout: BinaryIO | None = None) -> int:
    stdin = stdin or sys.stdin
    out = _Out(stdout or sys.stdout.buffer)
    _ahead()
    req = _read_request(stdin, out)
    if isinstance(req, int):
        return req
    # The coordinator may go away at any moment, also while this agent is still loading or
    # attaching: stdin is watched from now on.
    cmds: queue.Queue = queue.Queue()
    gone = threading.Event()
    threading.Thread(target=_commands, args=(stdin, cmds, gone), daemon=True).start()
    node = facts.NodeRef(req.node, req.node_netns)
    local: dict = {}
    if req.discover is not None:
        # A real node: find the pods' namespaces and hop devices here, by address.
        local = _discover(req.discover, node.name)
        if req.probe is not None and not req.probe.netns:
            ns_path = local["netns_by_ip"].get(req.probe.src)
            if not ns_path:
                out.send("error", {"message": f"{req.probe.src} is not the address of a pod on "
                                              f"{node.name} (no local pod namespace holds it)", "exit_code": 1})
                return 1
            req = replace(req, probe=replace(req.probe, netns=ns_path))
        req = replace(req, tc_devices=[(None, d) for d in local["devices"]] if req.tc_devices == "auto" else [],
                      netns_filter=local["netns_filter"] if req.netns_filter is None else req.netns_filter)
    devices = req.tc_devices if isinstance(req.tc_devices, list) else []
    sent_events = 0
    with TerminateAsInterrupt():
        try:
            runner = NodeRunner(NodeJob(addrs=req.addrs, tc=bool(devices), tc_devices=devices,
                                        tc_observers=req.tc_observers or "auto",
                                        nodes={node.name: node}, pods=_pod_spaces(req), netns=req.netns_filter,
                                        sample=req.sample, budget=req.budget))
            try:
                gone.wait(testhooks.agent_start_delay())   # 0 unless a test delays this agent
                runner.start(stop=gone)
                sent_events = _trace(req, runner, node, local, cmds, out)
            finally:
                runner.close()
        except PodtraceError as exc:
            out.send("error", {"message": exc.line(), "exit_code": exc.exit_code})
            return exc.exit_code
        except KeyboardInterrupt:
            out.send("error", {"message": "agent interrupted"})
            return 130
    out.send("end", {"node": node.name, "events": sent_events})
    return 0


def _trace(req: request.AgentRequest, runner: NodeRunner, node: facts.NodeRef, local: dict,
           cmds: queue.Queue, out: _Out) -> int:
    """The agent's side of the protocol around a started runner; the events sent."""
    skew = testhooks.clock_skew_ns()
    degraded = runner.degraded + [f"{f} (the tracepoints still see that device)" for f in runner.tc_failed]
    out.send("hello", {"node": node.name, "pid": os.getpid(), "hooks": runner.hook_names,
                       "degraded": degraded, "kernel": os.uname().release,
                       "clock_domain": clock_domain(), "commands": COMMANDS,
                       "namespaces": local.get("namespaces", {}),
                       "timings": runner.timings})
    out.send("clock", _clock())
    # t_ns: since when this node traces, on its own clock (the start of the observation window)
    out.send("ready", {"node": node.name, "t_ns": _clock()["monotonic_ns"]})
    testhooks.die_after_ready()
    prober: threading.Thread | None = None
    no_more_probes = threading.Event()
    deadline = time.monotonic() + req.max_seconds
    last_flush = 0.0
    sender = _Sender(runner, out, skew)
    window_counters: dict | None = None     # the counters when the trace window ended (`drain`)
    report_sample = False                   # a `sample` command came: say when the guard raises it
    while time.monotonic() < deadline:
        if window_counters is not None:
            # the window is over: nothing traced from now on is read or sent (a busy flow
            # would otherwise keep the ring, this process and the coordinator busy)
            try:
                cmd = cmds.get(timeout=FLUSH_S)
            except queue.Empty:
                continue
        else:
            runner.poll(int(FLUSH_S * 1000 / 2))
            runner.watch_gaps()
            now = time.monotonic()
            if now - last_flush >= FLUSH_S:
                sender.flush()
                last_flush = now
                said = runner.guard(now)
                if said:
                    out.send("log", {"message": f"{node.name}: {said}"})
                    if report_sample:
                        out.send("sample", {"n": runner.session.config.sample})
            try:
                cmd = cmds.get_nowait()
            except queue.Empty:
                continue
        what = cmd.get("cmd")
        if what == "probe" and req.probe is not None and prober is None:
            prober = threading.Thread(target=_probe, args=(req.probe, out, skew, no_more_probes,
                                                           bool(cmd.get("progress"))), daemon=True)
            prober.start()
        elif what == "sample":
            # another node's guard raised its sampling: keep the same packets (fewer events
            # here too, and no packet kept on one node and gone on the next)
            report_sample = True
            n = cmd.get("n")
            if isinstance(n, int) and not isinstance(n, bool) and runner.session.config.sample < n <= MAX_SAMPLE \
                    and window_counters is None:
                runner.session.set_guard(n, runner.session.config.budget)
        elif what == "stop-probes":
            no_more_probes.set()
        elif what == "drain":
            stop_ns = _clock()["monotonic_ns"]   # the end of this node's observation window
            runner.drain()
            sender.flush()
            # when the kernel refused events (budget, full ring), and the sampling at the end:
            # the coordinator keeps only the packets every node sampled, and calls what was
            # seen while a node refused events a gap in the trace
            gaps = [[a + skew, b + skew] for a, b in runner.watch_gaps()]
            out.send("drained", {"node": node.name, "events": sender.sent, "t_ns": stop_ns, "gaps": gaps,
                                 "sample": runner.session.config.sample,
                                 "locations": sender.locations()})
            window_counters = runner.counters()
            # keep the hooks as light as they can be until the agent stops; the rule counters
            # are read, and the tc observers go, while the coordinator judges
            runner.session.set_guard(MAX_SAMPLE, runner.session.config.budget)
            runner.after_window_meanwhile()
        elif what == "facts" and node.name in runner.iptables_before:
            if window_counters is None:
                runner.drain()
                sender.flush()
            after = runner.iptables_after()[node.name]
            out.send("facts", {"node": node.name,
                               "rule_hits": facts.rule_hits(runner.iptables_before[node.name], after),
                               "answers": [_facts(node, q, req.probe) for q in cmd.get("queries", [])],
                               "netns_rule_hits": {str(k): v for k, v in runner.pod_rule_hits().items()},
                               "locations": sender.locations()})
        elif what in ("stop", "eof"):
            no_more_probes.set()
            break
        elif what == "bad":
            out.send("log", {"message": f"ignored unparsable command: {cmd['line']}"})
    if prober is not None:
        prober.join(timeout=30)
    if window_counters is None:
        runner.drain()
        sender.flush()
    out.send("counters", window_counters if window_counters is not None else runner.counters())
    out.send("clock", _clock())
    return sender.sent


class _Sender:
    """The events a runner recorded, sent on as they come and then let go (an agent holds no
    more than one flush's worth, however long it traces), and the drop locations among them."""

    def __init__(self, runner: NodeRunner, out: _Out, skew: int):
        self.runner, self.out, self.skew = runner, out, skew
        self.sent = 0                   # events recorded so far (sent, or dropped by the sampling)
        self.drops: set[int] = set()    # kernel addresses of the drops sent

    def flush(self) -> None:
        """Send what was recorded since the last flush that the sampling now in force keeps
        (the coordinator would drop the rest at its merge)."""
        sink = self.runner.sink
        total = sink.count()
        if total > self.sent:
            new = record.sampled(sink.since(self.sent), self.runner.session.config.sample)
            sink.release()
            if self.skew:
                new = new.copy()
                new["ts_ns"] += self.skew
            if len(new):
                at = new["hook"] == record.HOOK_IDS["drop"]
                if at.any():
                    self.drops.update(new["location"][at].tolist())
                self.out.send("events", new.tobytes())
        self.sent = total

    def locations(self) -> dict[str, str | None]:
        """The kernel symbols of the drops sent ("function+0xoff"), by address."""
        return {str(k): v for k, v in self.runner.symbols(self.drops).items()}


def _discover(d: request.Discovery, node: str) -> dict:
    """On a real node: this node's pods with their addresses (so the coordinator can name hops
    inside pods), the namespace of the probing pod, the namespaces to trace and the hop
    devices of the pods this trace involves (tracer.node.pods finds them)."""
    from tracer.node import pods as nodepods

    local = nodepods.discover(node, d.pod_ips, d.node_ips)
    return {"namespaces": local.namespaces, "netns_by_ip": local.netns_by_ip, "devices": local.devices(),
            "netns_filter": local.netns_filter()}


def _probe(p: request.ProbeRequest, out: _Out, skew: int, stop: threading.Event | None = None,
           progress: bool = False) -> None:
    """Send the probes; with `progress` (a coordinator that reads `probe` frames asked for
    them), one `probe` frame per outcome as it comes, then the `probes` frame of all."""
    stop = stop or threading.Event()
    try:
        results = probe.send(p.netns, p.src, p.dst, p.proto, p.port, p.count, p.timeout, p.interval,
                             size=p.size, sport=p.sport, stop=stop,
                             on_result=(lambda r: out.send("probe", {"seq": r.seq, "outcome": r.outcome}))
                             if progress else None)
        stop.wait(p.settle)
        docs = [r.as_json() for r in results]
        for d in docs:
            d["sent_ns"] += skew
        out.send("probes", docs)
    except Exception as exc:  # report, never kill the agent: its trace is still useful
        out.send("probes", {"error": f"{type(exc).__name__}: {exc}"})


def _pod_spaces(req: request.AgentRequest) -> dict[int, str]:
    """The named namespaces this agent traces besides its node's own: the pods, whose
    netfilter counters are read before and after (a drop inside a pod names its rule)."""
    own = netns.inode(req.node_netns) if req.node_netns and netns.exists(req.node_netns) else None
    return {i: n for i, n in facts.named_netns(req.netns_filter or ()).items() if i != own}


def _facts(node: facts.NodeRef, q: dict, probe_req: request.ProbeRequest | None = None) -> dict:
    try:
        if q.get("kind") == "source":
            # the probing pod's own view, read inside its namespace (the one the probes left from)
            if probe_req is None or not probe_req.netns:
                return {"query": q, "error": "this agent did not probe: it knows no source pod"}
            return {"query": q, "facts": sourcefacts.read(probe_req.netns, q["dst"])}
        return {"query": q, "facts": facts.facts(node, src=q["src"], dst=q["dst"], iif=q.get("iif"),
                                                     devs=q.get("devs", []), pod_netns=q.get("pod_netns"),
                                                     pod_dev=q.get("pod_dev"))}
    except Exception as exc:  # one bad query must not lose the others
        return {"query": q, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    return serve()
