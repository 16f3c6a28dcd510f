"""Benchmark: what tracing costs the datapath.

Between a pod on node-1 and a pod on node-2 of the bench lab (VXLAN across the fabric),
interleaved rounds of iperf3 TCP throughput and 64-byte UDP packet rate (`-u -l 64 -b 0`:
as fast as the sender can) for each variant:

- untraced
- nomatch:    a TraceSession whose filter holds two other pods (every packet of the flow is
              parsed and looked up, none matches)
- match:      the filter holds both ends: every packet of the flow is an event on every
              hop; the ring buffer is drained continuously by the session as it is
              (tracer/ringbuf.py: batches from the mmap'd pages into numpy chunks); events
              lost are the kernel's `lost` counter
- nomatch_tc / match_tc: the same with tc clsact observers on the path's devices
- match_callback: `match` drained by BCC's per-record callback (the session's reader
              before tracer/ringbuf.py, and still off x86-64)
- *_noprefilter: without the bit arrays in front of the addrs/tracked hash lookups
- *_perf:     the tracepoint hooks as perf-event tracepoints (PODTRACE_TRACEPOINTS=perf,
              the fallback) instead of the default raw tracepoints
- *_empty, *_noct, *_noemit: kernel-side variants of bpf/podtrace.c built in memory by
              bench/bpfvariants.py: rx/tx hooks that return at once (the cost of the hook
              itself); events without the conntrack view; matched packets followed but no
              record written. (`_raw`, `_fewreads`, `_earlysample` and `_freefix`, measured here
              first, are now part of bpf/podtrace.c.)
- *_sN:       in-kernel sampling, 1 packet in N (SessionConfig.sample)
- *_guard:    as `flow` runs by default: the event budget of `--max-events` (50,000 events
              a second per node) and its guard, which raises the sampling (1 in 2, 4, …)
              once a second while the kernel refuses events; each run starts at 1 in 1
- tcpdump_nomatch / tcpdump_match: what an on-call engineer runs instead: `tcpdump -s 128
              -w FILE` on every device of the path (both pods' eth0, the host veths, the
              bridges, the overlays, the uplinks and the fabric ports: 12 here), with a
              filter that holds two other pods' addresses (nomatch), or both ends' addresses
              and the overlay's UDP port (match: every packet of the flow, written)

Each round runs every variant once (A B C … A B C …); ratios are taken against the
untraced run of the same round, then the median (and min/max) over rounds is printed.
Besides rates, the sender's CPU per UDP packet (iperf3's accounting of its own user +
system time): in the lab the whole path to the other pod runs as softirq inline in the
sender's system calls, so it is the CPU a packet costs, which other load disturbs less
than a rate. `--bpf-stats` adds the kernel's ns per BPF program run.

    .venv/bin/python bench/datapath.py [--rounds 5] [--seconds 3] [--variants untraced,nomatch,match]
    .venv/bin/python bench/datapath.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import time

import numpy as np

import benchlib as L
from tracer.kernel.hooks import BY_NAME, DEFAULT_HOOKS
from tracer.kernel.session import SessionConfig, Sink, TraceSession
from tracer.runs.node import NodeRunner

MODIFIERS = ("tc", "callback", "perf", "empty", "noprefilter", "noct", "noemit", "guard")
BUDGET = 50_000     # flow's default --max-events
DEFAULT = ["untraced", "nomatch", "match", "nomatch_tc", "match_tc", "match_callback"]
SRC, DST, OTHER_A, OTHER_B = "pod-1-1", "pod-2-1", "pod-1-2", "pod-2-2"
TCP_PORT, UDP_PORT = 5201, 5202


class RecycledSink(Sink):
    """The session's sink with the same per-event work (callback + memmove into a numpy
    chunk), but reusing one chunk, so minutes of events do not pile up in memory."""

    def _roll(self):
        if self.n == len(self.cur):
            self.n = 0        # `total` has counted them


class Guard:
    """`flow`'s guard (tracer/runs/node.py NodeRunner.guard) on a bare session."""

    guard = NodeRunner.guard

    def __init__(self, session: TraceSession):
        self.session = session
        session.set_guard(1, session.config.budget)
        c = session.counters()
        self._over, self._emitted, self._next_guard = c["over_budget"], c["emitted"], time.monotonic() + 1.0

    def counters(self) -> dict:
        return self.session.counters()


class Tracer:
    """One traced variant: a session, optional tc observers, a drain loop."""

    def __init__(self, doc: dict, variant: str, ringbuf_pages: int):
        import bpfvariants

        self.variant = variant
        base, *mods = variant.split("_")
        ends = (SRC, DST) if base == "match" else (OTHER_A, OTHER_B)
        hooks = [BY_NAME[n] for n in DEFAULT_HOOKS]
        self.tc = "tc" in mods
        if self.tc:
            hooks += [BY_NAME["tc:ingress"], BY_NAME["tc:egress"]]
        sample = next((int(m[1:]) for m in mods if m[:1] == "s" and m[1:].isdigit()), 1)
        self.sink = RecycledSink()
        budget = BUDGET if "guard" in mods else 0
        self.session = TraceSession(SessionConfig(addrs=[L.pod(doc, p)["ip"] for p in ends], hooks=hooks,
                                                  ringbuf_pages=ringbuf_pages, netns=L.lab_inodes(doc), budget=budget,
                                                  sample=sample, batch_reader="callback" not in mods),
                                    sink=self.sink)
        with bpfvariants.patched(empty="empty" in mods, noprefilter="noprefilter" in mods, noct="noct" in mods,
                                 noemit="noemit" in mods), \
                L.environ(PODTRACE_TRACEPOINTS="perf" if "perf" in mods else "raw"):
            self.session.start()
        self.tracepoints = "raw" if self.session.loaded.raw_tp else "perf"
        self.guard = Guard(self.session) if "guard" in mods else None
        self.attacher = None
        try:
            if self.tc:
                from tracer.kernel.tc import TcAttacher
                self.attacher = TcAttacher(self.session.loaded.bpf)
                for ns, dev in path_devices(doc):
                    self.attacher.attach(ns, dev)
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> None:
        self.session.poll(timeout_ms)
        if self.guard is not None:
            self.guard.guard(time.monotonic())

    def restart(self) -> None:
        """A run starts as `flow` does: 1 in 1, the guard's history forgotten."""
        if self.guard is not None:
            self.guard = Guard(self.session)

    def drain(self) -> None:
        self.session.drain()

    def drained(self) -> int:
        return self.sink.count()

    def counters(self) -> dict:
        return self.session.counters()

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of every loaded program (with --bpf-stats)."""
        out = {}
        for name, fn in self.session.loaded.bpf.funcs.items():
            name = name.decode() if isinstance(name, bytes) else name
            if name.startswith("pt_tcs_"):
                continue
            ns, cnt = L.BpfStats.read(fn.fd)
            if cnt:
                out[name] = (ns, cnt)
        return out

    def close(self) -> None:
        if self.attacher is not None:
            self.attacher.close()
            self.attacher = None
        self.session.close()


class Tcpdump:
    """tcpdump on every path device, as a Tracer (poll/drain/counters): `events` are the
    packets it wrote, `lost` those the kernel dropped for it (its own report at exit)."""

    def __init__(self, doc: dict, variant: str):
        import tempfile

        match = variant == "tcpdump_match"
        a, b = (SRC, DST) if match else (OTHER_A, OTHER_B)
        filt = f"host {L.pod(doc, a)['ip']} or host {L.pod(doc, b)['ip']}"
        if match:        # the uplinks and the fabric see the flow inside VXLAN
            filt += f" or udp port {(doc.get('vxlan') or {}).get('port', 8472)}"
        self.dir = tempfile.mkdtemp(prefix="ptbench-tcpdump-")
        self.procs = []
        devs = [(p["netns"], p.get("interface", "eth0")) for p in doc["pods"] if p["name"] in (SRC, DST)]
        devs += path_devices(doc)
        devs += [(doc["fabric_netns"], n["fabric_port"]) for n in doc["nodes"] if n.get("fabric_port")]
        for i, (ns, dev) in enumerate(devs):
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-s", "128", "-n", "-U", "-w",
                 f"{self.dir}/{i}.pcap", filt], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for p in self.procs:            # ready: tcpdump says it is listening
            line = p.stderr.readline()
            if "listening" not in line:
                raise RuntimeError(f"tcpdump did not start: {line.strip()}")
        self.devices = len(devs)
        self.done: dict | None = None

    def poll(self, timeout_ms: int) -> None:
        time.sleep(timeout_ms / 1000)

    def drain(self) -> None:
        pass

    def drained(self) -> int:
        return self.counters()["emitted"]

    def counters(self) -> dict:
        import os

        size = sum(os.path.getsize(f"{self.dir}/{i}.pcap") for i in range(len(self.procs))
                   if os.path.exists(f"{self.dir}/{i}.pcap"))
        # bytes written / (16-byte record header + up to 128 bytes): packets, near enough
        n = size // 144
        return {"emitted": n, "lost": 0, "seen": n}

    def prog_stats(self) -> dict:
        return {}

    def close(self) -> None:
        import shutil
        import signal as sig

        for p in self.procs:
            p.send_signal(sig.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr:
                p.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def path_devices(doc: dict) -> list[tuple[str, str]]:
    out = []
    for n in doc["nodes"]:
        mine = [p for p in doc["pods"] if p["node"] == n["name"] and p["name"] in (SRC, DST)]
        if not mine:
            continue
        out += [(n["netns"], p["host_veth"]) for p in mine]
        out += [(n["netns"], n[k]) for k in ("bridge", "overlay", "uplink") if n.get(k)]
    return out


def run_one(doc: dict, tracer: Tracer | None, udp: bool, seconds: float) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    if tracer and hasattr(tracer, "restart"):
        tracer.restart()
    c0 = tracer.counters() if tracer else None
    d0 = tracer.drained() if tracer else 0
    p = L.iperf_client(src["netns"], dst["ip"], UDP_PORT if udp else TCP_PORT, seconds, udp=udp)
    while p.poll() is None:
        if tracer:
            tracer.poll(50)
        else:
            time.sleep(0.05)
    res = L.iperf_result(p, udp)
    if tracer:
        tracer.drain()
        c1 = tracer.counters()
        res["events"] = tracer.drained() - d0
        res["emitted"] = c1["emitted"] - c0["emitted"]
        res["lost"] = c1["lost"] - c0["lost"]
        res["seen"] = c1["seen"] - c0["seen"]
        if getattr(tracer, "guard", None) is not None:
            res["sample_at_end"] = tracer.session.config.sample
            res["over_budget"] = c1["over_budget"] - c0["over_budget"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--ringbuf-pages", type=int, default=1024, help="the session default: 1024 (4 MiB)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="also report ns per program run (turns the kernel's BPF run-time stats on while running)")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s, untraced/nomatch/match")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.quick:
        args.rounds, args.seconds, variants = 1, 1.0, ["untraced", "nomatch", "match"]
    def known(mod: str) -> bool:
        return mod in MODIFIERS or (mod[:1] == "s" and mod[1:].isdigit())
    bad = [v for v in variants if v not in ("untraced", "tcpdump_match", "tcpdump_nomatch")
           and (v.split("_")[0] not in ("match", "nomatch")
                                                        or not all(known(m) for m in v.split("_")[1:]))]
    if bad:
        raise SystemExit(f"unknown variants {bad}: untraced, or match|nomatch followed by _{'/_'.join(MODIFIERS)}")
    doc, created = L.lab()
    dst = L.pod(doc, DST)
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    startup = L.machine()
    t_begin = time.monotonic()
    stats = L.BpfStats() if args.bpf_stats else None
    with contextlib.ExitStack() as stack:
        if stats:
            stack.enter_context(stats)
        stack.enter_context(L.IperfServer(dst["netns"], TCP_PORT))
        stack.enter_context(L.IperfServer(dst["netns"], UDP_PORT))
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]   # rotate the start
            for v in order:
                others = L.other_tracers()     # before ours is loaded
                tracer = None if v == "untraced" else Tcpdump(doc, v) if v.startswith("tcpdump_") \
                    else Tracer(doc, v, args.ringbuf_pages)
                try:
                    tcp = run_one(doc, tracer, False, args.seconds)
                    udp = run_one(doc, tracer, True, args.seconds)
                    progs = tracer.prog_stats() if tracer and stats else {}
                finally:
                    if tracer:
                        tracer.close()
                        if others == 0:      # the kernel frees closed programs a moment later
                            deadline = time.monotonic() + 3
                            while L.other_tracers() > 0 and time.monotonic() < deadline:
                                time.sleep(0.05)
                rows[v].append({"round": r, "tcp": tcp, "udp": udp, "progs": progs,
                                "others": max(others, L.other_tracers()),
                                "tracepoints": getattr(tracer, "tracepoints", None)})
    if created and not args.quick:
        pass   # the lab stays up for the next benchmark; `podtrace lab down` with PODTRACE_LAB_PREFIX=ptbench
    out = {"benchmark": "datapath", "flow": f"{SRC} → {DST} (cross-node, VXLAN)", "rounds": args.rounds,
           "seconds": args.seconds, "ringbuf_pages": args.ringbuf_pages, "variants": {},
           "machine_start": startup, "machine_end": L.machine(), "wall_s": round(time.monotonic() - t_begin, 1)}
    base = rows.get("untraced")
    # rounds during which no other podtrace session was loaded, in any variant
    clean = [r for r in range(args.rounds) if all(rows[v][r]["others"] == 0 for v in variants)]
    out["rounds_with_other_tracers"] = args.rounds - len(clean)
    for v in variants:
        rs = rows[v]
        d = {"tcp_gbps": L.spread([x["tcp"]["gbps"] for x in rs]),
             "udp_recv_pps": L.spread([x["udp"]["recv_pps"] for x in rs], 0),
             "udp_sent_pps": L.spread([x["udp"]["sent_pps"] for x in rs], 0),
             "udp_sender_cpu_us_per_pkt": L.spread([x["udp"]["sender_cpu_us_per_pkt"] for x in rs], 2),
             "tcp_sender_cpu_s_per_gb": L.spread([x["tcp"]["sender_cpu_s_per_gb"] for x in rs], 3)}
        if base and v != "untraced":
            d["tcp_ratio"] = L.spread([x["tcp"]["gbps"] / b["tcp"]["gbps"] for x, b in zip(rs, base)])
            d["udp_pps_ratio"] = L.spread([x["udp"]["recv_pps"] / b["udp"]["recv_pps"] for x, b in zip(rs, base)])
            if clean and len(clean) < args.rounds:
                d["tcp_ratio_clean_rounds"] = L.spread([rs[r]["tcp"]["gbps"] / base[r]["tcp"]["gbps"] for r in clean])
                d["udp_pps_ratio_clean_rounds"] = L.spread([rs[r]["udp"]["recv_pps"] / base[r]["udp"]["recv_pps"]
                                                            for r in clean])
            d["udp_cpu_per_pkt_ratio"] = L.spread([x["udp"]["sender_cpu_us_per_pkt"] / b["udp"]["sender_cpu_us_per_pkt"]
                                                   for x, b in zip(rs, base)
                                                   if x["udp"]["sender_cpu_us_per_pkt"] and b["udp"]["sender_cpu_us_per_pkt"]])
        if any(x["tracepoints"] for x in rs):
            d["tracepoints"] = sorted({x["tracepoints"] for x in rs if x["tracepoints"]})
        if v != "untraced":
            for proto in ("tcp", "udp"):
                d[f"{proto}_events"] = sum(x[proto]["events"] for x in rs)
                d[f"{proto}_events_lost"] = sum(x[proto]["lost"] for x in rs)
                d[f"{proto}_events_per_s"] = L.spread([x[proto]["events"] / args.seconds for x in rs], 0)
                d[f"{proto}_hooks_seen_per_s"] = L.spread([x[proto]["seen"] / args.seconds for x in rs], 0)
                if all("sample_at_end" in x[proto] for x in rs):
                    d[f"{proto}_sample_at_end"] = sorted({x[proto]["sample_at_end"] for x in rs})
                    d[f"{proto}_events_over_budget"] = sum(x[proto]["over_budget"] for x in rs)
        if any(x["progs"] for x in rs):
            names = sorted({n for x in rs for n in x["progs"]})
            d["bpf_ns_per_run"] = {n: L.spread([x["progs"][n][0] / x["progs"][n][1] for x in rs if n in x["progs"]], 0)
                                   for n in names}
            d["bpf_runs_per_round"] = {n: int(np.median([x["progs"][n][1] for x in rs if n in x["progs"]]))
                                       for n in names}
        out["variants"][v] = d
    targets = {"nomatch_tcp_ratio": 0.97, "nomatch_udp_pps_ratio": 0.95, "match_tcp_ratio": 0.85,
               "match_udp_pps_ratio": 0.80, "match_events_lost": 0}
    out["targets"] = targets
    vv = out["variants"]
    if "nomatch" in vv and "tcp_ratio" in vv["nomatch"]:
        out["verdict"] = {
            "nomatch_tcp_ratio": vv["nomatch"]["tcp_ratio"]["median"],
            "nomatch_udp_pps_ratio": vv["nomatch"]["udp_pps_ratio"]["median"],
        }
        if "match" in vv:
            out["verdict"]["match_tcp_ratio"] = vv["match"]["tcp_ratio"]["median"]
            out["verdict"]["match_udp_pps_ratio"] = vv["match"]["udp_pps_ratio"]["median"]
            out["verdict"]["match_events_lost"] = vv["match"]["udp_events_lost"] + vv["match"]["tcp_events_lost"]
        if "match_guard" in vv:       # as `flow` runs: the default budget and its guard
            out["verdict"]["match_guard_tcp_ratio"] = vv["match_guard"]["tcp_ratio"]["median"]
            out["verdict"]["match_guard_udp_pps_ratio"] = vv["match_guard"]["udp_pps_ratio"]["median"]
            out["verdict"]["match_guard_events_lost"] = (vv["match_guard"]["udp_events_lost"]
                                                         + vv["match_guard"]["tcp_events_lost"])
        # never heavier than tcpdump on the same path in the same rounds
        for kind in ("nomatch", "match"):
            if kind in vv and f"tcpdump_{kind}" in vv and "tcp_ratio" in vv[f"tcpdump_{kind}"]:
                for m in ("tcp_ratio", "udp_pps_ratio"):
                    out["verdict"][f"{kind}_{m}_tcpdump"] = vv[f"tcpdump_{kind}"][m]["median"]
    L.emit(out)


if __name__ == "__main__":
    main()
