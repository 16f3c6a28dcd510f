"""The lifecycle of one trace on one node, from hook selection to the release of every kernel object.

`NodeRunner` is the only place that starts a trace session, attaches the tc observers
(first removing what a killed run recorded), reads the iptables counters before and after,
polls and drains the ring buffer, guards the event budget, names drop locations and closes.
`flow` runs it in-process (single-process mode), `podtrace agent` wraps it in the wire
protocol, `capture` drains its sink into a trace file.

It lives under runs/ rather than agents/ because two of its three users (`flow` single mode,
`capture`) are not agents; it imports nothing from agents/ or cluster/, so the agent can use
it without a cycle.

Closing is the one cleanup path: it runs from `finally` for a normal end, for Ctrl-C, and for
SIGTERM/SIGHUP (turned into KeyboardInterrupt by `TerminateAsInterrupt`), and while it runs
those signals are held back so that a second one cannot cut the removal of tc filters short.
What SIGKILL leaves (the tc filters, each recorded before it exists) is removed by the next
run's `start` or by `podtrace cleanup`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from tracer import testhooks
from tracer.kernel import hooks
from tracer.kernel.tc import TcAttacher, cleanup
from tracer.kernel.session import SessionConfig, Sink, TraceSession
from tracer.node import facts

MAX_SAMPLE = 65536      # the most the guard raises sampling to (the command line's --sample limit)
OVER_BUDGET = "over the event budget"   # what the guard says when it raises the sampling


@dataclass
class NodeJob:
    """What one node traces."""

    addrs: list[str]
    tc: bool = False                                        # tc observers wanted (hook selection)
    tc_devices: list[tuple[str | None, str]] = field(default_factory=list)   # where they may go
    # "auto": on tc_devices only when another tc program or filter runs on one of them;
    # "all": on every one of them
    tc_observers: str = "auto"
    nodes: dict[str, facts.NodeRef] = field(default_factory=dict)        # iptables counters of these
    pods: dict[int, str] = field(default_factory=dict)      # and of these pod namespaces (inode → name)
    netns: list[int] | None = None                          # namespace inodes to keep events from
    sample: int = 1
    budget: int = 0
    match_either: bool = False
    ringbuf_pages: int = 1024
    cidrs: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    any_addr: bool = False
    sink_limit: int | None = None                           # events waiting at most (capture)


def _import_netlink() -> None:
    import pyroute2  # noqa: F401


class _TcAlongside:
    """The tc observers, attached while the session's tracepoints are (program.load): the
    tcx links wait on the kernel, the tracepoints' verification computes."""

    def __init__(self, runner: "NodeRunner", stop: threading.Event | None):
        self.runner = runner
        self.stop = stop
        self.seconds = 0.0

    def run(self, bpf, halt: threading.Event) -> None:
        t0 = time.monotonic()
        tc = self.runner.tc = TcAttacher(bpf)
        devices = self.runner.job.tc_devices
        if self.runner.job.tc_observers != "all" and not self._others(tc, devices):
            # Nobody else's tc program on the path: the device tracepoints see every hop
            # there, and nothing of podtrace's goes on the devices.
            devices = []
        for ns_name, dev in devices:
            if halt.is_set() or (self.stop is not None and self.stop.is_set()):
                break
            tc.attach(ns_name, dev)
        self.runner.tc_used = bool(tc.links or tc.attached)
        self.runner.tc_failed = list(tc.failed)
        self.seconds = time.monotonic() - t0

    def _others(self, tc: TcAttacher, devices) -> bool:
        by_ns: dict[str | None, list[str]] = {}
        for ns_name, dev in devices:
            by_ns.setdefault(ns_name, []).append(dev)
        for ns_name, devs in by_ns.items():
            try:
                if tc.others_on(ns_name, devs):
                    return True
            except Exception:   # devices we cannot ask about: observe the path as before
                return True
        return False

    def undo(self) -> None:
        tc, self.runner.tc = self.runner.tc, None
        if tc is not None:
            tc.close()
        self.runner.tc_failed = []


class NodeRunner:
    """One node's trace: `start()`, then `poll()`/`drain()`, then `close()` (always, also
    on error: it is idempotent and safe before `start`)."""

    def __init__(self, job: NodeJob):
        self.job = job
        self.hooks, self.degraded = hooks.select(hooks.detect(), tc=job.tc)
        self.sink = Sink(job.sink_limit)
        self.session = TraceSession(SessionConfig(
            addrs=job.addrs, hooks=self.hooks, netns=job.netns, sample=job.sample, budget=job.budget,
            match_either=job.match_either, ringbuf_pages=job.ringbuf_pages, cidrs=job.cidrs,
            ports=job.ports, any_addr=job.any_addr), sink=self.sink)
        self.tc: TcAttacher | None = None
        self.tc_failed: list[str] = []
        self.tc_used = False        # a tc observer went on a device (PODTRACE_TC_OBSERVERS)
        self.iptables_before: dict[str, facts.RuleCounters] = {}
        self.pods_before: dict[int, facts.RuleCounters] = {}
        self._over = 0
        self._emitted = 0
        self._next_guard = 0.0
        self.gaps: list[tuple[int, int]] = []    # when the kernel refused events (watch_gaps)
        self._refused = 0
        self._gap_checked_ns: int | None = None
        self._closed = False
        self._timings: dict[str, float] = {}
        self._after_thread: threading.Thread | None = None
        self._after: tuple[dict, dict] | None = None
        self._after_read = threading.Event()        # set once `_after` is read (or failed)

    @property
    def hook_names(self) -> list[str]:
        """The hooks tracing: the tc ones only where an observer went on a device."""
        return [h.name for h in self.hooks if h.kind != "tc" or self.tc_used]

    @property
    def timings(self) -> dict:
        return dict(self.session.timings, **self._timings)

    def start(self, stop: threading.Event | None = None) -> "NodeRunner":
        """Load, filter, attach; read the counters before. With `stop` set meanwhile (the
        coordinator went away, the user asked to stop), no further device is attached: the
        caller sees the stop and closes."""
        if stop is not None and stop.is_set():
            return self          # nothing loaded: poll, drain and counters see an idle session
        try:
            tc_side = None
            if self.job.tc_devices and any(h.kind == "tc" for h in self.hooks):
                # pyroute2 takes ~0.15 s to import: done while the program compiles or loads
                threading.Thread(target=_import_netlink, name="podtrace-import", daemon=True).start()
                cleanup(scan=False)   # what a killed run recorded
                tc_side = _TcAlongside(self, stop)
            self.session.start(stop=stop, alongside=tc_side)
            self._gap_checked_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            t_counters = time.monotonic()
            # every namespace's counters at once (as after the window): their readers are processes
            before = _each(facts.iptables_counters, {**{("node", n): r for n, r in self.job.nodes.items()},
                                                     **{("pod", i): facts.NodeRef(n, n)
                                                        for i, n in self.job.pods.items()}})
            self.iptables_before = {k: v for (kind, k), v in before.items() if kind == "node"}
            self.pods_before = {k: v for (kind, k), v in before.items() if kind == "pod"}
            self._timings = {"tc_s": tc_side.seconds if tc_side else 0.0,
                             "counters_s": time.monotonic() - t_counters}
            if stop is None or not stop.is_set():
                testhooks.pause("tracing")    # every hook and tc filter attached
        except BaseException:
            self.close()
            raise
        return self

    def poll(self, timeout_ms: int) -> int:
        return self.session.poll(timeout_ms)

    def drain(self) -> None:
        self.session.drain()

    def counters(self) -> dict[str, int]:
        return self.session.counters()

    def iptables_after(self) -> dict[str, facts.RuleCounters]:
        """Every node's rule counters at the end of the window: what `after_window_meanwhile`
        read, or read now."""
        if self._after_thread is not None:
            self._after_read.wait()
            if self._after is not None:
                return self._after[0]
        return self._read_nodes()

    def pod_rule_hits(self) -> dict[int, list[dict]]:
        """pod namespace (inode) → the drop rules whose counters moved there while we traced."""
        if self._after_thread is not None:
            self._after_read.wait()
            if self._after is not None:
                return self._after[1]
        return self._read_pods()

    def _read_nodes(self) -> dict[str, facts.RuleCounters]:
        return _each(facts.iptables_counters, self.job.nodes)

    def _read_pods(self) -> dict[int, list[dict]]:
        after = _each(facts.iptables_counters,
                      {i: facts.NodeRef(self.job.pods[i], self.job.pods[i]) for i in self.pods_before})
        out = {}
        for i, before in self.pods_before.items():
            hits = facts.rule_hits(before, after[i])
            if hits:
                out[i] = hits
        return out

    def symbols(self, addrs) -> dict[int, str | None]:
        """Kernel symbols ("function+0xoff") of drop locations, from this machine's kallsyms."""
        sym = self.session.symbolizer()
        return {int(a): sym(int(a)) for a in addrs if int(a)}

    def guard(self, now: float) -> str | None:
        """When the kernel starts refusing events for the budget, keep fewer packets instead:
        raise the (deterministic) sampling in proportion to what the last second asked for
        (a power of two, at least twice the current one, at most MAX_SAMPLE). Checked at most
        once a second; returns what to tell the user when the sampling changed."""
        cfg = self.session.config
        if now < self._next_guard or not cfg.budget:
            return None
        self._next_guard = now + 1.0
        c = self.counters()
        over, emitted = c.get("over_budget", 0), c.get("emitted", 0)
        refused, kept = over - self._over, emitted - self._emitted
        self._over, self._emitted = over, emitted
        if refused <= 0 or cfg.sample >= MAX_SAMPLE:
            return None
        factor = 2
        while factor < MAX_SAMPLE and cfg.budget * factor < 1.25 * (refused + kept):
            factor *= 2
        n = min(MAX_SAMPLE, cfg.sample * factor)
        self.session.set_guard(n, cfg.budget)
        return f"{OVER_BUDGET} ({cfg.budget}/s): now keeping 1 packet in {n}"

    def watch_gaps(self, now_ns: int | None = None) -> list[tuple[int, int]]:
        """The intervals (monotonic ns, the events' clock) in which the kernel refused events:
        for the budget, because the ring buffer was full, or because it skipped a hook's
        program (it ran nested on a CPU where another BPF program ran). Call it often (every poll): a
        packet seen within such an interval may miss a hop that was never recorded, which is a
        gap in the trace, not a loss in the network."""
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        c = self.counters()
        refused = c.get("over_budget", 0) + c.get("lost", 0) + self.session.missed_runs()
        since = self._gap_checked_ns
        if refused > self._refused and since is not None:
            if self.gaps and self.gaps[-1][1] >= since:
                self.gaps[-1] = (self.gaps[-1][0], now_ns)
            else:
                self.gaps.append((since, now_ns))
        self._refused, self._gap_checked_ns = refused, now_ns
        return self.gaps

    def after_window_meanwhile(self) -> None:
        """The trace window is over (drained): in a thread, while the events are judged, read
        the rule counters the window ended with (nodes and pods, each in its own thread:
        iptables-save, ip6tables-save and nft are processes), then remove the tc observers
        (each tcx link waits on the kernel, ~9 ms; after the counters, which would wait on
        the kernel behind them). `iptables_after` and `pod_rule_hits` wait for the counters,
        `close` for the whole."""
        if self._after_thread is not None:
            return
        tc, self.tc = self.tc, None

        def run() -> None:
            try:
                self._after = (self._read_nodes(), self._read_pods())
            except Exception:  # noqa: BLE001 (read again where asked for: the error shows there)
                self._after = None
            finally:
                self._after_read.set()
                if tc is not None:
                    tc.close()
        # not a daemon: the interpreter waits for it at exit, whatever happens meanwhile
        self._after_thread = threading.Thread(target=run, name="podtrace-after-window")
        self._after_thread.start()

    def close(self) -> None:
        """Remove the tc filters, then release the session; once, whatever happened before."""
        if self._closed:
            return
        self._closed = True
        with held_signals():
            try:
                if self._after_thread is not None:
                    self._after_thread.join()
                if self.tc is not None:
                    tc, self.tc = self.tc, None
                    tc.close()
            finally:
                self.session.close()

    def __enter__(self) -> "NodeRunner":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def held_signals():
    """SIGINT/SIGTERM/SIGHUP wait until the block is done, then act as they would have (a
    signal handler would otherwise raise in the middle of removing tc filters)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    prev = {s: signal.signal(s, lambda n, f: got.append(n)) for s in _HELD}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        if got:
            h = prev[got[0]]
            if callable(h):
                h(got[0], None)
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), got[0])
                time.sleep(0.1)   # the default action (termination) lands here


def _each(read, refs: dict) -> dict:
    """read(ref) for every ref, at once: each is a few short processes (iptables-save,
    ip6tables-save, nft) that mostly wait."""
    if len(refs) <= 1:
        return {k: read(r) for k, r in refs.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(refs)), thread_name_prefix="podtrace-counters") as ex:
        futures = {k: ex.submit(read, r) for k, r in refs.items()}
        return {k: f.result() for k, f in futures.items()}
