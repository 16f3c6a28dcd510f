"""Trace file metadata: where a trace was made (host, kernel, clocks), what cluster it saw."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tracer import settings
from tracer.errors import BadInput

FORMAT_VERSION = 3   # 3: 16-byte addresses of both families and the IPv6 flow label
ROW_GROUP_EVENTS = 65536   # events per row group of a trace file, unless a run says otherwise


def host_meta() -> dict:
    """What every file records about where it was made: kernel, host, clocks."""
    u = os.uname()
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return {
        "kernel": {"release": u.release, "version": u.version, "machine": u.machine},
        "hostname": socket.gethostname(),
        # ts_ns is bpf_ktime_get_ns() (CLOCK_MONOTONIC of the kernel that saw the event);
        # realtime = ts_ns + realtime_offset_ns. Every lab node shares this machine's kernel,
        # so their offsets to the trace clock are 0; merged traces of real nodes will fill
        # node_offsets_ns per node.
        "clock": {"source": "CLOCK_MONOTONIC (bpf_ktime_get_ns)",
                  "realtime_offset_ns": time.time_ns() - mono, "node_offsets_ns": {}},
    }


def cluster_meta(inv, topo=None, placement: dict | None = None) -> dict:
    """Nodes, pods and Services of an inventory (k8s.Inventory), with the network-namespace
    inode of each when this machine has it (a cluster.topology.Topology: the lab)."""
    from tracer.node import netns

    ns_of_pod = {p.key: p.netns for p in (topo.pods if topo else ())}
    ns_of_node = {n.name: n.netns for n in (topo.nodes if topo else ())}

    def inode(name):
        try:
            return netns.inode(name) if name and netns.exists(name) else None
        except OSError:
            return None

    out = {
        "nodes": [{"name": n.name, "ip": n.ip, "pod_cidr": n.pod_cidr,
                   "netns_inode": inode(ns_of_node.get(n.name))} for n in inv.nodes.values()],
        "pods": [{"key": p.key, "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                  "netns_inode": inode(ns_of_pod.get(p.key))} for p in inv.pods.values()],
        "services": [{"key": s.key, "namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
                      "ports": s.ports, "backends": s.backends, "backend_ips": s.backend_ips}
                     for s in inv.services.values()],
        "inventory": inv.source,
    }
    if topo is not None and topo.labels:
        out["lab"] = {"prefix": topo.labels.get("prefix"), "cni": topo.labels.get("cni")}
        for n in out["nodes"]:
            ln = topo.node(n["name"])
            for k in ("uplink", "overlay", "bridge", "overlay_ip"):
                if ln is not None and getattr(ln, k):
                    n[k] = getattr(ln, k)
    if placement is not None:
        out["clock_nodes"] = sorted({v[0] for v in placement.values() if v[0]})
    return out


def _infer_cluster(meta: dict) -> dict:
    """For `flow --save`, whose caller passes only its own metadata: the cluster it traced,
    from the lab (inventory source "lab PREFIX") or the --cluster file it names."""
    from tracer.cluster import inventory
    from tracer.cluster import sources, topology

    src = str(meta.get("inventory") or "")
    try:
        if src.startswith("lab"):
            topo = topology.load_local(src[3:].strip() or settings.lab_prefix())
            if topo is not None:
                return cluster_meta(sources.topology_inventory(topo), topo)
        elif src and src != "none" and Path(src).is_file():
            return cluster_meta(inventory.load_list(src))
    except (BadInput, OSError, ValueError, KeyError):
        pass  # the trace is still complete without names; never fail a save over them
    return {}


def finish_meta(meta: dict, counters: dict | None = None) -> dict:
    """The metadata a file is written with: the caller's, completed with the format, the
    host, the cluster and every node's clock offset."""
    out = {**meta}
    out["format_version"] = FORMAT_VERSION
    out.setdefault("kind", "flow" if "src" in out else "capture")
    host = host_meta()
    for k, v in host.items():
        out.setdefault(k, v)
    if "nodes" not in out:
        out.update({k: v for k, v in _infer_cluster(out).items() if k not in out})
    clock = out["clock"] = dict(out["clock"] or {})
    if "realtime_offset_ns" not in clock and not clock.get("offsets"):
        # events on this host's clock (a flow traced in this process): this host dates them
        clock["realtime_offset_ns"] = host["clock"]["realtime_offset_ns"]
    offsets = dict(clock.get("node_offsets_ns") or {})
    for name, o in (clock.get("offsets") or {}).items():   # flow's agents: estimated offsets
        if isinstance(o, dict) and "offset_ns" in o:
            offsets.setdefault(name, int(o["offset_ns"]))
    for n in out.get("nodes") or []:
        offsets.setdefault(n["name"], 0)
    clock["node_offsets_ns"] = offsets
    clock.setdefault("source", "CLOCK_MONOTONIC (bpf_ktime_get_ns)")
    if counters is not None:
        out["counters"] = counters
    out.setdefault("counters", {})
    out.setdefault("hooks", [])
    return out
