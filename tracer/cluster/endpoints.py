"""Resolving the user's SRC/DST specs to an address, a pod, a node or a Service of an inventory."""

from __future__ import annotations

from tracer.cluster import names
from tracer.cluster.inventory import Endpoint, Inventory
from tracer.errors import BadInput


def _hint(name: names.Name, inv: Inventory) -> str:
    return names.hint(name, list(inv.pods), list(inv.services), list(inv.nodes))


def resolve(spec: str, inv: Inventory, namespace: str | None = None) -> Endpoint:
    """NAMESPACE/POD, POD or pod/POD (in `namespace`, default "default"), svc/NAME,
    svc/NAMESPACE/NAME, node/NAME or an IPv4 address (tracer.cluster.names reads them)."""
    name = names.parse(spec, namespace)
    ip = name.key if name.kind == "ip" else None
    if ip is not None:
        kind, key = inv.lookup_ip(ip)
        ep = Endpoint(spec, ip)
        if kind == "pod":
            ep.pod = inv.pods[key]
        elif kind == "service":
            ep.service = inv.services[key]
        elif kind == "node":
            ep.node = inv.nodes[key]
        # The node a packet to it ends on: the pod's, the node itself, or whose pod CIDR holds it.
        if ep.pod is not None:
            ep.owner = inv.nodes.get(ep.pod.node) if ep.pod.node else None
        elif ep.node is not None:
            ep.owner = ep.node
        elif ep.service is None:
            ep.owner = inv.cidr_owner(ip)
        return ep
    if name.kind == "service":
        svc = inv.services.get(name.key)
        if svc is None:
            raise BadInput(f"no Service {name.key}", _hint(name, inv))
        if not svc.cluster_ip:
            raise BadInput(f"Service {name.key} has no cluster IP (headless)", "trace one of its pods instead")
        return Endpoint(spec, svc.cluster_ip, service=svc)
    if name.kind == "node":
        node = inv.nodes.get(name.key)
        if node is None:
            raise BadInput(f"no node {name.key}", _hint(name, inv))
        if not node.ip:
            raise BadInput(f"node {name.key} has no InternalIP", "trace a pod on it instead")
        return Endpoint(spec, node.ip, node=node)
    key = name.key
    pod = inv.pods.get(key)
    if pod is None:
        raise BadInput(f"no pod {key}", _hint(name, inv))
    if not pod.ip:
        raise BadInput(f"pod {key} has no IP yet (not running?)", "wait for it to start or pick another pod")
    node = inv.nodes.get(pod.node) if pod.node else None
    return Endpoint(spec, pod.ip, pod=pod, node=node)
