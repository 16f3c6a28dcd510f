"""Planning a flow run, from its options to the request each node's agent gets."""

from __future__ import annotations

import ipaddress

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tracer.agents.request import AgentRequest, Discovery, ProbeRequest
from tracer import settings
from tracer.kernel import program
from tracer.agents import coordinator
from tracer.reconstruct import packets
from tracer.cluster import endpoints, inventory
from tracer.cluster import sources
from tracer.cluster.topology import Topology
from tracer.node import netns
from tracer.node import facts
from tracer.node import prober
from tracer.kernel import formats
from tracer.config import FlowConfig
from tracer.errors import BadInput, EnvironmentProblem, require_capabilities

if TYPE_CHECKING:
    from tracer.cluster.api import Connection


def placement(topo: Topology | None) -> packets.Placement:
    """Name every namespace of this machine's topology: a node's, or a pod's on its node."""
    pl = packets.Placement()
    if topo is None:
        return pl
    if topo.fabric_netns and netns.exists(topo.fabric_netns):
        pl.netns[netns.inode(topo.fabric_netns)] = (None, None)
    for n in topo.nodes:
        if n.netns and netns.exists(n.netns):
            pl.netns[netns.inode(n.netns)] = (n.name, None)
    for p in topo.pods:
        if p.netns and netns.exists(p.netns):
            pl.netns[netns.inode(p.netns)] = (p.node, p.key)
    return pl


def node_refs(topo: Topology | None) -> dict[str, facts.NodeRef]:
    """The nodes whose configuration this process can read: every node of this machine's
    topology, or this host."""
    if topo is not None:
        return {n.name: facts.NodeRef(n.name, n.netns) for n in topo.nodes
                if n.netns and netns.exists(n.netns)}
    host = socket.gethostname()
    return {host: facts.NodeRef(host, None)}


def flow_pods(src: inventory.Endpoint, dst: inventory.Endpoint, inv: inventory.Inventory) -> list[inventory.Pod]:
    """The pods a packet of this flow can reach: the ends and a Service's backends."""
    pods = [e.pod for e in (src, dst) if e.pod]
    if dst.service:
        pods += [inv.pods[k] for k in dst.service.backends if k in inv.pods]
    return list({p.key: p for p in pods}.values())


def tc_devices(topo: Topology | None, src: inventory.Endpoint, dst: inventory.Endpoint) -> list[tuple[str | None, str]]:
    """The hop devices on the path, per node: the bridge, the overlay and the uplink of every
    node a packet of this flow can cross, and the pods' host veths (this machine's topology
    only: on a real node the agent finds them)."""
    if topo is None:
        return []
    keys = [e.pod.key for e in (src, dst) if e.pod] + (list(dst.service.backends) if dst.service else [])
    devs = topo.devices(keys, nodes=[dst.owner.name] if dst.owner else ())
    # On the eBPF datapath lab, the pods' own eth0 too (lab namespaces, by name): a packet a
    # tc program moves into a pod with bpf_redirect_peer passes no netif_receive_skb there,
    # only the pod device's tc ingress hook. Elsewhere the tracepoints see that hop.
    if topo.labels.get("datapath") != "ebpf":
        return devs
    wanted = set(keys)
    return devs + [(p.netns, POD_DEV) for p in topo.pods
                   if p.key in wanted and p.netns and not p.netns.startswith("/")]


POD_DEV = "eth0"     # a lab pod's device


def choose_proto(cfg: FlowConfig, dst: inventory.Endpoint) -> tuple[str, int | None, list[str]]:
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


def resolve_ends(cfg: FlowConfig, inv: inventory.Inventory) -> tuple[inventory.Endpoint, inventory.Endpoint, int]:
    """SRC and DST of the inventory, addressed in the flow's family (--ip-family, else
    SRC's first family DST has too), and that family."""
    src = endpoints.resolve(cfg.src, inv, cfg.namespace)
    dst = endpoints.resolve(cfg.dst, inv, cfg.namespace)
    family = endpoints.choose_family(src, dst, cfg.ip_family)
    src, dst = endpoints.in_family(src, family), endpoints.in_family(dst, family)
    if family == 6 and cfg.size is not None and cfg.size < 48 + len(prober.PAYLOAD):
        raise BadInput(f"--size {cfg.size} is below an IPv6 probe's headers",
                       f"use {48 + len(prober.PAYLOAD)}..65000 bytes")
    return src, dst, family


@dataclass
class Plan:
    """What a run needs before tracing starts: the ends, the probe, the metadata."""

    cfg: FlowConfig
    inv: inventory.Inventory
    topology: Topology | None       # this machine holds the nodes (the lab): their shape
    conn: Connection | None         # a live API connection: the cluster's agents trace
    src: inventory.Endpoint
    dst: inventory.Endpoint
    proto: str
    port: int | None
    notes: list[str]
    placement: packets.Placement
    drop_reasons: dict[int, str]
    ct_names: dict[int, str]
    addrs: list[str]
    t_start: float
    t_resolved: float = 0.0


def prepare(cfg: FlowConfig) -> Plan:
    t_start = cfg.t_start if cfg.t_start is not None else time.monotonic()
    if os.geteuid() != 0:
        raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                                 "run it again with sudo")
    if cfg.save and not Path(cfg.save).parent.is_dir():   # before tracing, not after it
        raise BadInput(f"cannot write {cfg.save}: directory {Path(cfg.save).parent} does not exist",
                       "create it or choose another path")
    if cfg.count < 1 or cfg.count > 1000:
        raise BadInput(f"--count {cfg.count} is out of range", "use 1..1000")
    if cfg.size is not None and not 28 + len(prober.PAYLOAD) <= cfg.size <= 65000:
        raise BadInput(f"--size {cfg.size} is out of range", f"use {28 + len(prober.PAYLOAD)}..65000 bytes")
    if not cfg.probe and cfg.duration <= 0:
        raise BadInput("--duration must be positive", "e.g. --no-probe --duration 5")
    view = sources.load(cfg.cluster, cfg.kubeconfig, cfg.context, cfg.lab_prefix, (cfg.src, cfg.dst),
                         cfg.namespace)
    inv = view.inv
    if view.conn is None:   # tracing here (in a cluster, the agents trace)
        require_capabilities("tracing")
    src, dst, _family = resolve_ends(cfg, inv)
    proto, port, notes = choose_proto(cfg, dst)
    if cfg.probe and proto == "icmp" and view.conn is None:
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
        if view.conn is None and (not src.pod.netns or not netns.exists(src.pod.netns)):
            raise EnvironmentProblem(
                f"the network namespace of {src.pod.key} is not on this machine",
                "run podtrace against the lab, or on a cluster with the agent DaemonSet (manifests/)")
    return Plan(cfg, inv, view.topology, view.conn, src, dst, proto, port, notes, placement(view.topology),
                 formats.drop_reasons(), program.ct_info_names(),
                 sorted(set(src.addresses() + dst.addresses())), t_start, time.monotonic())


def agent_requests(plan: Plan) -> list[AgentRequest]:
    """One agent per node a packet of this flow can cross. On this machine's topology the
    requests name each node's namespaces and devices, plus the fabric (the lab's underlay
    switch, which in a real cluster is the physical network nobody traces); on a real node
    the agent discovers the pods' namespaces and hop devices itself, by address."""
    cfg, src, dst, topo = plan.cfg, plan.src, plan.dst, plan.topology
    pods = flow_pods(src, dst, plan.inv)
    nodes = [e.node.name for e in (src,) if e.node and not e.pod]
    nodes += [p.node for p in pods if p.node] + [e.node.name for e in (dst,) if e.node and not e.pod]
    if dst.owner:
        nodes.append(dst.owner.name)   # the node a bare IP's packets end on
    elif not (dst.pod or dst.service or dst.node) and ipaddress.ip_address(dst.ip).is_private:
        nodes += list(plan.inv.nodes)   # a private address nobody owns: any node may route it
    nodes = list(dict.fromkeys(nodes))
    if topo is not None:   # the topology's order
        nodes = [n.name for n in topo.nodes if n.name in nodes]
    max_seconds = (cfg.duration if not cfg.probe else cfg.count * (cfg.timeout + cfg.interval)) + 60
    devices = tc_devices(topo, src, dst) if cfg.tc else []
    observers = "all" if settings.tc_observers() == "all" else None
    discover = None if topo is not None else Discovery(
        pod_ips=sorted({a for p in pods for a in p.addresses()}),
        node_ips=sorted({a for n in plan.inv.nodes.values() for a in n.internal_ips()}))
    out = []
    for name in nodes:
        probe_req = None
        if cfg.probe and src.pod and src.pod.node == name:
            # The resolved DST, nothing else: what the agent probes is what the user named.
            probe_req = ProbeRequest(netns=src.pod.netns if topo is not None else None, src=src.ip, dst=dst.ip,
                                     proto=plan.proto, port=plan.port, count=cfg.count, timeout=cfg.timeout,
                                     interval=cfg.interval, size=cfg.size, sport=cfg.sport, settle=cfg.settle)
        if topo is not None:
            node = topo.node(name)
            spaces = [node.netns] + [p.netns for p in topo.pods_on(name) if p.netns and netns.exists(p.netns)]
            out.append(AgentRequest(node=name, addrs=plan.addrs, node_netns=node.netns,
                                    netns_filter=[netns.inode(ns) for ns in spaces],
                                    tc_devices=[d for d in devices if d[0] in spaces], probe=probe_req,
                                    tc_observers=observers,
                                    sample=cfg.sample, budget=cfg.budget, max_seconds=max_seconds))
        else:
            out.append(AgentRequest(node=name, addrs=plan.addrs, tc_devices="auto" if cfg.tc else [],
                                    tc_observers=observers,
                                    discover=discover, probe=probe_req, sample=cfg.sample, budget=cfg.budget,
                                    max_seconds=max_seconds))
    if topo is not None and topo.fabric_netns and netns.exists(topo.fabric_netns) and len(out) > 1:
        out.append(AgentRequest(node="fabric", addrs=plan.addrs, node_netns=topo.fabric_netns,
                                netns_filter=[netns.inode(topo.fabric_netns)], tc_devices=[],
                                sample=cfg.sample, budget=cfg.budget, max_seconds=max_seconds))
    if topo is None and cfg.probe and not any(r.probe for r in out):
        raise BadInput(f"{cfg.src} has no node in the cluster metadata", "pick a running pod as SRC")
    return out


def agent_plans(plan: Plan) -> list[coordinator.AgentPlan]:
    """The coordinator's view of agent_requests(): the requests as they go on the wire."""
    return [coordinator.AgentPlan(r.node, r) for r in agent_requests(plan)]
