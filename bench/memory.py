"""Benchmark: memory of `podtrace flow` and of a long `podtrace capture`.

1. flow: `podtrace flow pod-1-1 pod-2-1 -o json` on the bench lab, both modes; every 50 ms
   the VmHWM (peak RSS) of the coordinator and of every process below it is read; the last
   value read of each is its peak. Agents are told apart by their command line.
2. capture: `podtrace capture --pod default/pod-1-1 -d SECONDS` while iperf3 sends a steady
   UDP stream pod-1-1 → pod-2-1 (--rate packets/s, 64 B); the capture's RSS is sampled
   every second. The slope (least squares over the second half, after warm-up) says
   whether memory is flat or grows; events written and lost come from its trace file.

    .venv/bin/python bench/memory.py [--duration 60] [--rate 2000] [--flow-runs 3]
    .venv/bin/python bench/memory.py --duration 300     # the 5-minute figure
    .venv/bin/python bench/memory.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchlib as L

SRC, DST = "pod-1-1", "pod-2-1"
PORT = 5204


def watch(p: subprocess.Popen, every: float) -> tuple[dict[int, int], dict[int, str], list[tuple[float, int]]]:
    """Until p exits: peak RSS (VmHWM, KiB) per process of the tree, their command lines,
    and (t, RSS of p) samples."""
    peaks: dict[int, int] = {}
    cmds: dict[int, str] = {}
    series: list[tuple[float, int]] = []
    t0 = time.monotonic()
    next_series = t0
    while p.poll() is None:
        for pid in [p.pid] + L.children(p.pid):
            hwm = L.hwm_kib(pid)
            if hwm:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
                if pid not in cmds:
                    cmds[pid] = L.cmdline(pid)
        now = time.monotonic()
        if now >= next_series:
            series.append((now - t0, L.rss_kib(p.pid)))
            next_series += 1.0
        time.sleep(every)
    return peaks, cmds, series


def flow_memory(prefix: str, mode: str) -> dict:
    argv = L.PODTRACE + ["flow", SRC, DST, "-o", "json"] + (["--single-process"] if mode == "single" else [])
    # output to files, not pipes: nobody reads a pipe while watching, and a full pipe blocks the flow
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, env=L.lab_env(prefix), cwd="/", stdout=out, stderr=err)
        peaks, cmds, _ = watch(p, 0.05)
        p.wait()
    # agents: `podtrace agent` processes, or (the lab's, forked from the command) processes
    # with the command's own command line; a forked agent's RSS counts the pages it still
    # shares with the command, so the total counts those twice
    me = cmds.get(p.pid, "")
    agents = {pid: kib for pid, kib in peaks.items() if pid != p.pid and "python" in cmds.get(pid, "")
              and (" agent" in cmds.get(pid, "") or cmds.get(pid) == me)}
    return {"exit": p.returncode, "coordinator_peak_mib": round(peaks.get(p.pid, 0) / 1024, 1),
            "agents": len(agents), "agent_peak_mib": round(max(agents.values(), default=0) / 1024, 1),
            "total_peak_mib": round((peaks.get(p.pid, 0) + sum(agents.values())) / 1024, 1)}


def capture_memory(doc: dict, seconds: float, pps: int) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    with tempfile.TemporaryDirectory(prefix="ptbench-mem-") as d, L.IperfServer(dst["netns"], PORT):
        out = Path(d) / "cap.parquet"
        traffic = L.iperf_client(src["netns"], dst["ip"], PORT, seconds + 8, udp=True, rate=str(pps * 64 * 8))
        time.sleep(1.0)
        argv = L.PODTRACE + ["capture", "--pod", f"default/{SRC}", "-d", f"{seconds:g}", "-w", str(out)]
        with open(Path(d) / "stderr", "w+b") as errf:
            p = subprocess.Popen(argv, env=L.lab_env(doc["prefix"]), cwd="/", stdout=subprocess.DEVNULL, stderr=errf)
            peaks, _, series = watch(p, 0.2)
            p.wait()
            errf.seek(0)
            err = errf.read()
        traffic.terminate()
        traffic.communicate()
        res = {"exit": p.returncode, "seconds": seconds, "offered_pps": pps,
               "peak_mib": round(peaks.get(p.pid, 0) / 1024, 1)}
        if out.exists():
            from tracer import tracefile
            ev, meta = tracefile.load(out)
            c = meta.get("counters") or {}
            res.update(events=len(ev), events_lost=int(c.get("lost", 0)), file_mib=round(out.stat().st_size / 2**20, 1),
                       events_per_s=round(len(ev) / seconds))
        else:
            res["error"] = err.decode(errors="replace").strip().splitlines()[-1:] or ["no file"]
    t = np.array([s[0] for s in series])
    mib = np.array([s[1] / 1024 for s in series])
    res["rss_samples_mib"] = [round(float(x), 1) for x in mib]
    res["rss_mean_per_30s_mib"] = [round(float(mib[i:i + 30].mean()), 1) for i in range(0, len(mib), 30)]
    half = t >= t[-1] / 2 if len(t) else t
    if half.sum() >= 3:
        slope = np.polyfit(t[half], mib[half], 1)[0]
        res["rss_slope_mib_per_min_second_half"] = round(float(slope) * 60, 2)
    if len(t) >= 3:
        res["rss_slope_mib_per_min_all"] = round(float(np.polyfit(t, mib, 1)[0]) * 60, 2)
        res["rss_first_last_mib"] = [round(float(mib[1 if len(mib) > 1 else 0]), 1), round(float(mib[-1]), 1)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="capture seconds (300 for the 5-minute figure)")
    ap.add_argument("--rate", type=int, default=2000, help="steady UDP packets/s during the capture")
    ap.add_argument("--flow-runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.flow_runs = 5.0, 1
    doc, _ = L.lab()
    start = L.machine()
    flows: dict[str, list[dict]] = {"agents": [], "single": []}
    for i in range(args.flow_runs):
        for m in (("agents", "single") if i % 2 == 0 else ("single", "agents")):
            flows[m].append(flow_memory(doc["prefix"], m))
    out = {"benchmark": "memory", "flow": {}, "machine_start": start}
    for m, rs in flows.items():
        out["flow"][m] = {k: round(statistics.median(r[k] for r in rs), 1)
                          for k in ("coordinator_peak_mib", "agent_peak_mib", "total_peak_mib", "agents")}
        out["flow"][m]["exits"] = sorted({r["exit"] for r in rs})
    out["capture"] = capture_memory(doc, args.duration, args.rate)
    out["machine_end"] = L.machine()
    L.emit(out)


if __name__ == "__main__":
    sys.exit(main())
