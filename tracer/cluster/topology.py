"""The cluster's shape as data: where each pod lives, which devices each node routes through.

A real cluster and the lab present themselves the same way. The lab writes its Topology to
`<state dir>/<prefix>/topology.json` when it comes up; product code reads that file as data
(it never imports the simulator). An agent on a real node builds the same shape for its own
node (tracer.node.pods).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from tracer import settings
from tracer.errors import BadInput, EnvironmentProblem

TOPOLOGY_FILE = "topology.json"
DEFAULT_STATE_ROOT = settings.DEFAULT_STATE_DIR   # where `lab up` keeps each lab's files
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")   # the lab's prefixes: no path in a name


@dataclass(frozen=True)
class NodeDevices:
    """One node: its network namespace and the devices a packet crossing it goes through."""

    name: str
    netns: str | None = None       # the node's namespace name (lab); None: this host itself
    ip: str | None = None          # the node's underlay address
    uplink: str | None = None      # the device to the underlay
    bridge: str | None = None      # the pods' gateway device (a bridge, or cilium_host)
    overlay: str | None = None     # the VXLAN device
    overlay_ip: str | None = None  # the address peers' overlay routes name as next hop
    vtep_mac: str | None = None    # the overlay device's MAC (what those next hops resolve to)
    others: tuple[str, ...] = ()   # further hop devices (cilium_net, a second uplink)

    def hop_devices(self) -> list[str]:
        return list(dict.fromkeys(d for d in (self.bridge, self.overlay, self.uplink, *self.others) if d))


@dataclass(frozen=True)
class PodPlace:
    """Where one pod lives: its node, its network namespace, its host-side veth."""

    key: str                       # namespace/name
    node: str
    netns: str | None = None       # namespace name (lab) or path (a real node)
    host_veth: str | None = None


@dataclass(frozen=True)
class Topology:
    """Placement of pods on nodes, of namespaces, and each node's devices and overlay."""

    source: str                               # "lab PREFIX", or the node the agent runs on
    inventory: str | None = None              # a v1 List file of nodes, pods, Services, slices
    nodes: tuple[NodeDevices, ...] = ()
    pods: tuple[PodPlace, ...] = ()
    fabric_netns: str | None = None           # the lab's underlay switch (no node of its own)
    labels: dict = field(default_factory=dict)   # what a trace file records of it (prefix, cni)

    def node(self, name: str | None) -> NodeDevices | None:
        return next((n for n in self.nodes if n.name == name), None)

    def pod(self, key: str) -> PodPlace | None:
        return next((p for p in self.pods if p.key == key), None)

    def pods_on(self, node: str) -> list[PodPlace]:
        return [p for p in self.pods if p.node == node]

    def vtep(self) -> dict[str, dict]:
        """Overlay next hop → the node behind it (what a VXLAN route's gateway means)."""
        return {n.overlay_ip: {"node": n.name, "mac": n.vtep_mac, "ip": n.ip}
                for n in self.nodes if n.overlay_ip}

    def devices(self, pod_keys: Iterable[str] | None = None,
                nodes: Iterable[str] = ()) -> list[tuple[str | None, str]]:
        """The devices to observe, as (node namespace, device): on every node holding one of
        `pod_keys` (None: every pod), and on `nodes`, that node's bridge, overlay and uplink,
        then the pods' host veths. Node devices come first so that a cap on devices keeps them."""
        keys = None if pod_keys is None else set(pod_keys)
        chosen = [p for p in self.pods if keys is None or p.key in keys]
        also = set(nodes)
        nodes = [n for n in self.nodes if n.name in also or any(p.node == n.name for p in chosen)]
        out = [(n.netns, d) for n in nodes for d in n.hop_devices()]
        out += [(n.netns, p.host_veth) for n in nodes for p in chosen if p.node == n.name and p.host_veth]
        return list(dict.fromkeys(out))

    def apply(self, inv) -> None:
        """Give an inventory's pods and nodes the namespaces and veths only this topology knows
        (pods matched by key and address when `require_ip`)."""
        for n in self.nodes:
            node = inv.nodes.get(n.name)
            if node:
                node.netns = n.netns
        for p in self.pods:
            pod = inv.pods.get(p.key)
            if pod:
                pod.netns, pod.host_veth = p.netns, p.host_veth

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Topology":
        return cls(source=d["source"], inventory=d.get("inventory"),
                   nodes=tuple(NodeDevices(**{**n, "others": tuple(n.get("others") or ())}) for n in d.get("nodes", [])),
                   pods=tuple(PodPlace(**p) for p in d.get("pods", [])),
                   fabric_netns=d.get("fabric_netns"), labels=dict(d.get("labels") or {}))


def state_root() -> Path:
    return settings.state_dir()


def path_for(prefix: str, root: Path | str | None = None) -> Path:
    if not _PREFIX_RE.match(prefix) or len(prefix) > 20:
        raise BadInput(f"bad lab prefix {prefix!r}",
                       "use lowercase letters, digits and inner dashes, at most 20 characters")
    return Path(root or state_root()) / prefix / TOPOLOGY_FILE


def write(topo: Topology, path: Path) -> None:
    """Atomically: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(topo.to_json(), indent=1))
    os.replace(tmp, path)


def load_local(prefix: str | None, root: Path | str | None = None) -> Topology | None:
    """The topology a simulated cluster on this machine published, or None when there is none
    with this prefix."""
    if not prefix:
        return None
    path = path_for(prefix, root)
    try:
        return Topology.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnvironmentProblem(f"cannot read {path}: {exc}",
                                 "run: podtrace lab down && podtrace lab up") from exc
