"""Benchmark: what attaching and removing the tc observers costs the traffic on the devices.

iperf3 sends UDP at a fixed rate from pod-1-1 to pod-2-1 of the bench lab while podtrace's
tc observers are attached to the path's devices and removed again, ROUNDS times, the way
each `flow` does. Per attach mode (`tcx`: BPF links, no qdisc; `clsact`: a clsact qdisc is
added to each device and removed again), rounds interleaved:

    tx_dropped     what the path's devices counted as dropped on transmit meanwhile
    iperf_lost     datagrams iperf3 counted lost end to end
    attach_s       median time to attach to all the path's devices

Adding or removing a qdisc makes the kernel deactivate the device's transmit queues for a
moment; what the device sends meanwhile is dropped (QDISC_DROP). tcx has no such moment.

    sudo .venv/bin/python bench/attach.py [--rounds 20] [--rate 200M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import benchlib as L
from datapath import path_devices

SRC, DST, PORT = "pod-1-1", "pod-2-1", 5213


def tx_dropped(devs: list[tuple[str, str]]) -> int:
    from pyroute2 import NetNS

    total = 0
    for ns in sorted({ns for ns, _ in devs}):
        with NetNS(ns) as ipr:
            for link in ipr.get_links():
                if (link.get_attr("IFLA_IFNAME"), ns) in {(d, n) for n, d in devs}:
                    total += link.get_attr("IFLA_STATS64")["tx_dropped"]
    return total


def one_mode(doc: dict, mode: str, rounds: int, rate: str, seconds: float) -> dict:
    from tracer.kernel.hooks import BY_NAME, DEFAULT_HOOKS
    from tracer.kernel.session import SessionConfig, TraceSession
    from tracer.kernel.tc import TcAttacher

    os.environ["PODTRACE_TC_ATTACH"] = mode
    devs = path_devices(doc)
    hooks = [BY_NAME[n] for n in DEFAULT_HOOKS] + [BY_NAME["tc:ingress"], BY_NAME["tc:egress"]]
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    took = []
    with TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], hooks=hooks, netns=L.lab_inodes(doc))) as s:
        with L.IperfServer(dst["netns"], PORT):
            d0 = tx_dropped(devs)
            client = L.iperf_client(src["netns"], dst["ip"], PORT, seconds, udp=True, rate=rate, length=200)
            time.sleep(0.5)
            end = time.monotonic() + seconds - 1.0
            n = 0
            while n < rounds and time.monotonic() < end:
                t0 = time.monotonic()
                tc = TcAttacher(s.loaded.bpf)
                try:
                    for ns, dev in devs:
                        tc.attach(ns, dev)
                    took.append(time.monotonic() - t0)
                    time.sleep(0.05)
                finally:
                    tc.close()
                n += 1
            res = L.iperf_result(client, udp=True)
            d1 = tx_dropped(devs)
    return {"mode": mode, "rounds": n, "tx_dropped": d1 - d0,
            "iperf_lost": round(res["lost_pct"] * res["packets"] / 100), "iperf_packets": res["packets"],
            "attach_s": round(statistics.median(took), 4) if took else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="attach/remove cycles per mode and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate", default="200M", help="iperf3 UDP rate")
    args = ap.parse_args()
    doc, _ = L.lab()
    start = L.machine()
    runs: list[dict] = []
    for i in range(args.repeats):
        for mode in (("tcx", "clsact") if i % 2 == 0 else ("clsact", "tcx")):
            runs.append(one_mode(doc, mode, args.rounds, args.rate, seconds=args.rounds * 0.4 + 3))
    total = {m: {"rounds": sum(r["rounds"] for r in runs if r["mode"] == m),
                 "tx_dropped": sum(r["tx_dropped"] for r in runs if r["mode"] == m),
                 "iperf_lost": sum(r["iperf_lost"] for r in runs if r["mode"] == m)} for m in ("tcx", "clsact")}
    L.emit({"benchmark": "attach", "rate": args.rate, "devices": len(path_devices(doc)), "runs": runs,
            "total": total, "machine_start": start, "machine_end": L.machine()})


if __name__ == "__main__":
    main()
