"""Benchmark: bulk reconstruction of synthetic hop events, and how it grows.

For 1e4, 1e5 and 1e6 events (bench/decode.py's synth: cross-node ICMP, 12 hops per packet;
or with --data analysis, bench/analysis.py's TCP lab traffic with Service DNAT, drops and
losses), times, each the median of --reps runs:

- decode:        events.to_frame (ring-buffer records → DataFrame)
- assign:        flows.assign_packets (events → packet numbers)
- vectorised:    analysis.reconstruct_vectorised (packets and hops tables)
- analyse:       analysis.analyse (the same plus the flow and drop tables: what
                 `analysis.load` does after reading the file)
- build_packets: flows.build_packets (the per-packet path `flow` uses for its few probes),
                 only up to --build-max events: it is not meant for bulk

`growth` is the log-log slope between consecutive sizes (1.0: linear).

    .venv/bin/python bench/reconstruct.py [--sizes 10000,100000,1000000] [--reps 3] [--data decode|analysis] [--build-max N]
    .venv/bin/python bench/reconstruct.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tracer import analysis  # noqa: E402
from tracer.kernel import record
from tracer.reconstruct import packets
from tracer.cluster import inventory

import decode as decode_bench  # noqa: E402


def dataset(kind: str, n: int):
    """(records, meta, FlowInput for build_packets)."""
    if kind == "analysis":
        import analysis as abench   # bench/analysis.py (not tracer.analysis)

        arr, meta, _ = abench.synth(n)
        arr = arr[:n]              # synth makes whole blocks of ~95k events
        meta = dict(meta, kind="capture")
        src = inventory.Endpoint("pod-1-1", "10.244.1.2", pod=inventory.Pod("default", "pod-1-1", "node-1", "10.244.1.2"))
        dst = inventory.Endpoint("pod-2-1", "10.244.2.2", pod=inventory.Pod("default", "pod-2-1", "node-2", "10.244.2.2"))
        pl = packets.Placement({int(k): tuple(v) for k, v in meta["placement"].items()})
        return arr, meta, packets.FlowInput(src, dst, "tcp", 8080, [], pl, {}, lambda a: None)
    arr = decode_bench.synth(n)
    ns = sorted({int(x) for x in arr["netns"][:12]})
    placement = {str(ns[0]): ["node-1", "default/a"], str(ns[1]): ["node-1", None], str(ns[2]): ["node-2", None]}
    meta = {"kind": "capture", "placement": placement,
            "pods": [{"key": "default/a", "ip": "10.244.1.2", "node": "node-1", "netns_inode": ns[0]},
                     {"key": "default/b", "ip": "10.244.2.2", "node": "node-2"}],
            "nodes": [{"name": "node-1", "ip": "172.30.0.11"}, {"name": "node-2", "ip": "172.30.0.12"}]}
    src = inventory.Endpoint("a", "10.244.1.2", pod=inventory.Pod("default", "a", "node-1", "10.244.1.2"))
    dst = inventory.Endpoint("b", "10.244.2.2", pod=inventory.Pod("default", "b", "node-2", "10.244.2.2"))
    pl = packets.Placement({int(k): tuple(v) for k, v in placement.items()})
    return arr, meta, packets.FlowInput(src, dst, "icmp", None, [], pl, {}, lambda a: None)


def timed(fn, reps: int):
    out, times = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", choices=["decode", "analysis"], default="decode")
    ap.add_argument("--build-max", type=int, default=12_000,
                    help="largest size given to flows.build_packets (about 5 ms per packet)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.reps, args.build_max = "2400,24000", 1, 2400
    sizes = [int(s) for s in args.sizes.split(",")]
    analysis.analyse(record.to_frame(dataset(args.data, 1200)[0]), dataset(args.data, 1200)[1])  # warm-up
    rows, raw = [], []
    for n in sizes:
        arr, meta, fi = dataset(args.data, n)
        n = len(arr)
        row = {"events": n}
        df, t = timed(lambda: record.to_frame(arr), args.reps)
        row["decode_s"] = t
        g, t = timed(lambda: packets.assign_packets(df), args.reps)
        row["assign_s"] = t
        row["packets"] = int(g["pkt"].nunique())
        (pk, hops), t = timed(lambda: analysis.reconstruct_vectorised(df, meta), args.reps)
        row["vectorised_s"] = t
        row["vectorised_packets"], row["hops"] = len(pk), len(hops)
        tr, t = timed(lambda: analysis.analyse(df.copy(), meta, mode="capture"), args.reps)
        row["analyse_s"] = t
        row["flows"] = len(tr.flows)
        if n <= args.build_max:
            built, t = timed(lambda: packets.build_packets(df, fi), 1)
            row["build_packets_s"] = t
            row["build_packets_packets"] = len(built)
        exact = {k: statistics.median(v) for k, v in row.items() if k.endswith("_s")}
        row.update({k: round(v, 4) for k, v in exact.items()})
        row["events_per_s"] = {k[:-2]: int(n / v) for k, v in exact.items() if v > 0}
        rows.append(row)
        raw.append(exact)
    growth = []
    for i, (a, b) in enumerate(zip(raw, raw[1:])):
        na, nb = rows[i]["events"], rows[i + 1]["events"]
        g = {"from": na, "to": nb}
        for k in ("decode_s", "assign_s", "vectorised_s", "analyse_s", "build_packets_s"):
            if a.get(k) and b.get(k) and nb != na:
                g[k[:-2]] = round(math.log(b[k] / a[k]) / math.log(nb / na), 2)
        growth.append(g)
    big = max(rows, key=lambda r: r["events"])
    out = {"benchmark": "reconstruct", "data": args.data, "reps": args.reps, "sizes": rows, "growth": growth,
           "largest": {"events": big["events"],
                       "assign_plus_vectorised_s": round(big["assign_s"] + big["vectorised_s"], 3),
                       "decode_plus_analyse_s": round(big["decode_s"] + big["analyse_s"], 3)},
           "target": {"events": 1_000_000, "seconds": 2.0},
           "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
           "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(__import__("json").dumps(out))


if __name__ == "__main__":
    main()
