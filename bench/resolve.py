"""Endpoint resolution on a large synthetic cluster: 10,000 pods, 1,000 Services (each with
an EndpointSlice of 10 backends), 100 nodes. Prints JSON figures:

- build: `k8s.from_items` on the whole List (what --cluster FILE does) and, separately, the
  same objects applied one by one as watch events (what ClusterSource does);
- resolve: p50/p99/max per spec kind (pod name, ns/pod, Service, node, pod IP, VIP, unknown
  IP), against the live index, and the old full `by_ip()` scan for comparison;
- memory: bytes held by the inventory (tracemalloc), total and per pod.

    .venv/bin/python bench/resolve.py [--pods 10000] [--services 1000] [--nodes 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.cluster import inventory as k8s  # noqa: E402
from tracer.cluster import endpoints  # noqa: E402


def items(n_pods: int, n_svcs: int, n_nodes: int) -> list[dict]:
    out = []
    for i in range(n_nodes):
        out.append({"kind": "Node", "metadata": {"name": f"node-{i}", "uid": f"n{i}"},
                    "spec": {"podCIDR": f"10.{64 + i // 256}.{i % 256}.0/24"},
                    "status": {"addresses": [{"type": "InternalIP", "address": f"172.16.{i // 250}.{i % 250 + 1}"}]}})
    per_app = max(1, n_pods // n_svcs)
    for i in range(n_pods):
        app = i // per_app
        node = i % n_nodes
        rs = f"app-{app}-5d4f8b7c9"
        out.append({"kind": "Pod",
                    "metadata": {"name": f"{rs}-{i:05d}", "namespace": f"ns-{app % 50}", "uid": f"p{i}",
                                 "labels": {"app": f"app-{app}", "pod-template-hash": "5d4f8b7c9"},
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                                      "uid": f"rs{app}", "controller": True}]},
                    "spec": {"nodeName": f"node-{node}"},
                    "status": {"podIP": f"10.{64 + node // 256}.{node % 256}.{i // n_nodes + 2}"}})
    pods_by_app: dict[int, list[dict]] = {}
    for it in out:
        if it["kind"] == "Pod":
            pods_by_app.setdefault(int(it["metadata"]["labels"]["app"].split("-")[1]), []).append(it)
    for s in range(n_svcs):
        ns = f"ns-{s % 50}"
        out.append({"kind": "Service", "metadata": {"name": f"app-{s}", "namespace": ns},
                    "spec": {"clusterIP": f"10.96.{s // 250}.{s % 250 + 1}", "selector": {"app": f"app-{s}"},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        out.append({"kind": "EndpointSlice",
                    "metadata": {"name": f"app-{s}-abcde", "namespace": ns,
                                 "labels": {"kubernetes.io/service-name": f"app-{s}"}},
                    "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                                   "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"]}}
                                  for p in pods_by_app.get(s, [])]})
    return out


def _pcts(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_us": round(statistics.median(s) * 1e6, 2),
            "p99_us": round(s[int(len(s) * 0.99) - 1] * 1e6, 2),
            "max_us": round(s[-1] * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--services", type=int, default=1_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2_000)
    a = ap.parse_args()
    rnd = random.Random(1)
    objs = items(a.pods, a.services, a.nodes)

    gc.collect()
    tracemalloc.start()
    inv = k8s.from_items(objs, source="bench")
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del inv
    gc.collect()
    t = time.perf_counter()
    inv = k8s.from_items(objs, source="bench")
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    live = k8s.Inventory(source="bench-watch")
    for it in objs:
        live.apply("ADDED", it)
    apply_s = time.perf_counter() - t

    pods = list(inv.pods.values())
    svcs = list(inv.services.values())
    nodes = list(inv.nodes.values())
    kinds = {
        "ns/pod": lambda: rnd.choice(pods).key,
        "svc/ns/name": lambda: "svc/" + rnd.choice(svcs).key,
        "node/name": lambda: "node/" + rnd.choice(nodes).name,
        "pod ip": lambda: rnd.choice(pods).ip,
        "service vip": lambda: rnd.choice(svcs).cluster_ip,
        "unknown ip": lambda: f"192.0.2.{rnd.randrange(1, 255)}",
    }
    resolve = {}
    for kind, gen in kinds.items():
        specs = [gen() for _ in range(a.samples)]
        samples = []
        for spec in specs:
            t = time.perf_counter()
            endpoints.resolve(spec, live)
            samples.append(time.perf_counter() - t)
        resolve[kind] = _pcts(samples)
    scan = []
    for _ in range(50):
        ip = rnd.choice(pods).ip
        t = time.perf_counter()
        inv.by_ip().get(ip)
        scan.append(time.perf_counter() - t)
    miss = []
    for i in range(20):
        t = time.perf_counter()
        try:
            endpoints.resolve(f"ns-{i}/app-x-{i}", live)
        except k8s.BadInput:
            pass
        miss.append(time.perf_counter() - t)
    # Churn: a watch event (pod moved to another node and address) then a resolve.
    churn = []
    for i in range(a.samples):
        p = rnd.choice(pods)
        obj = {"kind": "Pod", "metadata": {"name": p.name, "namespace": p.namespace},
               "spec": {"nodeName": "node-0"}, "status": {"podIP": f"10.200.{i // 256}.{i % 256}"}}
        t = time.perf_counter()
        live.apply("MODIFIED", obj)
        endpoints.resolve(obj["status"]["podIP"], live)
        churn.append(time.perf_counter() - t)

    print(json.dumps({
        "inventory": {"pods": len(inv.pods), "services": len(inv.services), "nodes": len(inv.nodes),
                      "endpointslices": len(inv.slices)},
        "build_from_list_ms": round(build_s * 1e3, 1),
        "build_from_watch_events_ms": round(apply_s * 1e3, 1),
        "resolve": resolve,
        "unknown_name_with_suggestions_ms": round(statistics.median(miss) * 1e3, 2),
        "old_full_by_ip_scan_ms": round(statistics.median(scan) * 1e3, 2),
        "watch_event_then_resolve": _pcts(churn),
        "memory_mb": round(mem / 2**20, 1),
        "memory_bytes_per_pod": round(mem / max(1, len(inv.pods))),
        "python": sys.version.split()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
