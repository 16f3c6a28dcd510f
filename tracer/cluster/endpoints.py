"""Resolving the user's SRC/DST specs to an address, a pod, a node or a Service of an inventory."""

from __future__ import annotations

import difflib
import ipaddress
import re

from tracer.cluster.inventory import Endpoint, Inventory
from tracer.errors import BadInput


_CLOSE_MAX = 2000


def _close(word: str, choices: list[str]) -> str:
    if len(choices) > _CLOSE_MAX:
        # difflib over every name of a large cluster takes seconds: compare with the names
        # of the same namespace, or sharing the first letters, only.
        ns = word.split("/", 1)[0] + "/" if "/" in word else None
        narrowed = [c for c in choices if ns and c.startswith(ns)]
        if not narrowed or len(narrowed) > _CLOSE_MAX:
            stem = word[: max(3, len(word) * 2 // 3)]
            narrowed = [c for c in (narrowed or choices) if c.startswith(stem)][:_CLOSE_MAX]
        choices = narrowed
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
    if ip is None and ":" in s:
        try:
            ipaddress.ip_address(s.split("%", 1)[0])
            raise BadInput(f"{spec!r} is an IPv6 address; podtrace traces IPv4 only",
                           "give the endpoint's IPv4 address, or its pod/Service name")
        except ValueError:
            pass
    if ip is None and re.fullmatch(r"[0-9.]+", s):
        raise BadInput(f"{spec!r} is not a valid IPv4 address", "e.g. 10.244.1.2")
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
