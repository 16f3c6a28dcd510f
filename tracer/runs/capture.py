"""`podtrace capture`: record the hop events of a selection of traffic to a Parquet trace file.

It records for as long as asked or until Ctrl-C, in bounded memory, through the node runner
(tracer/runs/node.py). The selection (tracer/runs/selection.py: pods, namespaces, Services,
nodes, CIDRs, ports, or all pod traffic) becomes the in-kernel filter: addresses in the `addrs` hash, CIDRs in the `cidrs` LPM trie, ports
in the `ports` set (bpf/podtrace.c, `wanted()`). In the lab, events are also limited to the
lab's network namespaces (this machine may host other labs with the very same addresses).

Events go ring buffer → the session's `Sink` (numpy chunks; with its limit it pauses the
poll once it holds two row groups' worth) → `Spool` (scope filter, live statistics) → `tracefile.Writer` (one Parquet
row group per `row_group_events`; until the end, an Arrow stream `FILE.part` that a killed
capture leaves readable). Events the kernel could not hand over (ring buffer full)
are counted by the kernel (`lost`) and written into the file's counters and its loss
timeline: never silent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from tracer import settings, tracefile
from tracer.kernel import program
from tracer.cluster import inventory
from tracer.kernel import formats
from tracer.errors import BadInput, EnvironmentProblem, PodtraceError
from tracer.reconstruct import drops, window
from tracer.kernel.session import Sink
from tracer.runs.selection import Resolved, Selection, cluster_streams, resolve
from tracer.runs.spool import Spool

CaptureSink = Sink     # the capture's sink: the session's, with a limit of waiting events

# Events waiting for a full row group reach the disk after at most this long (what a SIGKILL
# can lose: the last FLUSH_S seconds, or one row group at high rates).
FLUSH_S = 5.0
# kfree_skb reasons of a socket's own cleanup (close, purge): not counted as drops live
HOUSEKEEPING_DROPS = drops.HOUSEKEEPING_DROPS


@dataclass
class CaptureConfig:
    selection: Selection
    output: str
    duration: float | None = None       # None: until Ctrl-C / SIGTERM / stop event
    cluster: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    lab_prefix: str = field(default_factory=settings.lab_prefix)
    row_group_events: int = tracefile.ROW_GROUP_EVENTS
    ringbuf_pages: int = 1024           # 4 MiB, as every session; `--ringbuf-pages` for busier selections
    tc: bool = False                    # tc observers on the lab's devices (doubles events per hop)
    lab_scope: bool = True              # in the lab: only events from the lab's namespaces
    on_node: str | None = None          # in the lab: only that node's namespaces, as a capture on that node
    progress_every: float = 0.25


@dataclass
class CaptureResult:
    path: Path
    events: int
    packets: int
    drops: int
    counters: dict
    elapsed_s: float
    stopped_by: str
    row_groups: int
    selection: Resolved
    notes: list[str] = field(default_factory=list)
    stack_drops: int = 0      # a socket's own cleanup (TCP_ABORT_ON_DATA, SOCKET_CLOSE…): not counted in drops


class _Stop:
    """SIGINT/SIGTERM/SIGHUP end the capture normally (the file is finished and moved into
    place). A second signal while finishing aborts (KeyboardInterrupt)."""

    _BY = {signal.SIGINT: "interrupt", signal.SIGTERM: "sigterm", signal.SIGHUP: "sighup"}

    def __init__(self, event: threading.Event | None):
        self.event = event or threading.Event()
        self.by: str | None = None
        self._prev: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._BY:
                if signal.getsignal(sig) is not signal.SIG_IGN:   # `nohup` keeps its meaning
                    self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.by = self._BY.get(signum, "sigterm")
        self.event.set()

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        return False


# ---------------------------------------------------------------------------------------
# The run

def _inventory(cfg: CaptureConfig):
    """(inventory, local topology, live source): --cluster FILE, else the kubeconfig /
    in-cluster config — listed, then watched for the whole capture (`source`, to stop) —
    else the lab's topology."""
    from tracer.cluster import api
    from tracer.cluster import sources
    from tracer.cluster.watch import ClusterSource

    if not cfg.cluster:
        ref = api.find_config(cfg.kubeconfig, cfg.context)
        if ref is not None:
            conn = api.connect(cfg.kubeconfig, cfg.context, ref=ref)
            source = ClusterSource(conn, cluster_streams(cfg.selection))
            try:
                inv = source.start()
            except BaseException:
                source.stop()
                conn.close()
                raise
            return inv, None, source
    view = sources.load(cfg.cluster, cfg.kubeconfig, cfg.context, cfg.lab_prefix)   # no API here: asked above
    return view.inv, view.topology, None


class _Membership:
    """A capture in a cluster follows its selection: when a pod it selects appears, moves
    or goes, the kernel's address filter changes with it (applied from the capture loop,
    never from the watch threads), and each change is recorded for the file."""

    def __init__(self, source, sel: Selection, resolved: Resolved, session, local: "_LocalNode", spool: "Spool"):
        self.source, self.sel, self.session, self.local, self.spool = source, sel, session, local, spool
        self.addrs = set(resolved.addrs)
        self.generation = source.generation
        self.changes: list[list] = []
        self.seen = dict(source.inventory.pods)
        self.problem: str | None = None

    def update(self, t_s: float) -> None:
        if self.source.generation == self.generation:
            return
        with self.source.lock:
            self.generation = self.source.generation
            inv = self.source.inventory
            try:
                now = set(resolve(self.sel, inv).addrs)
                self.problem = None
            except BadInput as exc:   # e.g. the namespace has no pod left: keep the filter
                if self.problem != exc.line():
                    self.problem = exc.line()
                    self.changes.append([round(t_s, 3), "unresolved", None, self.problem])
                return
            owner = {ip: key for ip, (kind, key) in inv.by_ip().items() if kind == "pod"}
            added, removed = sorted(now - self.addrs), sorted(self.addrs - now)
            self.seen.update(inv.pods)
        if added and self.local.scope is not None:
            with self.source.lock:
                new_ns = self.local.refresh(self.source.inventory)
            self.session.allow_netns(new_ns)
            self.spool.widen(new_ns)
        if added or removed:
            self.session.set_addrs(add=added, remove=removed)
            self.changes += [[round(t_s, 3), "added", ip, owner.get(ip)] for ip in added]
            self.changes += [[round(t_s, 3), "removed", ip, self._was(ip)] for ip in removed]
            self.addrs = now

    def _was(self, ip: str) -> str | None:
        return next((k for k, p in self.seen.items() if ip in p.addresses()), None)

    def gone(self) -> list:
        """Pods seen during the capture that are no longer in the inventory (their events
        are still in the file and still need a name)."""
        with self.source.lock:
            current = set(self.source.inventory.pods)
        return [p for k, p in self.seen.items() if k not in current]


def run_capture(cfg: CaptureConfig, progress: Callable[[dict], None] | None = None,
                stop: threading.Event | None = None) -> CaptureResult:
    """Capture until cfg.duration passes, SIGINT/SIGTERM arrive or `stop` is set."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("capturing needs root (CAP_BPF, CAP_SYS_ADMIN)", "run it again with sudo")
    if cfg.duration is not None and cfg.duration <= 0:
        raise BadInput("--duration must be positive", "e.g. --duration 30, or leave it out and stop with Ctrl-C")
    if cfg.row_group_events < 1024:
        raise BadInput("--row-group must be at least 1024 events")
    inv, topo, source = _inventory(cfg)
    try:
        return _run(cfg, progress, stop, inv, topo, source)
    finally:
        if source is not None:
            source.stop()
            source.conn.close()


def _run(cfg: CaptureConfig, progress, stop, inv, topo, source) -> CaptureResult:
    from tracer.runs.node import NodeJob, NodeRunner
    from tracer.runs.plan import placement as placement_of

    out = Path(cfg.output)
    sel = resolve(cfg.selection, inv)
    placement = placement_of(topo)
    scope = set(placement.netns) if (topo and cfg.lab_scope and placement.netns) else None
    if cfg.on_node:
        scope = {ino for ino, (n, _) in placement.netns.items() if n == cfg.on_node} if topo else set()
        if not scope:
            raise BadInput(f"--on-node {cfg.on_node}: no such lab node",
                           "give a node of `podtrace lab status` (in a cluster, run capture on that node)")
    local = None
    if source is not None:
        local = _LocalNode(inv, placement)
        scope = local.scope
    drop_reasons = formats.drop_reasons()
    ct_names = program.ct_info_names()
    runner = NodeRunner(NodeJob(addrs=sel.addrs, tc=cfg.tc, tc_devices=topo.devices()[: program.TC_SLOTS] if (cfg.tc and topo) else [],
                                tc_observers="all",    # --tc: the user asked for them
                                netns=sorted(scope | {0}) if scope else None, match_either=True,
                                ringbuf_pages=cfg.ringbuf_pages, cidrs=sel.cidrs, ports=sel.ports,
                                any_addr=sel.any_addr, sink_limit=2 * cfg.row_group_events))
    hooks, degraded = runner.hooks, runner.degraded
    notes = list(degraded)
    sink, session = runner.sink, runner.session
    started_ns = time.time_ns()
    # What is known now goes into the file at once: a capture killed before it finishes is
    # still salvaged (`podtrace cleanup`) with its selection, cluster and placement.
    start_meta = {
        "kind": "capture",
        "selection": {"asked": _asked(cfg.selection), "resolved": sel.as_json()},
        "placement": {str(k): list(v) for k, v in placement.netns.items()},
        **tracefile.cluster_meta(inv, topo),
        "drop_reasons": {str(k): v for k, v in drop_reasons.items()},
        "ct_info_names": {str(k): v for k, v in ct_names.items()},
        "hooks": [h.name for h in hooks], "degraded": degraded,
        "scope": ({"lab": topo.labels.get("prefix") if topo else None, "netns": sorted(scope)} if scope else None),
        "started_ns": started_ns, "ringbuf_pages": cfg.ringbuf_pages, "row_group_events": cfg.row_group_events,
        "observer": cfg.on_node or _node_name(),
    }
    writer = tracefile.Writer(out, row_group_events=cfg.row_group_events, meta=start_meta)
    spool = Spool(writer, scope, {k for k, v in drop_reasons.items() if v in HOUSEKEEPING_DROPS})
    spool.rule = drops.rule(start_meta)   # the drop rule analyze applies to the file
    say = progress or (lambda d: None)
    timeline: list[list] = []
    stopper = _Stop(stop)
    stopped_by = "duration"
    finished = False
    members = None
    try:
        with stopper:
            runner.start(stop=stopper.event)
            if source is not None:
                members = _Membership(source, cfg.selection, sel, session, local, spool)
            t0 = time.monotonic()
            t0_mono_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the clock of ts_ns
            next_report = t0
            next_sample = t0 + 1.0
            end = t0 + cfg.duration if cfg.duration else None
            while not stopper.event.is_set():
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                wait = 0.1 if end is None else max(0.0, min(0.1, end - now))
                runner.poll(int(wait * 1000))
                for chunk in sink.take():
                    spool.add(chunk)
                now = time.monotonic()
                if members is not None:
                    members.update(now - t0)
                if now >= next_report or now >= next_sample:
                    c = runner.counters()
                    if now >= next_sample:
                        timeline.append([round(now - t0, 3), c["emitted"], c["lost"]])
                        next_sample = now + 1.0
                        writer.flush_older_than(FLUSH_S)
                    if now >= next_report:
                        say(_live(now - t0, spool, c, writer, cfg.duration))
                        next_report = now + cfg.progress_every
            if stopper.by:
                stopped_by = stopper.by
            elif stop is not None and stop.is_set():
                stopped_by = "stopped"
            stopped_mono_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            runner.drain()
            for chunk in sink.take():
                spool.add(chunk)
            elapsed = time.monotonic() - t0
            counters = runner.counters()
            timeline.append([round(elapsed, 3), counters["emitted"], counters["lost"]])
            locations = {str(a): s for a, s in sorted(runner.symbols(spool.locations).items())}
            runner.close()
            counters.update(events_written=spool.events, out_of_scope=spool.out_of_scope,
                            drops_seen=spool.drops, stack_drops_seen=spool.stack_drops)
            if counters.get("lost"):
                notes.append(f"{counters['lost']} events were lost (ring buffer full); the paths may have gaps")
            meta = {
                **start_meta,
                **(_final_cluster(source, members, topo) if members is not None else {}),
                "locations": locations,
                "started_mono_ns": t0_mono_ns, "stopped_ns": time.time_ns(), "duration_s": round(elapsed, 3),
                # when this observer traced (every hook attached → drained), for analyze's partial views
                "window": window.Window({start_meta["observer"]: (t0_mono_ns, stopped_mono_ns)}).as_json(),
                "stopped_by": stopped_by,
                # t_s: seconds since started_mono_ns (the ts_ns clock); cumulative counters
                "loss_timeline": {"columns": ["t_s", "emitted", "lost"], "rows": _thin(timeline)},
                "notes": notes,
                "created_ns": time.time_ns(),
            }
            path = writer.close(meta, counters)
            finished = True
    finally:
        runner.close()
        if not finished:
            writer.abort()
    say(_live(elapsed, spool, counters, writer, cfg.duration, done=True))
    return CaptureResult(path, spool.events, spool.packets, spool.drops, counters, elapsed, stopped_by,
                         writer.row_groups, sel, notes, stack_drops=spool.stack_drops)


class _LocalNode:
    """A capture in a cluster runs on a node: it traces this node's namespace and its pods'
    (host veth → peer namespace; the uplinks excluded), and names the pods it recognises.
    Other nodes sharing the kernel (kind, the lab) are not this node's to record. Without a
    veth-based CNI nothing is found and the whole kernel is traced (scope None)."""

    def __init__(self, inv: inventory.Inventory, placement):
        self.placement = placement
        self.scope: set[int] | None = None
        self.refresh(inv)

    def refresh(self, inv: inventory.Inventory) -> list[int]:
        """Look again (a pod started here since); the namespaces new to the scope."""
        from tracer.node import pods as nodepods

        try:
            host, owners, _ = nodepods.local_pods(inv, [a for n in inv.nodes.values() for a in n.internal_ips()], cri=True)
        except (PodtraceError, OSError):
            return []
        for o in owners.values():
            if o.pod and o.pod in inv.pods:
                self.placement.netns[o.netns_inode] = (inv.pods[o.pod].node, o.pod)
        if not owners:
            return []
        found = {host} | {o.netns_inode for o in owners.values()}
        if self.scope is None:
            self.scope = found
            return sorted(found)
        new = sorted(found - self.scope)
        self.scope.update(new)        # in place: the Spool filters by this very set
        return new


def _final_cluster(source, members: _Membership, topo) -> dict:
    """The cluster as the capture ended, plus the pods that went during it, and the
    selection's changes (t_s since the start, change, address, pod)."""
    with source.lock:
        out = tracefile.cluster_meta(source.inventory, topo)
    out["pods"] += [{"key": p.key, "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                     "netns_inode": None, "gone": True} for p in members.gone()]
    out["membership_changes"] = {"columns": ["t_s", "change", "ip", "pod"], "rows": members.changes}
    return out


def _node_name() -> str:
    """The observer a capture names itself by outside the lab: this machine (the node)."""
    import socket

    return socket.gethostname()


def _asked(sel: Selection) -> dict:
    return {k: v for k, v in sel.__dict__.items() if v}


def _thin(rows: list[list], limit: int = 4000) -> list[list]:
    """At most `limit` timeline samples, evenly spread (a day-long capture has 86400)."""
    if len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]


def _live(elapsed: float, spool: Spool, counters: dict, writer: tracefile.Writer, duration,
          done: bool = False) -> dict:
    return {"elapsed_s": elapsed, "duration_s": duration, "events": spool.events, "packets": spool.packets,
            "drops": spool.drops, "stack_drops": spool.stack_drops, "lost": int(counters.get("lost", 0)), "file_bytes": writer.bytes_hint,
            "row_groups": writer.row_groups, "done": done}
