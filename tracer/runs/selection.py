"""What a capture selects, as names the user gave, resolved to the kernel filter's addresses, CIDRs and ports."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tracer.cluster import endpoints
from tracer.cluster import inventory
from tracer.kernel.contract import MAX_ADDRS, MAX_CIDRS, MAX_PORTS  # sizes of the kernel maps
from tracer.errors import BadInput



@dataclass
class Selection:
    """What to capture, as the user said it. Empty: all pod traffic."""

    pods: list[str] = field(default_factory=list)        # NS/POD or POD
    namespaces: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)    # NS/NAME, svc/NS/NAME or NAME
    nodes: list[str] = field(default_factory=list)
    cidrs: list[str] = field(default_factory=list)       # 10.244.1.0/24 or an address
    ports: list[int] = field(default_factory=list)       # TCP/UDP port on either side
    all_traffic: bool = False                            # every IPv4 packet

    def empty(self) -> bool:
        return not (self.pods or self.namespaces or self.services or self.nodes or self.cidrs
                    or self.all_traffic)


@dataclass
class Resolved:
    """The selection as the kernel filter takes it."""

    addrs: list[str]
    cidrs: list[str]
    ports: list[int]
    any_addr: bool
    described: list[str]

    def as_json(self) -> dict:
        return {"addrs": self.addrs, "cidrs": self.cidrs, "ports": self.ports, "any_addr": self.any_addr,
                "described": self.described}


def _net(spec: str) -> str:
    try:
        return str(ipaddress.IPv4Network(spec.strip(), strict=False))
    except ValueError:
        raise BadInput(f"{spec!r} is not an IPv4 address or CIDR", "e.g. 10.244.1.0/24 or 10.244.1.2") from None


def _ns_of(spec: str) -> tuple[str, str]:
    parts = spec.strip().split("/")
    if parts[0] in ("svc", "service") and len(parts) == 3:
        return parts[1], parts[2]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    if len(parts) == 1 and parts[0]:
        return "default", parts[0]
    raise BadInput(f"cannot parse Service {spec!r}", "use NAMESPACE/NAME, svc/NAMESPACE/NAME or NAME")


def resolve(sel: Selection, inv: inventory.Inventory) -> Resolved:
    """Names → addresses, CIDRs and ports. Unknown names are bad input, with close matches."""
    import difflib

    addrs: list[str] = []
    cidrs: list[str] = []
    said: list[str] = []
    for spec in sel.pods:
        ep = endpoints.resolve(spec, inv)
        if ep.pod is None:
            raise BadInput(f"--pod {spec}: not a pod", "give NAMESPACE/POD or POD")
        addrs.append(ep.pod.ip)
        said.append(f"pod {ep.pod.key} ({ep.pod.ip})")
    for ns in sel.namespaces:
        pods = [p for p in inv.pods.values() if p.namespace == ns and p.ip]
        if not pods:
            known = sorted({p.namespace for p in inv.pods.values()})
            near = difflib.get_close_matches(ns, known, n=3, cutoff=0.5)
            raise BadInput(f"no pods in namespace {ns}", f"did you mean {', '.join(near)}?" if near
                           else f"namespaces with pods: {', '.join(known) or 'none'}")
        addrs += [p.ip for p in pods]
        said.append(f"namespace {ns} ({len(pods)} pods)")
    for spec in sel.services:
        ns, name = _ns_of(spec)
        ep = endpoints.resolve(f"svc/{ns}/{name}", inv)
        svc = ep.service
        addrs += [svc.cluster_ip] + list(svc.backend_ips)
        said.append(f"service {svc.key} ({svc.cluster_ip}, {len(svc.backend_ips)} backends)")
    for name in sel.nodes:
        node = inv.nodes.get(name)
        if node is None:
            ep = endpoints.resolve(f"node/{name}", inv)   # raises with close matches
            node = ep.node
        if node.pod_cidr:
            cidrs.append(_net(node.pod_cidr))
        else:
            addrs += [p.ip for p in inv.pods.values() if p.node == node.name and p.ip]
        if node.ip:
            addrs.append(node.ip)
        said.append(f"node {node.name} ({node.pod_cidr or 'its pods'}{', ' + node.ip if node.ip else ''})")
    for c in sel.cidrs:
        net = _net(c)
        cidrs.append(net)
        said.append(f"cidr {net}")
    ports = sorted(set(sel.ports))
    for p in ports:
        if not 1 <= int(p) <= 65535:
            raise BadInput(f"port {p} is out of range", "use a port between 1 and 65535")
    any_addr = bool(sel.all_traffic)
    if any_addr:
        said.append("all IPv4 traffic")
    elif sel.empty():
        # all pod traffic: every node's pod CIDR (or every pod) and every Service VIP
        node_cidrs = [_net(n.pod_cidr) for n in inv.nodes.values() if n.pod_cidr]
        cidrs += node_cidrs
        if not node_cidrs:
            addrs += [p.ip for p in inv.pods.values() if p.ip]
        addrs += [s.cluster_ip for s in inv.services.values() if s.cluster_ip]
        said.append("all pod traffic (" + (", ".join(node_cidrs) if node_cidrs else f"{len(inv.pods)} pods")
                    + f" and {sum(1 for s in inv.services.values() if s.cluster_ip)} Service IPs)")
        if not cidrs and not addrs:
            raise BadInput("no pods or Services known to select", "pass --cluster FILE or bring the lab up")
    if ports:
        said.append("ports " + ",".join(map(str, ports)))
    addrs = sorted(set(a for a in addrs if a), key=lambda a: ipaddress.IPv4Address(a))
    cidrs = sorted(set(cidrs), key=lambda c: ipaddress.IPv4Network(c))
    if len(addrs) > MAX_ADDRS or len(cidrs) > MAX_CIDRS or len(ports) > MAX_PORTS:
        raise BadInput(f"selection too large ({len(addrs)} addresses, {len(cidrs)} CIDRs, {len(ports)} ports)",
                       f"the kernel filter holds {MAX_ADDRS} addresses, {MAX_CIDRS} CIDRs, {MAX_PORTS} ports; "
                       "select by CIDR instead of many pods")
    return Resolved(addrs, cidrs, ports, any_addr, said)


def cluster_streams(sel: Selection) -> list:
    """What a capture lists and watches in a cluster: only what the selection names (a
    namespace's pods, Services and slices; a Service's own objects and its namespace's pods;
    a node's pods), so memory follows the selection, not the cluster. CIDRs, --all and the
    empty selection (all pod traffic) need every pod and Service to name what they catch."""
    from tracer.cluster import api

    S = api.Stream
    if sel.all_traffic or sel.cidrs or sel.empty():
        return api.cluster_streams()
    out = []
    for spec in sel.pods:
        parts = spec.split("/")
        if len(parts) > 2 or not all(parts):
            return api.cluster_streams()     # resolve() says what is wrong with it
        ns, name = parts if len(parts) == 2 else ("default", parts[0])
        out.append(S("Pod", ns, field_selector=f"metadata.name={name}"))
    for ns in sel.namespaces:
        out += [S("Pod", ns), S("Service", ns), S("EndpointSlice", ns)]
    for spec in sel.services:
        ns, name = _ns_of(spec)
        out += [S("Service", ns, field_selector=f"metadata.name={name}"),
                S("EndpointSlice", ns, label_selector=f"{api.SERVICE_NAME_LABEL}={name}"), S("Pod", ns)]
    for name in sel.nodes:
        out += [S("Node", field_selector=f"metadata.name={name}"), S("Pod", field_selector=f"spec.nodeName={name}")]
    return list(dict.fromkeys(out))
