"""The coordinator: runs one agent per node involved in a trace, merges their streams,
estimates the clock offsets between nodes from the traced packets themselves, and hands one
event table to reconstruction. Only the transport differs between the lab (a local process
per lab node) and a cluster (the agent server in the agent pod of each node, through the API
server's port-forward; or `podtrace agent` through the exec API, the fallback).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tracer.kernel import record as events
from tracer.agents import spawn, wire
from tracer.agents.request import AgentRequest
from tracer.errors import EnvironmentProblem

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd

READY_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 10
LAST_FLUSH_S = 0.15     # three of an agent's flush periods: the grace an agent without `drain` gets


@dataclass
class AgentPlan:
    node: str
    request: dict | AgentRequest

    @property
    def wire(self) -> dict:
        """The request as sent (a planner may hand over either form)."""
        return self.request.to_wire() if isinstance(self.request, AgentRequest) else self.request


@dataclass(frozen=True)
class Hello:
    """An agent's first report: what it traces with, on which kernel and clock."""

    node: str
    pid: int | None = None
    hooks: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    kernel: str | None = None
    clock_domain: str | None = None
    namespaces: dict = field(default_factory=dict)     # inode → {"ips": [...], "host": bool}
    timings: dict = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)  # the steering commands it understands

    @classmethod
    def from_wire(cls, d: dict) -> "Hello":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["node"] = str(known.get("node", ""))
        for k, typ in (("hooks", list), ("degraded", list), ("commands", list), ("namespaces", dict), ("timings", dict),
                       ("pid", (int, type(None))), ("kernel", (str, type(None))),
                       ("clock_domain", (str, type(None)))):
            if k in known and not isinstance(known[k], typ):
                raise ValueError(f"{k} has the wrong type")
        return cls(**known)


@dataclass
class AgentRun:
    plan: AgentPlan
    proc: object = None
    frames: queue.Queue = field(default_factory=queue.Queue)
    # batches of events as they came: record arrays, turned into their columns while the
    # trace runs (`split`), so that the merge after it only joins them
    chunks: list[np.ndarray | dict] = field(default_factory=list)
    n_split: int = 0
    split_sample: int = 1            # the sampling the batches in columns were cut down to
    received: int = 0                # events in `chunks` (counted as they come: a long watch has many)
    hello: Hello | None = None
    ready: bool = False
    probes: list[dict] | None = None
    progress: list[dict] = field(default_factory=list)   # each probe's outcome as it came ("probe" frames)
    facts: dict | None = None
    drained: dict | None = None
    window: int | None = None        # chunks inside the trace window (set when it ended)
    ready_ns: int | None = None      # since when it traced, on its own clock
    stop_ns: int | None = None       # until when (its drain), on its own clock
    counters: dict | None = None
    clocks: list[dict] = field(default_factory=list)
    ended: bool = False
    failure: str | None = None
    logs: list[str] = field(default_factory=list)
    sample: int = 1                  # 1 in N packets its kernel keeps (raised by its guard, or by us)
    sample_asked: bool = False       # it was sent a `sample` command (and so reports its raises)
    admitted: int = 0                # events put in columns, after the sampling of that moment

    def send(self, obj: dict) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def window_chunks(self) -> list[np.ndarray | dict]:
        """The chunks of events inside the trace window (all of them while it is open)."""
        return self.chunks if self.window is None else self.chunks[:self.window]

    def events(self) -> int:
        """Events received so far (inside the window or not)."""
        return self.received

    def split(self, sample: int = 1) -> None:
        """The window's batches not yet in columns, turned into them (and the records let go),
        keeping only the events of the packets that 1 in `sample` keeps (the sampling of
        every node now: the merge keeps no more). When it rose since the last call, the
        batches already in columns are cut down to it too."""
        if sample > self.split_sample:
            for i in range(self.n_split):   # filtering a batch twice keeps the same events
                self.chunks[i] = events.sampled(self.chunks[i], sample)
            self.split_sample = sample
        end = len(self.window_chunks())
        while self.n_split < end:    # Ctrl-C may land anywhere in here: each step stands alone
            if not isinstance(self.chunks[self.n_split], dict):
                self.chunks[self.n_split] = events.sampled(events.columns(self.chunks[self.n_split]),
                                                           self.split_sample)
                self.admitted += events.count(self.chunks[self.n_split])
            self.n_split += 1


class LocalTransport:
    """An agent as a local process (the lab): `python -m tracer.cli agent`, one started
    early (`spawn.Early`) when there is one, unless a test gives this node's agent its own
    variables."""

    def __init__(self, extra_env: dict[str, dict[str, str]] | None = None, early: spawn.Early | None = None):
        self.extra_env = extra_env or {}
        self.early = early

    def start(self, plan: AgentPlan):
        extra = self.extra_env.get(plan.node)
        proc = self.early.take() if self.early is not None and not extra else None
        return proc or spawn.start(dict(os.environ, **(extra or {})))

    def started(self) -> None:
        """Every agent started: the early processes not taken go (they were sent nothing)."""
        if self.early is not None:
            self.early.close()


def _reader(run: AgentRun) -> None:
    try:
        for fr in wire.read(run.proc.stdout):
            run.frames.put(fr)
    except wire.WireError as exc:
        run.frames.put(("wire-error", str(exc)))
    run.frames.put(("eof", None))


def _absorb(run: AgentRun, block: float = 0.0) -> None:
    """Take every frame that has arrived (waiting up to `block` seconds for the first)."""
    timeout = block
    while True:
        try:
            item = run.frames.get(timeout=timeout) if timeout else run.frames.get_nowait()
        except queue.Empty:
            return
        timeout = 0
        if isinstance(item, tuple):
            what, detail = item
            if what == "wire-error" and not run.failure:
                run.failure = f"the agent's stream is corrupt: {detail}"
            elif what == "eof" and not run.ended and not run.failure:
                rc = run.proc.poll()
                err = (run.proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()[-1:] \
                    if run.proc.stderr and rc is not None else []
                run.failure = f"the agent stopped before the end (exit {rc}{': ' + err[0] if err else ''})"
            continue
        fr = item
        if fr.kind == "events":
            if len(fr.payload) % events.EVENT_DTYPE.itemsize:
                run.failure = "an events frame does not hold whole records"
                continue
            run.chunks.append(np.frombuffer(fr.payload, dtype=events.EVENT_DTYPE))
            run.received += len(run.chunks[-1])
            continue
        try:   # a CRC-valid frame is still only as good as the agent that wrote it
            doc = fr.json()
        except ValueError:
            doc = None
        if not (isinstance(doc, dict) or (fr.kind == "probes" and isinstance(doc, list))):
            run.failure = run.failure or f"the agent sent an unreadable {fr.kind} frame"
            continue
        if fr.kind == "hello":
            try:
                run.hello = Hello.from_wire(doc)
            except (TypeError, ValueError) as exc:
                run.failure = run.failure or f"the agent sent an unreadable hello frame ({exc})"
        elif fr.kind == "ready":
            run.ready = True
            run.ready_ns = _ns(doc.get("t_ns"))
        elif fr.kind == "probes":
            run.probes = doc
        elif fr.kind == "probe":
            run.progress.append(doc)
        elif fr.kind == "drained":
            run.drained = doc
            run.window = len(run.chunks)   # the agent flushed everything before this frame
            run.stop_ns = _ns(doc.get("t_ns"))
        elif fr.kind == "facts":
            run.facts = doc
        elif fr.kind == "counters":
            run.counters = doc
        elif fr.kind == "clock":
            run.clocks.append(doc)
        elif fr.kind == "error":
            run.failure = str(doc.get("message", "agent error"))
        elif fr.kind == "log":
            run.logs.append(str(doc.get("message", "")))
        elif fr.kind == "sample":
            n = doc.get("n")
            if isinstance(n, int) and not isinstance(n, bool) and n > run.sample:
                run.sample = n
        elif fr.kind == "end":
            run.ended = True


def _ns(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def spans(runs: list[AgentRun]) -> dict[str, tuple[int | None, int | None]]:
    """node → (ready, stop) of each agent that traced, on its own clock. An agent older
    than `t_ns` in its frames: its first clock reading (sent just before `ready`)."""
    out = {}
    for r in runs:
        if not r.ready:
            continue
        ready = r.ready_ns
        if ready is None:
            ready = next((_ns(c.get("monotonic_ns")) for c in r.clocks if "monotonic_ns" in c), None)
        out[r.plan.node] = (ready, r.stop_ns)
    return out


def gaps(runs: list[AgentRun]) -> dict[str, list[tuple[int, int]]]:
    """node → the intervals (on its own clock) in which its kernel refused events, as its
    `drained` frame reports them (agents older than that report none)."""
    out = {}
    for r in runs:
        got = (r.drained or {}).get("gaps") or []
        ok = [(int(a), int(b)) for a, b in (g for g in got if isinstance(g, (list, tuple)) and len(g) == 2)
              if _ns(a) is not None and _ns(b) is not None]
        if ok:
            out[r.plan.node] = ok
    return out


def samples(runs: list[AgentRun]) -> dict[str, int]:
    """node → 1 in N packets its kernel kept at the end (the guard may have raised it)."""
    out = {}
    for r in runs:
        n = (r.drained or {}).get("sample")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            out[r.plan.node] = n
    return out


class Coordinator:
    def __init__(self, plans: list[AgentPlan], transport, say=lambda m: None, budget: int = 0):
        self.runs = [AgentRun(p) for p in plans]
        self.transport = transport
        self.say = say
        # The merge's own guard: at most `budget` events a second of the watch, all nodes
        # together (each node's kernel keeps its own budget; a flow crossing three nodes
        # would otherwise bring three budgets' worth to one merge). 0: none.
        self.budget = budget
        self.merge_sample = 1            # 1 in N packets the merge keeps (raised by its guard)
        self._guarded: tuple[float, int, int] | None = None     # (when, events admitted, sampling) at the last check

    def __enter__(self):
        try:
            for run in self.runs:
                run.proc = self.transport.start(run.plan)
                run.send(run.plan.wire)
                threading.Thread(target=_reader, args=(run,), daemon=True).start()
            if hasattr(self.transport, "started"):
                self.transport.started()
        except BaseException:
            self.stop()      # agents already started must not outlive a failed start
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for run in self.runs:
                _absorb(run, 0.02)
            bad = [r for r in self.runs if r.failure and not r.ready]
            if bad:
                self.stop()
                r = bad[0]
                raise EnvironmentProblem(f"the agent for {r.plan.node} could not start: {r.failure}",
                                         "run `podtrace doctor` on that node")
            if all(r.ready for r in self.runs):
                return
            if time.monotonic() > deadline:
                self.stop()
                late = [r.plan.node for r in self.runs if not r.ready]
                raise EnvironmentProblem(f"agents for {', '.join(late)} did not get ready in {READY_TIMEOUT_S}s",
                                         "check the agent pods (kubectl -n podtrace get pods)")

    def run(self, node: str, cmd: dict) -> None:
        for r in self.runs:
            if r.plan.node == node:
                r.send(cmd)

    def broadcast(self, cmd: dict) -> None:
        for r in self.runs:
            r.send(cmd)

    def pump(self, seconds: float) -> None:
        """Take the agents' frames for `seconds`; the events that came are put in columns
        meanwhile (work the merge after the watch would otherwise do)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for r in self.runs:
                _absorb(r, 0.01)
            self.spread_sample()
        self.split()
        self.guard()

    def sampling(self) -> int:
        """1 in N packets every node keeps now, and the merge with them."""
        return max([1, self.merge_sample, *(r.sample for r in self.runs), *samples(self.runs).values()])

    def split(self) -> None:
        """Every agent's batches in columns, with the sampling every node has now."""
        n = self.sampling()
        for r in self.runs:
            r.split(n)

    def guard(self, now: float | None = None) -> int | None:
        """At most once a second: when the events put in columns since the last check came
        faster than `budget` a second, raise the merge's sampling (a power of two, as a node's
        guard does, at most MAX_SAMPLE); the agents are told with their next `sample`, and
        the batches already in columns are cut down at the next split. Returns the new
        sampling when it rose."""
        if not self.budget:
            return None
        from tracer.runs.node import MAX_SAMPLE   # as far as a node's guard raises it

        now = time.monotonic() if now is None else now
        admitted, current = sum(r.admitted for r in self.runs), self.sampling()
        if self._guarded is None:
            self._guarded = (now, admitted, current)
            return None
        since, before, then = self._guarded
        if now - since < 1.0:
            return None
        self._guarded = (now, admitted, current)
        # the events came with the sampling of the last check; a node's guard may have
        # raised it since: what would come now
        rate = (admitted - before) / (now - since) * then / current
        if rate <= self.budget or current >= MAX_SAMPLE:
            return None
        factor = 2
        while current * factor < MAX_SAMPLE and self.budget * factor < 1.25 * rate:
            factor *= 2
        self.merge_sample = min(MAX_SAMPLE, current * factor)
        self._guarded = (now, admitted, self.merge_sample)
        self.spread_sample()
        self.split()
        return self.merge_sample

    def spread_sample(self) -> None:
        """When one agent's guard raised its sampling, every agent keeps the same packets:
        the others are told to raise theirs to it (the packets a node kept and the next one
        dropped would only be thrown away at the merge)."""
        n = max([self.merge_sample, *(r.sample for r in self.runs)])
        for r in self.runs:
            if not (r.hello and "sample" in r.hello.commands) or r.failure or r.ended:
                continue
            if r.sample < n or not r.sample_asked:   # the first one also asks for its reports
                r.send({"cmd": "sample", "n": n})
                r.sample, r.sample_asked = n, True

    def wait_for(self, pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for r in self.runs:
                _absorb(r, 0.01)
            self.spread_sample()
            if pred():
                return True
            if all(r.failure or r.ended for r in self.runs):
                return pred()
        return pred()

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """End the trace window: every agent delivers the events it has seen, and what it
        sends after its `drained` frame stays out of `merged()`, as events after the drain
        stay out of a single-process trace. An agent too old to know `drain` gets the old
        grace instead (LAST_FLUSH_S of its periodic flushes)."""
        live = [r for r in self.runs if not (r.failure or r.ended)]
        asked = [r for r in live if r.hello and "drain" in r.hello.commands]
        for r in asked:
            r.send({"cmd": "drain"})
        if len(asked) < len(live):
            self.pump(LAST_FLUSH_S)
            for r in live:
                if r not in asked:
                    r.window = len(r.chunks)
        self.wait_for(lambda: all(r.drained is not None or r.failure or r.ended for r in asked), timeout)

    def stop(self, timeout: float = 10) -> None:
        self.broadcast({"cmd": "stop"})
        end = time.monotonic() + timeout
        for r in self.runs:
            if r.proc is None:
                continue
            with_stdin = getattr(r.proc, "stdin", None)
            while not (r.ended or r.failure) and time.monotonic() < end:
                _absorb(r, 0.05)
            if with_stdin:
                try:
                    with_stdin.close()
                except OSError:
                    pass
            try:
                r.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Ask before killing: on SIGTERM an agent still removes its tc filters.
                if hasattr(r.proc, "terminate"):
                    r.proc.terminate()
                    try:
                        r.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
            _absorb(r)

    def merged(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """All agents' events in one set of columns (`record.columns`: what `record.to_frame`
        takes), and which agent (index into runs) each came from."""
        self.split()
        parts = [r.window_chunks() for r in self.runs]
        origin = np.repeat(np.arange(len(parts), dtype=np.int16), [sum(events.count(c) for c in cs) for cs in parts])
        # one copy of every agent's columns, not one per agent and then one of all (a busy
        # watch brings tens of MB of them)
        return events.join_columns([c for cs in parts for c in cs]), origin


def realtime_offsets(clocks: list[list[dict]], ref: int, domains: dict[int, str | None]) -> dict[int, int]:
    """Coarse clock offset of every agent off the reference's clock (another booted kernel):
    the difference of its (monotonic − realtime) to the reference's, from each agent's first
    `clock` reading. Realtime clocks agree to NTP's precision; monotonic ones by uptime only."""
    def skew(readings):
        r = next((c for c in readings if "monotonic_ns" in c and "realtime_ns" in c), None)
        return None if r is None else int(r["monotonic_ns"]) - int(r["realtime_ns"])
    if ref >= len(clocks) or (base := skew(clocks[ref])) is None:
        return {}
    out = {}
    for i, readings in enumerate(clocks):
        if i == ref or domains.get(i) is None or domains.get(i) == domains.get(ref):
            continue
        s = skew(readings)
        if s is not None:
            out[i] = s - base
    return out


def estimate_offsets(df: pd.DataFrame, ref: int, client_ip: str,
                     domains: dict[int, str] | None = None) -> dict[int, dict]:
    """Clock offset of every agent relative to agent `ref`, from packets both saw.

    A packet is a request when the client (`client_ip`) sent it, a reply when it was sent
    to the client. For a request that left `ref` and reached X: a = first(X) - last(ref) =
    d + θ; for a reply X → ref: b = first(ref) - last(X) = d' - θ. The smallest of each (the
    packets that waited least) with d ≈ d' gives θ = (min(a) - min(b)) / 2. Agents in the
    clock domain of `ref` (same booted kernel) get 0 without estimation. Whole columns only:
    a busy flow has hundreds of thousands of packets.
    """
    import pandas as pd
    out: dict[int, dict] = {}
    if df.empty:
        return out
    domains = domains or {}
    # Every agent on the reference's clock counts as the reference: the nearest hop on that
    # clock (e.g. the lab fabric's port next to X) gives the tightest bound.
    refs = {ref} | {i for i, d in domains.items() if d is not None and d == domains.get(ref)}
    others = sorted(set(df["agent"].unique().tolist()) - refs)
    if not others:
        return out
    seen = df[df["pkt"] >= 0]
    pkt = seen["pkt"].to_numpy()
    side = np.where(seen["agent"].isin(list(refs)).to_numpy(), -1, seen["agent"].to_numpy())
    req = pd.Series((seen["saddr_str"] == client_ip).to_numpy()).groupby(pkt).any()
    rep = pd.Series((seen["daddr_str"] == client_ip).to_numpy()).groupby(pkt).any()
    direction = pd.Series(np.where(req.to_numpy(), 1, np.where(rep.to_numpy(), 2, 0)), index=req.index)
    g = pd.Series(seen["ts_ns"].to_numpy()).groupby([pkt, side]).agg(["min", "max"])
    sides = g.index.get_level_values(1)
    at_ref = g[sides == -1].droplevel(1)
    for x in others:
        at_x = g[sides == x].droplevel(1)
        both = at_x.merge(at_ref, left_index=True, right_index=True, suffixes=("_x", "_r"), how="inner")
        if both.empty:
            continue
        d = direction.reindex(both.index).to_numpy()
        a_vals = (both["min_x"] - both["max_r"]).to_numpy()[d == 1]
        b_vals = (both["min_r"] - both["max_x"]).to_numpy()[d == 2]
        if len(a_vals) and len(b_vals):
            a, b = float(a_vals.min()), float(b_vals.min())
            out[int(x)] = {"offset_ns": int((a - b) / 2), "pairs": int(min(len(a_vals), len(b_vals))),
                           "one_way_ns": int((a + b) / 2)}
    return out
