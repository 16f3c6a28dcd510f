"""The lab as the scenarios see it: a read-only view of its status document."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tracer.lab import topology as T


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    netns: str
    ip: str
    pod_cidr: str
    overlay_ip: str
    mac: str
    fabric_port: str


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    ip: str
    netns: str


def _of_family(values: list[str] | None, first: str, family: int) -> str:
    """The value of this family among `values` (addresses or CIDRs), else `first`."""
    for v in values or [first]:
        if v is not None and (":" in v) == (family == 6):   # None: no overlay address (calico)
            return v
    return first


def lab_families(doc: dict) -> tuple[int, ...]:
    """The address families of a lab's pods, the first one first (an old document: IPv4)."""
    return T.families(doc.get("ip_family"))


class Lab:
    """Read-only view of a lab status document (`podtrace lab status -o json`), for one
    address family of its pods (`family`: 4 or 6; default the lab's first): pod addresses,
    pod CIDRs, gateways, overlay next hops and Service IPs are those of that family."""

    def __init__(self, doc: dict, family: int | None = None):
        self.doc = doc
        self.prefix = doc["prefix"]
        self.fabric_netns = doc["fabric_netns"]
        self.inventory = Path(doc["inventory"])
        self.families = lab_families(doc)
        self.family = family or self.families[0]
        f = self.family
        self.nodes = [Node(n["name"], int(n["index"]), n["netns"], n["ip"],
                           _of_family(n.get("pod_cidrs"), n["pod_cidr"], f),
                           _of_family(n.get("overlay_ips"), n["overlay_ip"], f),
                           n["mac"], n["fabric_port"]) for n in doc["nodes"]]
        self.pods = [Pod(p["name"], p["node"], _of_family(p.get("ips"), p["ip"], f), p["netns"])
                     for p in doc["pods"]]
        self.services = {s["name"]: dict(s, cluster_ip=_of_family(s.get("cluster_ips"), s["cluster_ip"], f))
                         for s in doc["services"]}

    @classmethod
    def planned(cls, cfg: T.LabConfig | None = None, family: int | None = None) -> "Lab":
        """The lab `lab up` would build (for listings and tests; touches nothing)."""
        cfg = cfg or T.LabConfig(state_dir=Path("/run/podtrace"))
        return cls(T.status_document(T.plan(cfg, created_at="1970-01-01T00:00:00Z")), family)

    @property
    def pod_mtu(self) -> int:
        return int(self.doc.get("pod_mtu", T.POD_MTU))

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def peer(self, node: str) -> Node:
        """The next node (wrapping around): the other end of a node-to-node path."""
        i = self.node_names.index(node)
        return self.nodes[(i + 1) % len(self.nodes)]

    def client_for(self, node: str) -> Pod | None:
        """A pod on another node than `node` (the peer's first), else another pod on it."""
        if len(self.nodes) > 1:
            pods = self.pods_on(self.peer(node).name)
            if pods:
                return pods[0]
        pods = self.pods_on(node)
        return pods[1] if len(pods) > 1 else None

    def web(self) -> dict:
        return self.services["web"]

    def web_port(self, protocol: str) -> dict:
        return next(p for p in self.web()["ports"] if p["protocol"] == protocol)
