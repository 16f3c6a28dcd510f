"""Benchmarks of the trace-file path, without the kernel: synthetic lab traffic (cross-node
TCP between pods and to a Service, with DNAT, VXLAN, drops and losses) shaped like what
`podtrace capture` records.

    .venv/bin/python bench/analysis.py load   [--events 1000000]   # write, then analysis.load()
    .venv/bin/python bench/analysis.py writer [--events 2000000]   # capture's writer path: peak RSS

Each prints one JSON object. `synth()` is also the ground truth the unit tests check the
reconstruction against.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.kernel import record as events  # noqa: E402

IP = lambda s: int(ipaddress.IPv4Address(s))  # noqa: E731
FABRIC, N1, N2 = 4026531001, 4026531002, 4026531003
PODS = {  # key: (netns inode, node, ip, host veth)
    "default/pod-1-1": (4026531011, "node-1", "10.244.1.2", "veth11111111"),
    "default/pod-1-2": (4026531012, "node-1", "10.244.1.3", "veth12121212"),
    "default/pod-2-1": (4026531021, "node-2", "10.244.2.2", "veth21212121"),
    "default/pod-2-2": (4026531022, "node-2", "10.244.2.3", "veth22222222"),
}
NODES = {"node-1": (N1, "172.30.0.11", "10.244.1.0/24"), "node-2": (N2, "172.30.0.12", "10.244.2.0/24")}
VIP, VIP_PORT, BACKEND = "10.96.0.10", 80, "default/pod-2-2"
NETFILTER_DROP = 6
DROP_LOCATION = 0xFFFFFFFF81ABCDEF
HOP_NS = 5_000


def meta() -> dict:
    placement = {str(FABRIC): [None, None], str(N1): ["node-1", None], str(N2): ["node-2", None]}
    placement.update({str(ino): [node, key] for key, (ino, node, _, _) in PODS.items()})
    return {
        "kind": "capture", "format_version": 2,
        "placement": placement,
        "nodes": [{"name": n, "ip": ip, "pod_cidr": cidr, "netns_inode": ino} for n, (ino, ip, cidr) in NODES.items()],
        "pods": [{"key": k, "namespace": "default", "name": k.split("/")[1], "node": node, "ip": ip,
                  "netns_inode": ino} for k, (ino, node, ip, _) in PODS.items()],
        "services": [{"key": "default/web", "namespace": "default", "name": "web", "cluster_ip": VIP,
                      "ports": [{"port": VIP_PORT, "target_port": 8080, "protocol": "TCP"}],
                      "backends": [BACKEND], "backend_ips": [PODS[BACKEND][2]]}],
        "drop_reasons": {str(NETFILTER_DROP): "NETFILTER_DROP"},
        "locations": {str(DROP_LOCATION): "nft_do_chain+0x46f"},
        "counters": {"seen": 0, "matched": 0, "emitted": 0, "lost": 0, "truncated": 0},
        "hooks": ["tp:netif_receive_skb", "tp:net_dev_start_xmit", "tp:kfree_skb", "tp:consume_skb"],
    }


def _path(a: str, b: str) -> list[tuple[int, str, int, bool]]:
    """(netns, dev, hook, encapsulated) of every hop from pod a (node-1) to pod b (node-2),
    or back when a is on node-2."""
    ia, na, _, va = PODS[a]
    ib, nb, _, vb = PODS[b]
    ns_a, ns_b = NODES[na][0], NODES[nb][0]
    up_a, up_b = ("n1", "n2") if na == "node-1" else ("n2", "n1")
    return [(ia, "eth0", 2, False), (ns_a, va, 1, False), (ns_a, "cni0", 1, False),
            (ns_a, "flannel.1", 2, False), (ns_a, "eth0", 2, True), (FABRIC, up_a, 1, True),
            (FABRIC, up_b, 2, True), (ns_b, "eth0", 1, True), (ns_b, "flannel.1", 1, False),
            (ns_b, "cni0", 2, False), (ns_b, vb, 2, False), (ib, "eth0", 1, False)]


DNAT_HOP = 2       # the request is DNATed at node-1's cni0 (hop index 2)
UNDNAT_HOP = 10    # the reply is reverse-NATed on node-1 after its cni0 (hop index 10)
DROP_AFTER = 8     # drops happen at node-2's flannel.1 rx (request) / node-1's (reply)
LOST_AFTER = 4     # losses: last seen at node's eth0 tx


def synth_blocks(n_events: int, seed: int = 1, drop_rate: float = 0.01, lost_rate: float = 0.005,
                 packets_per_flow: int = 8, block_packets: int = 8192):
    """Yields (records, truth) blocks in time order until about n_events were made.
    truth: one row per packet: flow, request?, status ("delivered"/"dropped"/"lost"), hops."""
    rng = np.random.default_rng(seed)
    clients = ["default/pod-1-1", "default/pod-1-2"]
    servers = ["default/pod-2-1", "default/pod-2-2", "svc"]
    made = 0
    flow_base = 0
    t_base = 1_000_000_000
    while made < n_events:
        n_flows = max(block_packets // packets_per_flow, 1)
        cli = rng.integers(0, len(clients), n_flows)
        srv = rng.integers(0, len(servers), n_flows)
        sport = 20000 + (flow_base + np.arange(n_flows)) % 40000   # distinct: flows never merge
        isn = rng.integers(0, 2**32 - 1, n_flows, dtype=np.int64)
        recs, truth = [], []
        pk_in_block = 0
        for f in range(n_flows):
            a = clients[cli[f]]
            s = servers[srv[f]]
            b = BACKEND if s == "svc" else s
            dst_ip, dport = (VIP, VIP_PORT) if s == "svc" else (PODS[b][2], 8080)
            for k in range(packets_per_flow):
                request = k % 2 == 0
                u = rng.random()
                status = "dropped" if u < drop_rate else ("lost" if u < drop_rate + lost_rate else "delivered")
                path = _path(a, b) if request else _path(b, a)
                stop = {"delivered": len(path), "dropped": DROP_AFTER + 1, "lost": LOST_AFTER + 1}[status]
                t0 = t_base + (pk_in_block * 40 + f) * 1000
                pk_in_block += 1
                skb = 0xFFFF888000000000 + ((made + len(recs)) % (1 << 20)) * 256
                for i, (ns, dev, hook, enc) in enumerate(path[:stop]):
                    if request:
                        src, sp = PODS[a][2], int(sport[f])
                        dst, dp = (dst_ip, dport) if i < DNAT_HOP or s != "svc" else (PODS[b][2], 8080)
                    else:
                        dst, dp = PODS[a][2], int(sport[f])
                        src, sp = (PODS[b][2], 8080) if i < UNDNAT_HOP or s != "svc" else (VIP, VIP_PORT)
                    recs.append((t0 + i * HOP_NS, skb, ns, dev, hook, enc, src, sp, dst, dp,
                                 int(isn[f] + k * 1000) % (2**32), (k // 2) + 1, 0))
                last_t = t0 + (stop - 1) * HOP_NS
                if status == "dropped":
                    ns, dev, _, _ = path[stop - 1]
                    recs.append((last_t + 1000, skb, ns, dev, 3, False, src, sp, dst, dp,
                                 int(isn[f] + k * 1000) % (2**32), (k // 2) + 1, NETFILTER_DROP))
                elif status == "delivered":
                    ns, dev, _, _ = path[-1]
                    recs.append((last_t + 2000, skb, ns, dev, 4, False, src, sp, dst, dp,
                                 int(isn[f] + k * 1000) % (2**32), (k // 2) + 1, 0))
                truth.append((flow_base + f, request, status, stop))
        arr = _records(recs)
        arr = arr[np.argsort(arr["ts_ns"], kind="stable")]
        made += len(arr)
        flow_base += n_flows
        t_base = int(arr["ts_ns"].max()) + 1_000_000_000
        yield arr, truth


def _records(recs: list[tuple]) -> np.ndarray:
    cols = list(zip(*recs))
    n = len(recs)
    a = np.zeros(n, dtype=events.EVENT_DTYPE)
    a["ts_ns"] = cols[0]
    a["skb"] = np.array(cols[1], dtype=np.uint64)
    a["netns"] = cols[2]
    a["ifname"] = np.array(cols[3], dtype="S16")
    a["ifindex"] = [hash(d) % 50 + 2 for d in cols[3]]
    a["hook"] = cols[4]
    enc = np.array(cols[5], dtype=bool)
    a["encap"] = enc.astype(np.uint8)
    a["vni"] = np.where(enc, 1, 0)
    fwd = np.array([ns in (N1, FABRIC) and True for ns in cols[2]])
    a["outer_saddr"] = events.v4_field(np.where(enc, np.where(fwd, IP("172.30.0.11"), IP("172.30.0.12")), 0))
    a["outer_daddr"] = events.v4_field(np.where(enc, np.where(fwd, IP("172.30.0.12"), IP("172.30.0.11")), 0))
    a["saddr"] = events.v4_field([IP(x) for x in cols[6]])
    a["sport"] = cols[7]
    a["daddr"] = events.v4_field([IP(x) for x in cols[8]])
    a["dport"] = cols[9]
    a["tcp_seq"] = np.array(cols[10], dtype=np.uint64).astype(np.uint32)
    a["ip_id"] = cols[11]
    a["reason"] = cols[12]
    a["location"] = np.where(np.array(cols[12]) != 0, np.uint64(DROP_LOCATION), np.uint64(0))
    a["proto"] = 6
    a["tcp_flags"] = 0x18
    a["ip_len"] = 52 + (np.array(cols[11]) % 7) * 100
    a["len"] = a["ip_len"]
    a["flags"] = 2
    a["ttl"] = 64
    return a


def synth(n_events: int, seed: int = 1, **kw):
    """(records, meta, truth) with about n_events events in one array."""
    arrs, truth = [], []
    for arr, tr in synth_blocks(n_events, seed, **kw):
        arrs.append(arr)
        truth += tr
    return np.concatenate(arrs)[:], meta(), truth


def synth_flow(probes: int = 3, drop_requests: bool = False, client: str = "default/pod-1-1",
               server: str = "default/pod-2-1", port: int = 8080):
    """(records, meta) shaped like `podtrace flow SRC DST --proto tcp --port P --save`: one
    SYN per probe and its SYN-ACK; with drop_requests, every SYN is dropped by netfilter on
    the server's node (no reply)."""
    base = 5_000_000_000
    recs = []
    sent = []
    for i in range(probes):
        sport = 40000 + i
        t0 = base + i * 50_000_000
        path = _path(client, server)
        stop = DROP_AFTER + 1 if drop_requests else len(path)
        skb = 0xFFFF888100000000 + i * 4096
        for j, (ns, dev, hook, enc) in enumerate(path[:stop]):
            recs.append((t0 + j * HOP_NS, skb, ns, dev, hook, enc, PODS[client][2], sport,
                         PODS[server][2], port, 1000 + i, 100 + i, 0))
        if drop_requests:
            ns, dev, _, _ = path[stop - 1]
            recs.append((t0 + stop * HOP_NS, skb, ns, dev, 3, False, PODS[client][2], sport,
                         PODS[server][2], port, 1000 + i, 100 + i, NETFILTER_DROP))
        else:
            back = _path(server, client)
            t1 = t0 + 200_000
            for j, (ns, dev, hook, enc) in enumerate(back):
                recs.append((t1 + j * HOP_NS, skb + 1024, ns, dev, hook, enc, PODS[server][2], port,
                             PODS[client][2], sport, 9000 + i, 0, 0))
        sent.append({"seq": i + 1, "proto": "tcp", "src": PODS[client][2], "dst": PODS[server][2],
                     "sport": sport, "dport": port, "sent_ns": t0 - 1000,
                     "outcome": "timeout" if drop_requests else "answered",
                     "reply_from": None if drop_requests else PODS[server][2],
                     "rtt_ns": None if drop_requests else 400_000, "detail": None})
    arr = _records(recs)
    syn = arr["ip_id"] != 0
    arr["tcp_flags"] = np.where(syn, 0x02, 0x12)
    arr["ip_len"] = 60
    m = meta()
    m.update(kind="flow", src={"spec": client, "ip": PODS[client][2], "pod": client, "node": PODS[client][1],
                               "service": None},
             dst={"spec": server, "ip": PODS[server][2], "pod": server, "node": PODS[server][1],
                  "service": None},
             proto="tcp", port=port, probes=sent, service=None, probing=True,
             inventory="synthetic", version=1)
    return arr, m


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_load(n: int) -> dict:
    from tracer import tracefile
    from tracer import analysis

    arr, m, truth = synth(n)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "synth.parquet"
        w = tracefile.Writer(path)
        t0 = time.perf_counter()
        for i in range(0, len(arr), 4096):
            w.write_records(arr[i:i + 4096])
        w.close(m)
        t1 = time.perf_counter()
        analysis.load(path)   # warm-up: imports, first-call costs
        t2 = time.perf_counter()
        c2 = time.process_time()
        t = analysis.load(path)
        t3 = time.perf_counter()
        c3 = time.process_time()
        size = path.stat().st_size
    want = {s: sum(1 for x in truth if x[2] == s) for s in ("delivered", "dropped", "lost")}
    got = {s: int((t.packets["status"] == s).sum()) for s in ("delivered", "dropped", "lost")}
    return {
        "benchmark": "analysis.load",
        "events": len(arr), "packets": len(t.packets), "flows": len(t.flows), "hops": len(t.hops),
        "write_s": round(t1 - t0, 3), "file_mib": round(size / 2**20, 1),
        "bytes_per_event": round(size / len(arr), 1),
        "load_s": round(t3 - t2, 3), "load_cpu_s": round(c3 - c2, 3),
        "load_events_per_s": int(len(arr) / (t3 - t2)),
        "first_load_s": round(t2 - t1, 3),
        "verdicts_match_truth": got == want, "truth": want,
        "loadavg_1m": os.getloadavg()[0],
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench_writer(n: int, keep_all: bool = False) -> dict:
    """The capture's writer path: 4096-event chunks (the ring buffer sink's size) through
    tracer.runs.spool.Spool into tracefile.Writer. One synthetic block is made once and replayed with
    shifted timestamps, so the figures are the writer's, not the generator's. keep_all=True
    holds every event in memory first (what a capture without row groups would need)."""
    from tracer import tracefile
    from tracer.runs.spool import Spool

    block, _ = next(synth_blocks(100_000, seed=2))
    span = int(block["ts_ns"].max() - block["ts_ns"].min()) + 1_000_000
    base = rss_mib()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.parquet"
        w = tracefile.Writer(path)
        spool = Spool(w)
        kept = []
        t0 = time.perf_counter()
        c0 = time.process_time()
        made = rounds = 0
        while made < n:
            arr = block.copy()
            arr["ts_ns"] += np.uint64(rounds * span)
            for i in range(0, len(arr), 4096):
                chunk = arr[i:i + 4096]
                if keep_all:
                    kept.append(chunk.copy())
                else:
                    spool.add(chunk)
            made += len(arr)
            rounds += 1
        if keep_all:
            spool.add(np.concatenate(kept, dtype=events.EVENT_DTYPE))
        spool.flush()
        w.close(meta())
        t1 = time.perf_counter()
        c1 = time.process_time()
        size = path.stat().st_size
        groups = w.row_groups
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "benchmark": "capture writer" + (" (all in memory)" if keep_all else ""),
        "events": made, "row_group_events": tracefile.ROW_GROUP_EVENTS, "row_groups": groups,
        "write_s": round(t1 - t0, 3), "write_cpu_s": round(c1 - c0, 3), "events_per_s": int(made / (t1 - t0)),
        "file_mib": round(size / 2**20, 1), "raw_event_mib": round(made * events.EVENT_DTYPE.itemsize / 2**20, 1),
        "rss_before_mib": round(base, 1), "peak_rss_mib": round(peak, 1),
        "peak_minus_before_mib": round(peak - base, 1), "loadavg_1m": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["load", "writer", "writer-unbounded"])
    ap.add_argument("--events", type=int, default=None)
    args = ap.parse_args()
    if args.what == "load":
        out = bench_load(args.events or 1_000_000)
    else:
        out = bench_writer(args.events or 2_000_000, keep_all=args.what == "writer-unbounded")
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
