"""Benchmark: decode ring-buffer bytes and reconstruct packets, without the kernel.

Synthesises N hop events shaped like a cross-node ICMP flow (12 hops per packet) and times
events.decode() and flows.build_packets(). Prints one JSON object.

    .venv/bin/python bench/decode.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import time

import numpy as np

from tracer.kernel import record
from tracer.reconstruct import packets
from tracer.cluster import inventory
from tracer.node.prober import ProbeResult


def synth(n: int) -> np.ndarray:
    hops = 12
    a = np.zeros(n, dtype=record.EVENT_DTYPE)
    idx = np.arange(n)
    pkt = idx // hops
    a["ts_ns"] = 1_000_000 + idx * 5_000
    a["skb"] = np.uint64(0xFFFF888000000000) + (pkt * 256).astype(np.uint64)
    a["netns"] = 4026530000 + (idx % hops) // 4
    a["ifindex"] = idx % hops
    a["saddr"] = record.v4_field(int(ipaddress.IPv4Address("10.244.1.2")))
    a["daddr"] = record.v4_field(int(ipaddress.IPv4Address("10.244.2.2")))
    a["proto"] = 1
    a["icmp_type"] = 8
    a["sport"] = 4242
    a["dport"] = pkt % 65536
    a["ip_id"] = pkt % 65536
    a["ip_len"] = 84
    a["hook"] = np.where(idx % 2 == 0, 2, 1)
    a["ifname"] = b"eth0"
    return a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    arr = synth(args.events)
    raw = arr.tobytes()
    t0 = time.perf_counter()
    df = record.decode(raw)
    t1 = time.perf_counter()
    src = inventory.Endpoint("a", "10.244.1.2", pod=inventory.Pod("default", "a", "node-1", "10.244.1.2"))
    dst = inventory.Endpoint("b", "10.244.2.2", pod=inventory.Pod("default", "b", "node-2", "10.244.2.2"))
    fi = packets.FlowInput(src, dst, "icmp", None, [], packets.Placement(), {}, lambda a: None)
    t2 = time.perf_counter()
    grouped = packets.assign_packets(df)
    t3 = time.perf_counter()
    n_packets = int(grouped["pkt"].nunique())
    print(json.dumps({
        "benchmark": "decode+group",
        "events": args.events,
        "event_bytes": record.EVENT_DTYPE.itemsize,
        "decode_s": round(t1 - t0, 4),
        "decode_events_per_s": int(args.events / (t1 - t0)),
        "group_s": round(t3 - t2, 4),
        "group_events_per_s": int(args.events / (t3 - t2)),
        "packets": n_packets,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
