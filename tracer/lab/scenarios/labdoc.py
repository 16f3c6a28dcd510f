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


class Lab:
    """Read-only view of a lab status document (`podtrace lab status -o json`)."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.prefix = doc["prefix"]
        self.fabric_netns = doc["fabric_netns"]
        self.inventory = Path(doc["inventory"])
        self.nodes = [Node(n["name"], int(n["index"]), n["netns"], n["ip"], n["pod_cidr"],
                           n["overlay_ip"], n["mac"], n["fabric_port"]) for n in doc["nodes"]]
        self.pods = [Pod(p["name"], p["node"], p["ip"], p["netns"]) for p in doc["pods"]]
        self.services = {s["name"]: s for s in doc["services"]}

    @classmethod
    def planned(cls, cfg: T.LabConfig | None = None) -> "Lab":
        """The lab `lab up` would build (for listings and tests; touches nothing)."""
        cfg = cfg or T.LabConfig(state_dir=Path("/run/podtrace"))
        return cls(T.status_document(T.plan(cfg, created_at="1970-01-01T00:00:00Z")))

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
