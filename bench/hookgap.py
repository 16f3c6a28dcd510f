"""Investigation: packets the tc observers record at every hop and the tracepoints at none.

A busy TCP flow (iperf3 at full speed, pod-1-1 → pod-2-1 of the bench lab) traced by one
session with the four tracepoint hooks and the tc observers on the path's 8 devices, with no
sampling and no event budget, for ROUNDS × SECONDS. Every packet (IP ID, length, TCP
sequence) is then counted by which kind of hook recorded it:

    both        tracepoint and tc events (12 + 8 on this path)
    tc_only     tc events, no tracepoint event at all
    tp_only     tracepoint events, no tc event

The session's `pt_rx`/`pt_tx` entry point is built with one extra counter at its very first
line (`entered`, in the slot of the `truncated` counter, which this flow never moves): if
`entered` equals the tracepoint events recorded, the entry programs were not run at all for
the tc-only packets (the kernel did not call them), rather than run and returned early.
`recursion_misses` (the kernel's count of skipped program runs) is reported beside it.

Each round runs twice, alternating the order: with the tc observers, and with the
tracepoints alone (what `flow` does by default where no other tc program runs). Packets the
tracepoints miss cannot be counted without a second view, so both runs also measure holes:
gaps in the TCP sequence space of the transfer's data at each tracepoint hook (TCP delivered
every byte, so a range no hook recorded is a burst of packets the tracepoints missed; a
retransmission of it would have filled it). For the CPUs that carried tc-only packets, it
also counts the tracepoint events of the flow on that CPU, and on the others, from the first
to the last tc event of those packets (`tc_only_bursts`).

With `--ftrace`, the kernel's own `net:netif_receive_skb` and `net:net_dev_start_xmit`
events are recorded beside, through tracefs (ftrace, not BPF), with the task that was running
on the CPU when each fired. Every firing of a data packet (len >= 1000) is then looked up
among the session's tracepoint events (same CPU, skb, device and direction, within 200 us),
and the firings are counted by that task: seen or missed. The tracefs settings it changes
are put back on exit. `--hog N` runs N CPU-bound processes during the
rounds, which makes the bursts more frequent.

    sudo .venv/bin/python bench/hookgap.py [--rounds 3] [--seconds 3]
    sudo .venv/bin/python bench/hookgap.py --rounds 4 --readers sleep,busy,lookups
    sudo .venv/bin/python bench/hookgap.py --rounds 12 --ftrace --hog 2
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np

import benchlib as L
from datapath import path_devices
from tracer.kernel import program
from tracer.kernel.hooks import BY_NAME, DEFAULT_HOOKS
from tracer.kernel.session import SessionConfig, Sink, TraceSession
from tracer.kernel.tc import TcAttacher

SRC, DST, PORT = "pod-1-1", "pod-2-1", 5215
ENTRY = "static __always_inline int at_device(void *ctx, const u8 *skb, s64 off, u8 hook) {\n    struct skb_view v;\n"
TP_HOOKS, TC_HOOKS = (1, 2), (20, 21)


def entry_counted(text: str) -> str:
    if ENTRY not in text:
        raise RuntimeError("bpf/podtrace.c changed: at_device() was not found")
    return text.replace(ENTRY, ENTRY + "    count(C_TRUNCATED);   /* bench/hookgap.py: entered */\n")


def _poll(session: TraceSession, reader: str) -> None:
    """One turn of the reading loop: `sleep` waits for events in epoll (as `flow` does),
    `busy` never sleeps, `lookups` also reads a per-CPU map 200 times from user space (each
    lookup holds the CPU's `bpf_prog_active` while in the kernel)."""
    if reader == "sleep":
        session.poll(50)
        return
    session.poll(0 if reader == "busy" else 1)
    if reader == "lookups":
        table = session.loaded.bpf["counters"]
        for _ in range(200):
            table[table.Key(0)]


class Ftrace:
    """The kernel's own net events in tracefs, on the same clock as BPF's (mono), with raw
    skb addresses; every setting it changes is put back as it was on exit."""

    T = "/sys/kernel/tracing/"
    EVENTS = ("events/net/netif_receive_skb/enable", "events/net/net_dev_start_xmit/enable")
    LINE = re.compile(r"^\s*(.*?)\s+\[(\d+)\]\s+\S+\s+(\d+)\.(\d+): (netif_receive_skb|net_dev_start_xmit): "
                      r"dev=(\S+) .*?skbaddr=(?:0x)?([0-9a-f]+) .*?\blen=(\d+)")

    def _read(self, name: str) -> str:
        with open(self.T + name) as f:
            return f.read().strip()

    def _write(self, name: str, value: str) -> None:
        with open(self.T + name, "w") as f:
            f.write(value)

    def _size(self) -> str:
        """The per-CPU buffer size to put back: "7 (expanded: 1408)" (never used yet) → 1408."""
        text = self._read("buffer_size_kb")
        m = re.search(r"expanded: (\d+)", text)
        return m.group(1) if m else text.split()[0]

    def __enter__(self) -> "Ftrace":
        clock = re.search(r"\[(\S+)\]", self._read("trace_clock"))
        self.saved = {"tracing_on": self._read("tracing_on"), "trace_clock": clock.group(1) if clock else "local",
                      "buffer_size_kb": self._size(),
                      "options/hash-ptr": self._read("options/hash-ptr"),
                      **{e: self._read(e) for e in self.EVENTS}}
        self._write("tracing_on", "0")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", "131072")
        self._write("options/hash-ptr", "0")
        for e in self.EVENTS:
            self._write(e, "1")
        return self

    def start(self) -> None:
        self._write("trace", "")
        self._write("tracing_on", "1")

    def stop(self) -> None:
        self._write("tracing_on", "0")

    def firings(self, cpus: int) -> list[tuple]:
        """(cpu, ts_ns, skb, device, hook, task) of every data-packet firing recorded."""
        out = []
        for cpu in range(cpus):
            with open(self.T + f"per_cpu/cpu{cpu}/trace") as f:
                for line in f:
                    m = self.LINE.search(line)
                    if m and int(m.group(8)) >= 1000:
                        ts = int(m.group(3)) * 1_000_000_000 + int(m.group(4).ljust(9, "0")[:9])
                        out.append((cpu, ts, int(m.group(7), 16), m.group(6), 1 if m.group(5) == "netif_receive_skb" else 2,
                                    m.group(1)))
        return out

    def __exit__(self, *exc) -> None:
        self._write("tracing_on", "0")
        for e in self.EVENTS:
            self._write(e, self.saved[e])
        self._write("trace", "")
        for name in ("buffer_size_kb", "options/hash-ptr", "trace_clock", "tracing_on"):
            self._write(name, self.saved[name])


def by_task(firings: list[tuple], tp) -> dict:
    """Each firing looked up among the session's tracepoint events: same CPU, skb, device
    and direction, the nearest within 200 us (ftrace prints microseconds, and its probe and
    ours run one after the other: tens of microseconds apart when the VM's CPU is taken
    away between them). {task's command: [seen, missed]}."""
    seen_at = defaultdict(list)
    for cpu, skb, dev, hook, ts in zip(tp.cpu.to_numpy(), tp.skb.to_numpy(), tp.ifname.astype(str).to_numpy(),
                                       tp.hook.astype(int).to_numpy(), tp.ts_ns.to_numpy()):
        seen_at[(int(cpu), int(skb), dev, int(hook))].append(int(ts))
    for v in seen_at.values():
        v.sort()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for cpu, ts, skb, dev, hook, task in firings:
        times = seen_at.get((cpu, skb, dev, hook), [])
        i = bisect.bisect_left(times, ts - 200_000)
        out[task.rpartition("-")[0]][0 if i < len(times) and times[i] <= ts + 200_000 else 1] += 1
    return dict(out)


def pid1_commands() -> list[str]:
    """The commands of PID 1's threads now (ftrace names a task by command and thread id)."""
    out = set()
    for tid in os.listdir("/proc/1/task"):
        try:
            with open(f"/proc/1/task/{tid}/comm") as f:
                out.add(f.read().strip())
        except OSError:
            continue
    return sorted(out)


def one_round(doc: dict, seconds: float, with_tc: bool = True, reader: str = "sleep",
              ftrace: Ftrace | None = None) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    hooks = [BY_NAME[n] for n in DEFAULT_HOOKS] + ([BY_NAME["tc:ingress"], BY_NAME["tc:egress"]] if with_tc else [])
    session = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], hooks=hooks, netns=L.lab_inodes(doc),
                                         budget=0, sample=1), sink=Sink())
    orig = program.source
    program.source = lambda files=None: entry_counted(orig(files))
    try:
        session.start()
    finally:
        program.source = orig
    attacher = None
    try:
        if with_tc:
            attacher = TcAttacher(session.loaded.bpf)
            for ns, dev in path_devices(doc):
                attacher.attach(ns, dev)
        with L.IperfServer(dst["netns"], PORT):
            if ftrace is not None:
                ftrace.start()
            client = L.iperf_client(src["netns"], dst["ip"], PORT, seconds)
            while client.poll() is None:
                _poll(session, reader)
            client.communicate()
            if ftrace is not None:
                ftrace.stop()
        session.drain()
        counters = session.counters()
        misses = session.missed_runs()
        df = session.frame()
    finally:
        if attacher is not None:
            attacher.close()
        session.close()
    hook = df["hook"].astype(int)
    df = df.assign(tp=hook.isin(TP_HOOKS), tc=hook.isin(TC_HOOKS))
    per = df[df.tp | df.tc].groupby(["ip_id", "ip_len", "tcp_seq"]).agg(tp=("tp", "sum"), tc=("tc", "sum"),
                                                                          cpu=("cpu", "min"))
    tc_only = per[(per.tp == 0) & (per.tc > 0)]
    holes = seq_holes(df[df.tp])
    quiet = blackout(df, tc_only.index)
    extra = {}
    if ftrace is not None:
        tasks = by_task(ftrace.firings(os.cpu_count() or 1), df[df.tp])
        extra = {"ftrace_by_task": tasks, "ftrace_missed": sum(v[1] for v in tasks.values()),
                 "ftrace_firings": sum(sum(v) for v in tasks.values())}
    return {**extra, "tc_observers": with_tc, "reader": reader, "packets": len(per), "both": int(((per.tp > 0) & (per.tc > 0)).sum()), "tc_only": len(tc_only),
            "tp_only": int(((per.tp > 0) & (per.tc == 0)).sum()),
            "tc_only_ip_len": sorted({int(x) for x in tc_only.index.get_level_values("ip_len")}),
            "tc_only_cpus": sorted({int(x) for x in tc_only.cpu}),
            "tracepoint_events": int(df.tp.sum()), "entered": counters["truncated"],
            "recursion_misses": misses, "lost": counters["lost"],
            "tracepoint_seq_holes": {"min": min(holes), "max": max(holes)} if holes else None,
            "tc_only_bursts": quiet}


def blackout(df, keys) -> list[dict]:
    """Per burst of tc-only packets (their tc events on one CPU, split where 1 ms passes
    without one): its span, its tc events, and the tracepoint events of the flow in that
    span on the same CPU and on the others (the tracepoints' view of that stretch)."""
    if not len(keys):
        return []
    tc = df[df.tc].set_index(["ip_id", "ip_len", "tcp_seq"]).loc[keys].reset_index()
    ts, cpu, tp = df.ts_ns.to_numpy().astype(np.int64), df.cpu.to_numpy(), df.tp.to_numpy()
    out = []
    for c, g in tc.groupby("cpu"):
        t = np.sort(g.ts_ns.to_numpy().astype(np.int64))
        cuts = np.flatnonzero(np.diff(t) > 1_000_000) + 1
        for part in np.split(t, cuts):
            t0, t1 = int(part[0]), int(part[-1])
            during = (ts >= t0) & (ts <= t1)
            out.append({"cpu": int(c), "span_us": round((t1 - t0) / 1e3, 1), "tc_events": len(part),
                        "tracepoint_events_same_cpu": int((during & tp & (cpu == c)).sum()),
                        "tracepoint_events_other_cpus": int((during & tp & (cpu != c)).sum())})
    return out


def seq_holes(tp) -> list[int]:
    """Per tracepoint hook (hook, device, namespace): how many gaps the data of the
    transfer's connection (the busiest) leaves in its TCP sequence space."""
    data = tp[tp.ip_len > 52]
    if data.empty:
        return []
    conn = data.groupby(["sport", "dport"]).size().idxmax()
    data = data[(data.sport == conn[0]) & (data.dport == conn[1])]
    out = []
    for _, g in data.groupby([data.hook.astype(int), data.ifname, data.netns]):
        g = g.sort_values("ts_ns")
        seq = g.tcp_seq.to_numpy().astype(np.int64)
        rel = (seq - seq[0]) % (1 << 32)
        rel[rel >= (1 << 31)] -= 1 << 32            # before the first packet: retransmissions
        order = np.argsort(rel, kind="stable")
        start = rel[order]
        end = start + (g.ip_len.to_numpy().astype(np.int64)[order] - 52)   # IP 20 + TCP 32 (timestamps)
        reach = np.maximum.accumulate(end)
        # a gap of a few bytes is a TCP header longer than assumed (options), not a packet
        out.append(int((start[1:] > reach[:-1] + 100).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--ftrace", action="store_true", help="record the kernel's own net events beside (tracefs) and "
                    "count the firings the session missed by the task running when they fired")
    ap.add_argument("--hog", type=int, default=0, help="CPU-bound processes to run during the rounds")
    ap.add_argument("--readers", default="", help="instead of with/without tc: rounds with the tc observers, "
                    "one per reading loop named (sleep,busy,lookups), in turn")
    a = ap.parse_args()
    doc, _ = L.lab()
    start = L.machine()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.hog)]
    try:
        run(a, doc, start)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def run(a, doc: dict, start: dict) -> None:
    if a.ftrace:
        with Ftrace() as ftrace:
            rounds = [one_round(doc, a.seconds, True, "sleep", ftrace) for _ in range(a.rounds)]
        missed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rounds:
            for task, (seen, miss) in r["ftrace_by_task"].items():
                missed[task][0] += seen
                missed[task][1] += miss
        L.emit({"benchmark": "hookgap", "mode": "ftrace", "flow": f"{SRC} → {DST}, iperf3 TCP at full speed",
                "seconds": a.seconds, "hogs": a.hog, "rounds": rounds,
                "tc_only_per_round": [r["tc_only"] for r in rounds],
                "ftrace_missed_per_round": [r["ftrace_missed"] for r in rounds],
                "seen_missed_by_task": dict(missed), "pid1_thread_commands": pid1_commands(),
                "machine_start": start, "machine_end": L.machine()})
        return
    if a.readers:
        rounds = [one_round(doc, a.seconds, True, reader) for _ in range(a.rounds) for reader in a.readers.split(",")]
        L.emit({"benchmark": "hookgap", "flow": f"{SRC} → {DST}, iperf3 TCP at full speed", "seconds": a.seconds,
                "rounds": rounds, "tc_only_per_reader": {
                    m: [r["tc_only"] for r in rounds if r["reader"] == m] for m in a.readers.split(",")},
                "machine_start": start, "machine_end": L.machine()})
        return
    rounds = [one_round(doc, a.seconds, tc) for i in range(a.rounds) for tc in ((True, False) if i % 2 == 0 else
                                                                                  (False, True))]
    with_tc = [r for r in rounds if r["tc_observers"]]
    alone = [r for r in rounds if not r["tc_observers"]]
    L.emit({"benchmark": "hookgap", "flow": f"{SRC} → {DST}, iperf3 TCP at full speed", "seconds": a.seconds,
            "rounds": rounds, "tc_only_per_10k": round(1e4 * sum(r["tc_only"] for r in with_tc)
                                                       / max(1, sum(r["packets"] for r in with_tc)), 2),
            "seq_holes_with_tc": [(r["tracepoint_seq_holes"] or {}).get("max") for r in with_tc],
            "seq_holes_tracepoints_alone": [(r["tracepoint_seq_holes"] or {}).get("max") for r in alone],
            "tc_only_bursts": [b for r in with_tc for b in r["tc_only_bursts"]],
            "entered_equals_tracepoint_events": all(abs(r["entered"] - r["tracepoint_events"]) <= 2 for r in rounds),
            "machine_start": start, "machine_end": L.machine()})


if __name__ == "__main__":
    main()
