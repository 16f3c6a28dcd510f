"""Kubernetes metadata: loading an inventory (a `v1 List` file, or the lab's) and resolving
the user's SRC/DST specs to addresses, pods, nodes and Services."""

from __future__ import annotations

import difflib
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput


@dataclass
class Pod:
    namespace: str
    name: str
    node: str | None
    ip: str | None
    netns: str | None = None        # lab only: the named network namespace of the pod
    host_veth: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Service:
    namespace: str
    name: str
    cluster_ip: str | None
    ports: list[dict] = field(default_factory=list)     # {port, target_port, protocol, name}
    backends: list[str] = field(default_factory=list)   # "ns/pod"
    backend_ips: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Node:
    name: str
    ip: str | None
    pod_cidr: str | None = None
    netns: str | None = None


@dataclass
class Inventory:
    pods: dict[str, Pod] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    source: str = "none"

    def by_ip(self) -> dict[str, tuple[str, str]]:
        """ip → (kind, key) for pods, Service VIPs and nodes."""
        out: dict[str, tuple[str, str]] = {}
        for n in self.nodes.values():
            if n.ip:
                out[n.ip] = ("node", n.name)
        for s in self.services.values():
            if s.cluster_ip:
                out[s.cluster_ip] = ("service", s.key)
        for p in self.pods.values():
            if p.ip:
                out[p.ip] = ("pod", p.key)
        return out


@dataclass
class Endpoint:
    spec: str
    ip: str
    pod: Pod | None = None
    service: Service | None = None
    node: Node | None = None

    def as_json(self) -> dict:
        return {
            "spec": self.spec,
            "ip": self.ip,
            "pod": self.pod.key if self.pod else None,
            "node": (self.pod.node if self.pod else (self.node.name if self.node else None)),
            "service": self.service.key if self.service else None,
        }

    def addresses(self) -> list[str]:
        """Every address a packet of this endpoint may carry: a VIP and its backends."""
        out = [self.ip]
        if self.service:
            out += self.service.backend_ips
        return out


def load_list(path: str | Path) -> Inventory:
    """A `kubectl get nodes,pods,services,endpointslices -A -o json` document."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise BadInput(f"cluster file {p} does not exist", "pass a `kubectl get … -o json` file") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"cluster file {p} is not JSON ({exc.msg} at line {exc.lineno})",
                       "pass the output of `kubectl get nodes,pods,services,endpointslices -A -o json`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise BadInput(f"cluster file {p} is not a Kubernetes List (no `items`)",
                       "pass the output of `kubectl get nodes,pods,services,endpointslices -A -o json`")
    return from_items(doc["items"], source=str(p))


def from_items(items: list[dict], source: str) -> Inventory:
    inv = Inventory(source=source)
    slices: list[dict] = []
    for it in items:
        kind = it.get("kind")
        md = it.get("metadata", {})
        if kind == "Node":
            addrs = {a.get("type"): a.get("address") for a in it.get("status", {}).get("addresses", [])}
            inv.nodes[md["name"]] = Node(md["name"], addrs.get("InternalIP"), it.get("spec", {}).get("podCIDR"))
        elif kind == "Pod":
            pod = Pod(md.get("namespace", "default"), md["name"], it.get("spec", {}).get("nodeName"),
                      it.get("status", {}).get("podIP"))
            inv.pods[pod.key] = pod
        elif kind == "Service":
            spec = it.get("spec", {})
            ports = [{"port": p.get("port"), "target_port": p.get("targetPort", p.get("port")),
                      "protocol": p.get("protocol", "TCP"), "name": p.get("name")}
                     for p in spec.get("ports", [])]
            cip = spec.get("clusterIP")
            svc = Service(md.get("namespace", "default"), md["name"], None if cip in (None, "None", "") else cip, ports)
            inv.services[svc.key] = svc
        elif kind == "EndpointSlice":
            slices.append(it)
    for sl in slices:
        md = sl.get("metadata", {})
        svc_name = md.get("labels", {}).get("kubernetes.io/service-name")
        svc = inv.services.get(f"{md.get('namespace', 'default')}/{svc_name}")
        if svc is None:
            continue
        for ep in sl.get("endpoints") or []:
            if ep.get("conditions", {}).get("ready") is False:
                continue
            ref = ep.get("targetRef") or {}
            if ref.get("kind") == "Pod":
                key = f"{ref.get('namespace', svc.namespace)}/{ref.get('name')}"
                if key not in svc.backends:
                    svc.backends.append(key)
            for a in ep.get("addresses", []):
                if a not in svc.backend_ips:
                    svc.backend_ips.append(a)
    return inv


def from_lab(status: dict) -> Inventory:
    """The lab's inventory file, plus what only the lab knows: namespaces and host veths."""
    inv = load_list(status["inventory"])
    inv.source = f"lab {status.get('prefix', '')}".strip()
    for n in status.get("nodes", []):
        node = inv.nodes.get(n["name"])
        if node:
            node.netns = n.get("netns")
    for p in status.get("pods", []):
        pod = inv.pods.get(f"{p['namespace']}/{p['name']}")
        if pod:
            pod.netns = p.get("netns")
            pod.host_veth = p.get("host_veth")
    return inv


def _close(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(near)}?" if near else "list them with `podtrace lab status` or kubectl"


def resolve(spec: str, inv: Inventory) -> Endpoint:
    """NAMESPACE/POD, POD (namespace default), svc/NAMESPACE/NAME, node/NAME or an IPv4 address."""
    s = spec.strip()
    if not s:
        raise BadInput("empty endpoint", "give a pod, ns/pod, svc/ns/name, node/name or an IPv4 address")
    try:
        ip = str(ipaddress.IPv4Address(s))
    except ValueError:
        ip = None
    if ip is not None:
        kind, key = inv.by_ip().get(ip, (None, None))
        ep = Endpoint(spec, ip)
        if kind == "pod":
            ep.pod = inv.pods[key]
        elif kind == "service":
            ep.service = inv.services[key]
        elif kind == "node":
            ep.node = inv.nodes[key]
        return ep
    parts = s.split("/")
    if parts[0] in ("svc", "service") and len(parts) == 3:
        key = f"{parts[1]}/{parts[2]}"
        svc = inv.services.get(key)
        if svc is None:
            raise BadInput(f"no Service {key}", _close(key, list(inv.services)))
        if not svc.cluster_ip:
            raise BadInput(f"Service {key} has no cluster IP (headless)", "trace one of its pods instead")
        return Endpoint(spec, svc.cluster_ip, service=svc)
    if parts[0] == "node" and len(parts) == 2:
        node = inv.nodes.get(parts[1])
        if node is None:
            raise BadInput(f"no node {parts[1]}", _close(parts[1], list(inv.nodes)))
        if not node.ip:
            raise BadInput(f"node {parts[1]} has no InternalIP", "trace a pod on it instead")
        return Endpoint(spec, node.ip, node=node)
    if len(parts) == 1 or len(parts) == 2:
        key = s if len(parts) == 2 else f"default/{s}"
        if any(not x for x in key.split("/")):
            raise BadInput(f"cannot parse endpoint {spec!r}", "use ns/pod, pod, svc/ns/name, node/name or an IPv4 address")
        pod = inv.pods.get(key)
        if pod is None:
            raise BadInput(f"no pod {key}", _close(key, list(inv.pods)))
        if not pod.ip:
            raise BadInput(f"pod {key} has no IP yet (not running?)", "wait for it to start or pick another pod")
        node = inv.nodes.get(pod.node) if pod.node else None
        return Endpoint(spec, pod.ip, pod=pod, node=node)
    raise BadInput(f"cannot parse endpoint {spec!r}", "use ns/pod, pod, svc/ns/name, node/name or an IPv4 address")
