"""Benchmark: `flow --no-probe` on a busy flow — how long after its --duration the answer comes.

iperf3 pushes TCP at full speed from pod-1-1 to pod-2-1 of the bench lab, started before
podtrace (as on a real incident: the traffic is already there), and
`podtrace flow pod-1-1 pod-2-1 --no-probe --duration S -o json` watches it. Rounds alternate
the modes (agents: the default, one agent per lab node; single: `--single-process`; either
with `_tcall`: PODTRACE_TC_OBSERVERS=all, tc observers on every device of the path). Per run:

    wall_s        launch to exit of the command
    over_s        wall_s − S: start-up plus everything after the watch (the figure to hold)
    startup_s, trace_s, reconstruct_s    the JSON's timings
    packets, events (those the aggregate counted), delivered, partial, failed, aggregated
    (whether the answer was the aggregate),
    sample (1 in N at the end), events lost / over budget, iperf3 Gbit/s meanwhile,
    peak RSS of the command and of its agents (MiB)

    sudo .venv/bin/python bench/busyflow.py [--rounds 3] [--duration 4]
    sudo .venv/bin/python bench/busyflow.py --rounds 3 --modes agents,agents_tcall,single,single_tcall
    sudo .venv/bin/python bench/busyflow.py --rounds 3 --udp-rate 100K   # a few hundred packets, judged one by one
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import benchlib as L

SRC, DST, PORT = "pod-1-1", "pod-2-1", 5211


def peak_rss(proc: subprocess.Popen, out: dict, stop: threading.Event) -> None:
    """Sample the command's and its descendants' VmHWM until it ends (MiB)."""
    seen: dict[int, int] = {}
    while not stop.is_set() and proc.poll() is None:
        for pid in [proc.pid, *L.children(proc.pid)]:
            seen[pid] = max(seen.get(pid, 0), L.hwm_kib(pid))
        time.sleep(0.05)
    out["rss_mib"] = round(seen.get(proc.pid, 0) / 1024, 1)
    out["agents_rss_mib"] = round(max([v for p, v in seen.items() if p != proc.pid] or [0]) / 1024, 1)


def one(doc: dict, mode: str, duration: float, prefix: str, timeout: float = 300, udp_rate: str | None = None) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    with L.IperfServer(dst["netns"], PORT):
        client = L.iperf_client(src["netns"], dst["ip"], PORT, duration + 12, udp=udp_rate is not None,
                                rate=udp_rate or "0")
        time.sleep(1.0)          # the transfer is up to speed before the command starts
        argv = [*L.PODTRACE, "flow", SRC, DST, "--no-probe", "--duration", f"{duration:g}", "-o", "json"]
        if mode.startswith("single"):
            argv.append("--single-process")
        t0 = time.monotonic()
        p = subprocess.Popen(argv, env=L.mode_env(prefix, mode), cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        rss: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=peak_rss, args=(p, rss, stop), daemon=True)
        watcher.start()
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:     # no answer: stop it as Ctrl-C would, and say so
            p.terminate()
            p.communicate(timeout=60)
            out, err = "", f"no answer after {timeout:g} s"
        wall = time.monotonic() - t0
        stop.set()
        watcher.join()
        client.kill()
        client.communicate()
    res = {"mode": mode, "exit": p.returncode, "wall_s": round(wall, 3), "over_s": round(wall - duration, 3), **rss}
    try:
        d = json.loads(out)
    except ValueError:
        return {**res, "error": (err.strip().splitlines() or ["no output"])[-1]}
    s, c, t = d.get("summary", {}), d.get("counters", {}), d.get("timings", {})
    sample = next((int(n.split("1 packet in ")[1].split()[0]) for n in d.get("notes", [])
                   if "sampling raised to 1 packet in " in n), 1)
    return {**res, "startup_s": t.get("startup_s"), "trace_s": t.get("trace_s"), "reconstruct_s": t.get("reconstruct_s"),
            "packets": s.get("packets"), "events": (d.get("aggregate") or {}).get("events"),
            "delivered": s.get("delivered"), "partial": s.get("partial"),
            "failed": s.get("failed"), "aggregated": d.get("aggregate") is not None, "sample": sample,
            "events_lost": c.get("lost"), "over_budget": c.get("over_budget"), "verdict": d["verdict"]["summary"][:120]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--modes", default="agents,single")
    ap.add_argument("--prefix", default=L.PREFIX)
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for an answer")
    ap.add_argument("--udp-rate", default=None, metavar="RATE",
                    help="64-byte UDP at this iperf3 rate (e.g. 100K: ~200 packets/s, a watch of a few hundred "
                         "packets judged one by one) instead of TCP at full speed")
    a = ap.parse_args()
    doc, created = L.lab(a.prefix)
    runs = []
    try:
        for r in range(a.rounds):
            for mode in a.modes.split(","):
                x = one(doc, mode, a.duration, a.prefix, a.timeout, a.udp_rate)
                x["round"] = r
                print(json.dumps(x), file=sys.stderr)
                runs.append(x)
    finally:
        if created:
            from tracer.lab import build
            build.down(a.prefix)
    summary = {}
    for mode in a.modes.split(","):
        mine = [x for x in runs if x["mode"] == mode and "error" not in x]
        summary[mode] = {k: L.spread([x[k] for x in mine]) for k in
                         ("wall_s", "over_s", "startup_s", "trace_s", "packets", "rss_mib", "agents_rss_mib")}
        summary[mode]["events"] = L.spread([x["events"] for x in mine if x.get("events") is not None])
        summary[mode]["aggregated"] = sum(1 for x in mine if x["aggregated"])
        summary[mode]["errors"] = sum(1 for x in runs if x["mode"] == mode and "error" in x)
    L.emit({"bench": "busyflow", "duration_s": a.duration, "traffic": f"udp {a.udp_rate}" if a.udp_rate else "tcp",
            "machine": L.machine(), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
