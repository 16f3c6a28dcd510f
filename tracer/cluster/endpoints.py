"""Resolving the user's SRC/DST specs to an address, a pod, a node or a Service of an inventory."""

from __future__ import annotations

from dataclasses import replace

from tracer.cluster import inventory, names
from tracer.cluster.inventory import Endpoint, Inventory
from tracer.errors import BadInput


def _hint(name: names.Name, inv: Inventory) -> str:
    return names.hint(name, list(inv.pods), list(inv.services), list(inv.nodes))


def resolve(spec: str, inv: Inventory, namespace: str | None = None) -> Endpoint:
    """NAMESPACE/POD, POD or pod/POD (in `namespace`, default "default"), svc/NAME,
    svc/NAMESPACE/NAME, node/NAME or an IPv4/IPv6 address (tracer.cluster.names reads them).
    The endpoint's `ip` is its first address (an address typed: that one); `in_family()`
    picks another family's of a dual-stack pod, Service or node."""
    name = names.parse(spec, namespace)
    ip = name.key if name.kind == "ip" else None
    if ip is not None:
        kind, key = inv.lookup_ip(ip)
        ep = Endpoint(spec, ip, literal=True)
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


FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


def families(ep: Endpoint) -> list[int]:
    """The address families an endpoint can be reached by, first the one Kubernetes lists
    first: a typed address has its own family only; a pod its podIPs', a Service its
    clusterIPs', a node its InternalIPs'."""
    if ep.literal:
        return inventory.families([ep.ip])
    if ep.pod is not None:
        return inventory.families(ep.pod.addresses()) or inventory.families([ep.ip])
    if ep.service is not None:
        return inventory.families(ep.service.addresses()) or inventory.families([ep.ip])
    if ep.node is not None:
        return inventory.families(ep.node.internal_ips()) or inventory.families([ep.ip])
    return inventory.families([ep.ip])


def _said(fams: list[int]) -> str:
    if not fams:
        return "no address"
    return " and ".join(FAMILY_NAMES[f] for f in fams) + (" only" if len(fams) == 1 else "")


def choose_family(src: Endpoint, dst: Endpoint, wanted: int | None = None) -> int:
    """The family a flow between two endpoints uses: `wanted` (--ip-family) when both ends
    have it, else the first of SRC's families that DST has too (SRC a pod: its podIPs'
    order, as Kubernetes orders them). BadInput (one line) when they share none."""
    fs, fd = families(src), families(dst)
    if wanted is not None:
        if wanted not in (4, 6):
            raise BadInput(f"--ip-family {wanted} is not an address family", "use --ip-family 4 or 6")
        for ep, fams in ((src, fs), (dst, fd)):
            if wanted not in fams:
                raise BadInput(f"--ip-family {wanted}: {ep.spec} has no {FAMILY_NAMES[wanted]} address "
                               f"({_said(fams)})",
                               "drop --ip-family or pick an endpoint of that family")
        return wanted
    common = [f for f in fs if f in fd]
    if not common:
        raise BadInput(f"{src.spec} ({_said(fs)}) and {dst.spec} ({_said(fd)}) share no address family",
                       "pick a SRC and DST of one family (IPv4 or IPv6)")
    return common[0]


def in_family(ep: Endpoint, family: int) -> Endpoint:
    """The endpoint addressed in one family: its address of that family (the endpoint
    itself when `ip` already is); `addresses()` then holds a Service's backends of that
    family only."""
    if inventory.families([ep.ip]) == [family]:
        return ep
    if ep.pod is not None:
        cands = ep.pod.addresses()
    elif ep.service is not None:
        cands = ep.service.addresses()
    elif ep.node is not None:
        cands = ep.node.internal_ips()
    else:
        cands = []
    mine = inventory.of_family(cands, family)
    if not mine:
        raise BadInput(f"{ep.spec} has no {FAMILY_NAMES[family]} address",
                       "drop --ip-family or pick an endpoint of that family")
    return replace(ep, ip=mine[0])
