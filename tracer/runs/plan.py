"""Planning a flow run: the metadata, the two ends, the probe, and what each node traces."""

from __future__ import annotations

import os
import time
from pathlib import Path
from dataclasses import dataclass


import socket

from tracer.agents import agent as agent_mod
from tracer.kernel import program as bpfprog
from tracer.agents import coordinator
from tracer.reconstruct import packets as flows
from tracer.cluster import inventory as k8s
from tracer.node import netns
from tracer.node import facts as nodecheck
from tracer.node import prober as probe
from tracer.kernel import formats as tracefs
from tracer.config import FlowConfig
from tracer.errors import BadInput, EnvironmentProblem, require_capabilities


def load_inventory(cfg: FlowConfig) -> tuple[k8s.Inventory, dict | None]:
    """--cluster FILE, else the kubeconfig / in-cluster config, else the lab's inventory when
    the lab is up (the contract's order). Lab namespaces are added to a cluster file's pods
    when they describe the same pods. A cluster connection is kept on cfg._conn."""
    from tracer.lab import build as labbuild

    lab = labbuild.status(cfg.lab_prefix)
    cfg._conn = None
    if cfg.cluster:
        inv = k8s.load_list(cfg.cluster)
        if lab:
            labinv = k8s.from_lab(lab)
            for key, pod in inv.pods.items():
                lp = labinv.pods.get(key)
                if lp and lp.ip == pod.ip:
                    pod.netns, pod.host_veth = lp.netns, lp.host_veth
        return inv, lab
    from tracer.cluster import api as kube

    ref = kube.find_config(cfg.kubeconfig, cfg.context)
    if ref is not None:
        conn = kube.connect(cfg.kubeconfig, cfg.context, ref=ref)
        inv, _streams = kube.inventory_for(conn, [s for s in (cfg.src, cfg.dst) if s])
        cfg._conn = conn
        return inv, None
    if lab:
        return k8s.from_lab(lab), lab
    raise EnvironmentProblem(
        "no cluster metadata: no --cluster FILE and no lab is up",
        "pass --cluster FILE (kubectl get nodes,pods,services,endpointslices -A -o json) or run `podtrace lab up`")


def placement_from_lab(lab: dict | None) -> flows.Placement:
    pl = flows.Placement()
    if not lab:
        return pl
    fabric = lab.get("fabric_netns")
    if fabric and netns.exists(fabric):
        pl.netns[netns.inode(fabric)] = (None, None)
    for n in lab.get("nodes", []):
        if netns.exists(n["netns"]):
            pl.netns[netns.inode(n["netns"])] = (n["name"], None)
    for p in lab.get("pods", []):
        if netns.exists(p["netns"]):
            pl.netns[netns.inode(p["netns"])] = (p["node"], f"{p['namespace']}/{p['name']}")
    return pl


def node_refs(lab: dict | None) -> dict[str, nodecheck.NodeRef]:
    """The nodes whose configuration this process can read: every lab node, or this host."""
    if lab:
        return {n["name"]: nodecheck.NodeRef(n["name"], n["netns"]) for n in lab.get("nodes", [])
                if netns.exists(n["netns"])}
    host = socket.gethostname()
    return {host: nodecheck.NodeRef(host, None)}


def tc_devices(lab: dict | None, src: k8s.Endpoint, dst: k8s.Endpoint) -> list[tuple[str | None, str]]:
    """The hop devices on the path, per node: pod host veths, the bridge, the overlay and the
    uplink of every node a packet of this flow can cross (lab only for now)."""
    if not lab:
        return []
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.get("pods", [])}
    keys = [e.pod.key for e in (src, dst) if e.pod]
    if dst.service:
        keys += dst.service.backends
    involved = [pods[k] for k in keys if k in pods]
    out: list[tuple[str | None, str]] = []
    for n in lab.get("nodes", []):
        mine = [p for p in involved if p["node"] == n["name"]]
        if not mine:
            continue
        for p in mine:
            out.append((n["netns"], p["host_veth"]))
        for key in ("bridge", "overlay", "uplink"):
            if n.get(key):
                out.append((n["netns"], n[key]))
    return list(dict.fromkeys(out))


def choose_proto(cfg: FlowConfig, dst: k8s.Endpoint) -> tuple[str, int | None, list[str]]:
    notes = []
    proto, port = cfg.proto, cfg.port
    if proto is None:
        if dst.service and dst.service.ports:
            first = dst.service.ports[0]
            proto, port = first["protocol"].lower(), port or int(first["port"])
            notes.append(f"{dst.service.key} is a Service: probing {proto}/{port} "
                         "(ClusterIPs do not answer ICMP)")
        else:
            proto = "icmp"
    if proto not in ("icmp", "tcp", "udp"):
        raise BadInput(f"unknown protocol {proto!r}", "use --proto icmp, tcp or udp")
    if proto == "icmp":
        if port is not None:
            raise BadInput("--port makes no sense with ICMP", "drop --port or use --proto tcp|udp")
    elif port is None:
        raise BadInput(f"--proto {proto} needs --port", f"e.g. --proto {proto} --port 8080")
    elif not 1 <= port <= 65535:
        raise BadInput(f"port {port} is out of range", "use a port between 1 and 65535")
    return proto, port, notes


@dataclass
class Plan:
    """What a run needs before tracing starts: the ends, the probe, the metadata."""

    cfg: FlowConfig
    inv: k8s.Inventory
    lab: dict | None
    src: k8s.Endpoint
    dst: k8s.Endpoint
    proto: str
    port: int | None
    notes: list[str]
    placement: flows.Placement
    drop_reasons: dict[int, str]
    ct_names: dict[int, str]
    addrs: list[str]
    t_start: float
    t_resolved: float = 0.0


def prepare(cfg: FlowConfig) -> Plan:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                                 "run it again with sudo")
    if cfg.save and not Path(cfg.save).parent.is_dir():   # before tracing, not after it
        raise BadInput(f"cannot write {cfg.save}: directory {Path(cfg.save).parent} does not exist",
                       "create it or choose another path")
    if cfg.count < 1 or cfg.count > 1000:
        raise BadInput(f"--count {cfg.count} is out of range", "use 1..1000")
    if cfg.size is not None and not 28 + len(probe.PAYLOAD) <= cfg.size <= 65000:
        raise BadInput(f"--size {cfg.size} is out of range", f"use {28 + len(probe.PAYLOAD)}..65000 bytes")
    if not cfg.probe and cfg.duration <= 0:
        raise BadInput("--duration must be positive", "e.g. --no-probe --duration 5")
    inv, lab = load_inventory(cfg)
    if getattr(cfg, "_conn", None) is None:   # tracing here (in a cluster, the agents trace)
        require_capabilities("tracing")
    src = k8s.resolve(cfg.src, inv)
    dst = k8s.resolve(cfg.dst, inv)
    proto, port, notes = choose_proto(cfg, dst)
    if cfg.probe and proto == "icmp" and getattr(cfg, "_conn", None) is None:
        require_capabilities("ICMP probes (a raw socket)", ("CAP_NET_RAW",))
    if dst.service and not dst.service.backend_ips:
        notes.append(f"{dst.service.key} has no ready endpoints: nothing can answer on its ClusterIP")
    if cfg.sport is not None and proto == "icmp":
        raise BadInput("--sport applies to TCP and UDP probes", "use --proto tcp|udp with --sport")
    if cfg.size is not None and proto == "tcp":
        raise BadInput("--size applies to ICMP and UDP probes (a TCP probe is a bare SYN)",
                       "use --proto icmp or udp with --size")
    if cfg.probe:
        if src.pod is None:
            raise BadInput(f"probes are sent from a pod; {cfg.src} is not a pod",
                           "give a pod as SRC, or watch real traffic with --no-probe")
        in_cluster = getattr(cfg, "_conn", None) is not None   # the agent finds it on its node
        if not in_cluster and (not src.pod.netns or not netns.exists(src.pod.netns)):
            raise EnvironmentProblem(
                f"the network namespace of {src.pod.key} is not on this machine",
                "run podtrace against the lab, or on a cluster with the agent DaemonSet (manifests/)")
    return Plan(cfg, inv, lab, src, dst, proto, port, notes, placement_from_lab(lab),
                 tracefs.drop_reasons(), bpfprog.ct_info_names(),
                 sorted(set(src.addresses() + dst.addresses())), t_start, time.monotonic())


def agent_plans(plan: Plan) -> list[coordinator.AgentPlan]:
    """One agent per lab node a packet of this flow can cross, plus the fabric (the lab's
    underlay switch, which in a real cluster is the physical network nobody traces)."""
    lab, src, dst, cfg = plan.lab, plan.src, plan.dst, plan.cfg
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.get("pods", [])}
    keys = [e.pod.key for e in (src, dst) if e.pod] + (dst.service.backends if dst.service else [])
    nodes = list(dict.fromkeys(pods[k]["node"] for k in keys if k in pods))
    if src.node and not src.pod:
        nodes.insert(0, src.node.name)
    if dst.node and not dst.pod and dst.node.name not in nodes:
        nodes.append(dst.node.name)
    devices = tc_devices(lab, src, dst) if cfg.tc else []
    out = []
    for n in lab.get("nodes", []):
        if n["name"] not in nodes:
            continue
        inodes = [netns.inode(n["netns"])] + [netns.inode(p["netns"]) for p in lab.get("pods", [])
                                               if p["node"] == n["name"] and netns.exists(p["netns"])]
        req = {"version": agent_mod.REQUEST_VERSION, "node": n["name"], "node_netns": n["netns"],
               "netns_filter": inodes, "addrs": plan.addrs,
               "tc_devices": [list(d) for d in devices if d[0] == n["netns"]],
               "sample": cfg.sample, "budget": cfg.budget,
               "max_seconds": (cfg.duration if not cfg.probe else cfg.count * (cfg.timeout + cfg.interval)) + 60}
        if cfg.probe and src.pod and src.pod.node == n["name"]:
            req["probe"] = {"netns": src.pod.netns, "src": src.ip, "dst": plan.dst.ip, "proto": plan.proto,
                            "port": plan.port, "count": cfg.count, "timeout": cfg.timeout,
                            "interval": cfg.interval, "size": cfg.size, "sport": cfg.sport,
                            "settle": cfg.settle}
        out.append(coordinator.AgentPlan(n["name"], req))
    fabric = lab.get("fabric_netns")
    if fabric and netns.exists(fabric) and len(out) > 1:
        out.append(coordinator.AgentPlan("fabric", {
            "version": agent_mod.REQUEST_VERSION, "node": "fabric", "node_netns": fabric,
            "netns_filter": [netns.inode(fabric)], "addrs": plan.addrs, "tc_devices": [],
            "sample": cfg.sample, "budget": cfg.budget,
            "max_seconds": out[0].request["max_seconds"]}))
    return out


def cluster_plans(plan: Plan) -> list[coordinator.AgentPlan]:
    """A real cluster: the agent of each node the flow's pods are on discovers the pods'
    namespaces and hop devices itself (by address); its view is its whole kernel."""
    src, dst, cfg = plan.src, plan.dst, plan.cfg
    pods = [e.pod for e in (src, dst) if e.pod]
    if dst.service:
        pods += [plan.inv.pods[k] for k in dst.service.backends if k in plan.inv.pods]
    nodes = list(dict.fromkeys(p.node for p in pods if p.node))
    pod_ips = sorted({p.ip for p in pods if p.ip})
    node_ips = sorted({n.ip for n in plan.inv.nodes.values() if n.ip})
    out = []
    for node in nodes:
        req = {"version": agent_mod.REQUEST_VERSION, "node": node, "node_netns": None, "netns_filter": None,
               "addrs": plan.addrs, "tc_devices": "auto" if cfg.tc else [],
               "discover": {"pod_ips": pod_ips, "node_ips": node_ips}, "sample": cfg.sample, "budget": cfg.budget,
               "max_seconds": (cfg.duration if not cfg.probe else cfg.count * (cfg.timeout + cfg.interval)) + 60}
        if cfg.probe and src.pod and src.pod.node == node:
            req["probe"] = {"netns": None, "src": src.ip, "dst": dst.ip, "proto": plan.proto, "port": plan.port,
                            "count": cfg.count, "timeout": cfg.timeout, "interval": cfg.interval,
                            "size": cfg.size, "sport": cfg.sport, "settle": cfg.settle}
        out.append(coordinator.AgentPlan(node, req))
    if cfg.probe and not any("probe" in p.request for p in out):
        raise BadInput(f"{cfg.src} has no node in the cluster metadata", "pick a running pod as SRC")
    return out

