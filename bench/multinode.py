"""Benchmark: a capture of many nodes (one trace file per node) loaded as a directory.

Synthetic but shaped like a cluster's agents' files: `--nodes` nodes with `--pods` pods each,
TCP flows between pods on different nodes (some to a Service, DNATed on the client's node),
every packet crossing 10 hops on two nodes (pod eth0 → veth → cni0 → flannel.1 → eth0 in
VXLAN, and back down on the other node), delivered (consumed in the pod), dropped by
netfilter on the receiving node's flannel.1, or lost after the sender's uplink. Each node's
file holds only its own hops, on its own monotonic clock (nodes booted hours apart; the
files' `clock.realtime_offset_ns` say by how much), written by the project's trace file
writer (`tracefile.Writer`).

    .venv/bin/python bench/multinode.py [--events 10000000] [--nodes 10] [--partition-events N]
                                        [--dir DIR] [--keep] [--quick]

Writes the files (not timed), then in a fresh process times `analysis.load(DIR)` and reads
its peak RSS (the process's high-water mark): one JSON object. `write_nodes()` is also what
the unit tests split a trace with.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer import tracefile  # noqa: E402
from tracer.kernel import record  # noqa: E402

HOPS = 10                         # per packet: 5 on the sender's node, 5 on the receiver's
SVC_IP, SVC_PORT, POD_PORT = "10.96.0.10", 80, 8080
NETFILTER_DROP, DROP_LOCATION = 6, 0xFFFFFFFF81ABCDEF
REALTIME_OFFSET_NS = 1_780_000_000_000_000_000     # node 1's: wall clock = monotonic + this
BOOT_APART_NS = 3600 * 10**9                        # node k booted k hours before node 0
_TX, _RX, _DROP, _CONSUME = 2, 1, 3, 4
_IP = lambda s: int(ipaddress.IPv4Address(s))  # noqa: E731


class Cluster:
    """Names, addresses and namespace inodes of a synthetic cluster."""

    def __init__(self, nodes: int, pods: int):
        self.nodes = [f"node-{k + 1}" for k in range(nodes)]
        self.node_ns = np.array([4026532000 + k for k in range(nodes)], dtype=np.int64)
        self.node_ip = np.array([_IP(f"172.30.0.{11 + k}") for k in range(nodes)], dtype=np.int64)
        self.pod_node = np.repeat(np.arange(nodes), pods)
        self.pod_ns = np.array([4026533000 + i for i in range(nodes * pods)], dtype=np.int64)
        self.pod_ip = np.array([_IP(f"10.244.{k + 1}.{2 + j}") for k in range(nodes) for j in range(pods)],
                               dtype=np.int64)
        self.pod_name = [f"default/pod-{k + 1}-{j + 1}" for k in range(nodes) for j in range(pods)]
        self.veth = [f"veth{k + 1:02d}{j + 1:02d}aaaa" for k in range(nodes) for j in range(pods)]
        self.backend = len(self.pod_name) - 1           # the Service's only backend: on the last node

    def meta(self, node: int) -> dict:
        """Node `node`'s file metadata: the whole cluster's inventory (as agents have it), its
        own namespaces' placement, its own host and clock."""
        placement = {str(int(self.node_ns[node])): [self.nodes[node], None]}
        placement.update({str(int(self.pod_ns[i])): [self.nodes[node], self.pod_name[i]]
                          for i in np.flatnonzero(self.pod_node == node)})
        return {
            "kind": "capture", "hostname": self.nodes[node], "placement": placement,
            "nodes": [{"name": n, "ip": str(ipaddress.IPv4Address(int(ip))), "pod_cidr": f"10.244.{k + 1}.0/24"}
                      for k, (n, ip) in enumerate(zip(self.nodes, self.node_ip))],
            "pods": [{"key": p, "namespace": "default", "name": p.split("/")[1],
                      "node": self.nodes[self.pod_node[i]], "ip": str(ipaddress.IPv4Address(int(self.pod_ip[i])))}
                     for i, p in enumerate(self.pod_name)],
            "services": [{"key": "default/web", "namespace": "default", "name": "web", "cluster_ip": SVC_IP,
                          "ports": [{"port": SVC_PORT, "target_port": POD_PORT, "protocol": "TCP"}],
                          "backends": [self.pod_name[self.backend]]}],
            "drop_reasons": {str(NETFILTER_DROP): "NETFILTER_DROP"},
            "locations": {str(DROP_LOCATION): "nft_do_chain+0x46f"},
            "counters": {"seen": 0, "matched": 0, "emitted": 0, "lost": 0},
            "hooks": ["tp:netif_receive_skb", "tp:net_dev_start_xmit", "tp:kfree_skb", "tp:consume_skb"],
            "clock": {"source": "CLOCK_MONOTONIC (bpf_ktime_get_ns)",
                      "realtime_offset_ns": REALTIME_OFFSET_NS - node * BOOT_APART_NS, "node_offsets_ns": {}},
        }


def blocks(cluster: Cluster, n_events: int, seed: int = 1, block_packets: int = 100_000,
           drop_rate: float = 0.01, lost_rate: float = 0.005, packets_per_flow: int = 16,
           bare_frees: float = 0.0):
    """Yields per block (in time order, blocks apart in time) the records of every node on
    node 1's clock, as a list indexed by node. About n_events in all. `bare_frees`: the
    share of drops and frees whose headers the kernel could not read (only the buffer's
    address ties them to their packet)."""
    rng = np.random.default_rng(seed)
    n_pods = len(cluster.pod_name)
    made = flow_base = 0
    t_base = 1_000_000_000
    while made < n_events:
        n_pk = min(block_packets, max((n_events - made) // HOPS, 1))
        n_fl = max(n_pk // packets_per_flow, 1)
        cli = rng.integers(0, n_pods, n_fl)
        # the server: a pod on another node, or (1 in 4) the Service
        srv = (cli + len(cluster.pod_name) // len(cluster.nodes) * rng.integers(1, len(cluster.nodes), n_fl)) % n_pods
        svc = rng.random(n_fl) < 0.25
        svc &= cluster.pod_node[cli] != cluster.pod_node[cluster.backend]
        srv = np.where(svc, cluster.backend, srv)
        sport = 20000 + (flow_base + np.arange(n_fl)) % 40000
        isn = rng.integers(0, 2**32 - 1, (n_fl, 2), dtype=np.int64)
        start = t_base + np.sort(rng.integers(0, n_pk * 2_000, n_fl))
        fl = rng.integers(0, n_fl, n_pk)
        k = np.zeros(n_pk, dtype=np.int64)                       # the packet's number in its flow
        order = np.argsort(fl, kind="stable")
        firsts = np.r_[0, np.flatnonzero(np.diff(fl[order])) + 1]
        k[order] = np.arange(n_pk) - np.repeat(firsts, np.diff(np.r_[firsts, n_pk]))
        request = k % 2 == 0
        t0 = start[fl] + k * 150_000 + rng.integers(0, 1000, n_pk)
        u = rng.random(n_pk)
        stop = np.where(u < drop_rate, 7, np.where(u < drop_rate + lost_rate, 5, HOPS))
        a_pod = np.where(request, cli[fl], srv[fl])              # this packet's sender and receiver
        b_pod = np.where(request, srv[fl], cli[fl])
        is_svc = svc[fl]
        seq = (isn[fl, (~request).astype(int)] + (k // 2) * 1448) % 2**32
        ip_id = ((flow_base + fl) * 7 + k // 2 + np.where(request, 0, 30000)) % 65536
        ip_len = 52 + (k % 5) * 300
        skb_a = 0xFFFF888000000000 + rng.integers(0, 1 << 16, n_pk).astype(np.uint64) * np.uint64(256)
        skb_b = 0xFFFF888800000000 + rng.integers(0, 1 << 16, n_pk).astype(np.uint64) * np.uint64(256)
        gaps = rng.integers(2_000, 30_000, (n_pk, HOPS + 1))
        gaps[:, 0] = 0
        when = t0[:, None] + np.cumsum(gaps, axis=1)            # hop times, then the free's
        parts, part_node = [], []
        for h in range(HOPS + 1):
            last = h == HOPS
            at = np.flatnonzero((h < stop) if not last else np.ones(n_pk, dtype=bool))
            if last:       # the end of the buffer: consumed in the receiving pod, or dropped
                at = np.flatnonzero(stop != 5)
            if not len(at):
                continue
            hop = (stop[at] - 1) if last else np.full(len(at), h)
            recv = hop >= 5
            pod = np.where(recv, b_pod[at], a_pod[at])
            node = cluster.pod_node[pod]
            r = np.zeros(len(at), dtype=record.EVENT_DTYPE)
            r["ts_ns"] = when[at, h]
            r["skb"] = np.where(recv, skb_b[at], skb_a[at])
            in_pod = (hop == 0) | (hop == 9)
            r["netns"] = np.where(in_pod, cluster.pod_ns[pod], cluster.node_ns[node])
            dev = np.select([in_pod, (hop == 1) | (hop == 8), (hop == 2) | (hop == 7), (hop == 3) | (hop == 6)],
                            ["eth0", "veth", "cni0", "flannel.1"], "eth0")
            veth = np.array(cluster.veth, dtype=object)[pod]
            names = np.where(dev == "veth", veth, dev).astype("S16")
            r["ifname"] = names
            r["ifindex"] = np.select([dev == "eth0", dev == "cni0", dev == "flannel.1"], [2, 3, 4], 10 + pod % 100)
            if last:
                r["hook"] = np.where(stop[at] == 7, _DROP, _CONSUME)
                r["reason"] = np.where(stop[at] == 7, NETFILTER_DROP, 0)
                r["location"] = np.where(stop[at] == 7, np.uint64(DROP_LOCATION), np.uint64(0))
            else:
                r["hook"] = np.where(np.isin(hop, [0, 2, 3, 4, 7, 8]), _TX, _RX)
            enc = (hop == 4) | (hop == 5)
            r["encap"] = enc
            r["vni"] = enc
            a_node, b_node = cluster.pod_node[a_pod[at]], cluster.pod_node[b_pod[at]]
            r["outer_saddr"] = record.v4_field(np.where(enc, cluster.node_ip[a_node], 0))
            r["outer_daddr"] = record.v4_field(np.where(enc, cluster.node_ip[b_node], 0))
            # the Service: DNAT on the client's cni0 (hop 2 on), reverse NAT on its veth (hop 8 on)
            ci, si = cluster.pod_ip[cli[fl[at]]], cluster.pod_ip[srv[fl[at]]]
            rq = request[at]
            vip = is_svc[at] & np.where(rq, hop < 2, hop >= 8)
            src = np.where(rq, ci, np.where(vip, _IP(SVC_IP), si))
            dst = np.where(rq, np.where(vip, _IP(SVC_IP), si), ci)
            server_port = np.where(vip, SVC_PORT, POD_PORT)
            r["saddr"] = record.v4_field(src)
            r["daddr"] = record.v4_field(dst)
            r["sport"] = np.where(rq, sport[fl[at]], server_port)
            r["dport"] = np.where(rq, server_port, sport[fl[at]])
            r["proto"] = 6
            r["tcp_seq"] = seq[at]
            r["tcp_flags"] = 0x18
            r["ip_id"] = ip_id[at]
            r["ip_len"] = ip_len[at]
            r["len"] = ip_len[at] + np.where(enc, 50, 0)
            r["ttl"] = 64 - (hop >= 5)
            r["flags"] = 2
            if last and bare_frees:
                bare = rng.random(len(r)) < bare_frees
                for c in ("proto", "tcp_seq", "tcp_flags", "ip_id", "ip_len", "sport", "dport", "saddr", "daddr"):
                    r[c][bare] = 0
                r["flags"][bare] = record.FLAG_FOLLOWED
            parts.append(r)
            part_node.append(node)
        allr, node_of = np.concatenate(parts), np.concatenate(part_node)
        order = np.argsort(allr["ts_ns"], kind="stable")
        allr, node_of = allr[order], node_of[order]
        # one event per nanosecond at most: equal times would leave the order of two packets
        # to chance (a real clock rarely stamps two hops alike)
        ts = allr["ts_ns"].astype(np.int64)
        step = np.arange(len(ts), dtype=np.int64)
        allr["ts_ns"] = np.maximum.accumulate(ts - step) + step
        out = [allr[node_of == n] for n in range(len(cluster.nodes))]
        made += sum(len(a) for a in out)
        flow_base += n_fl
        t_base = int(max(a["ts_ns"].max() for a in out if len(a))) + 1_000_000_000
        yield out


def write_nodes(directory: Path, n_events: int, nodes: int = 10, pods: int = 4, seed: int = 1,
                combined: Path | None = None, **kw) -> list[Path]:
    """One trace file per node in `directory` (node-K.parquet), on each node's own clock;
    with `combined`, also every event in one file on node 1's clock. Returns the node files."""
    cluster = Cluster(nodes, pods)
    metas = [cluster.meta(k) for k in range(nodes)]
    paths = [directory / f"{n}.parquet" for n in cluster.nodes]
    writers = [tracefile.Writer(p, meta=m) for p, m in zip(paths, metas)]
    both = None
    if combined is not None:
        whole = dict(metas[0], hostname="all-nodes")
        whole["placement"] = {k: v for m in metas for k, v in m["placement"].items()}
        both = (tracefile.Writer(combined, meta=whole), whole)
    try:
        for per_node in blocks(cluster, n_events, seed, **kw):
            for k, (w, arr) in enumerate(zip(writers, per_node)):
                if len(arr):
                    mine = arr.copy()
                    mine["ts_ns"] += np.uint64(k * BOOT_APART_NS)    # node k's monotonic clock
                    w.write_records(mine)
            if both is not None:
                allr = np.concatenate(per_node)
                both[0].write_records(allr[np.argsort(allr["ts_ns"], kind="stable")])
        for w, m in zip(writers, metas):
            w.close(m)
        if both is not None:
            both[0].close(both[1])
    except BaseException:
        for w in writers + ([both[0]] if both else []):
            if w.tmp.exists():
                w.abort()
        raise
    return paths


def _measure(directory: str, partition_events: int | None) -> dict:
    """Runs in a fresh process: analysis.load(directory), the time and the peak RSS (VmHWM:
    getrusage's ru_maxrss would carry the writing parent's peak across fork and exec)."""
    from tracer import analysis

    t0 = time.perf_counter()
    c0 = time.process_time()
    t = analysis.load(directory, partition_events=partition_events)
    fl = t.flows
    dr = t.drops
    s = t.summary()
    t1 = time.perf_counter()
    c1 = time.process_time()
    out = {"load_s": round(t1 - t0, 1), "load_cpu_s": round(c1 - c0, 1),
           "peak_rss_mib": round(_hwm_kib() / 1024, 1),
           "events": s["events"], "packets": s["packets"], "flows": len(fl), "drop_rows": len(dr),
           **{k: s[k] for k in ("delivered", "dropped", "lost", "partial")},
           "partitions": getattr(t, "partitions", 1), "partition_events": getattr(t, "partition_events", None)}
    t.close() if hasattr(t, "close") else None
    return out


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write the node files (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--partition-events", type=int, default=None,
                    help="events per partition (default: analysis.partitioned.PARTITION_EVENTS)")
    ap.add_argument("--quick", action="store_true", help="200,000 events on 4 nodes, 50,000 per partition")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.events, args.nodes, args.partition_events = 200_000, 4, 50_000
    if args.measure:
        print(json.dumps(_measure(args.measure, args.partition_events)))
        return
    d = Path(args.dir or tempfile.mkdtemp(prefix="pt-multinode-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths = write_nodes(d, args.events, args.nodes, args.pods)
        write_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in paths)
        extra = ["--partition-events", str(args.partition_events)] if args.partition_events else []
        out = subprocess.run([sys.executable, __file__, "--measure", str(d), *extra], check=True,
                             capture_output=True, text=True, env=dict(os.environ)).stdout
        doc = {"benchmark": "multi-node analysis.load(DIR)", "nodes": args.nodes, "files": len(paths),
               "events_written": args.events, "write_s": round(write_s, 1), "files_mib": round(size / 2**20, 1),
               **json.loads(out),
               "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
        print(json.dumps(doc))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
