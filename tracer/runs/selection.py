"""What a capture selects, as names the user gave, resolved to the kernel filter's addresses, CIDRs and ports."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tracer import addrs as addrs_mod
from tracer.cluster import endpoints
from tracer.cluster import inventory
from tracer.kernel.contract import MAX_ADDRS, MAX_CIDRS, MAX_PORTS  # sizes of the kernel maps
from tracer.cluster import names
from tracer.errors import BadInput



@dataclass
class Selection:
    """What to capture, as the user said it. Empty: all pod traffic."""

    pods: list[str] = field(default_factory=list)        # NS/POD or POD
    namespaces: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)    # NS/NAME, svc/NS/NAME or NAME
    nodes: list[str] = field(default_factory=list)
    cidrs: list[str] = field(default_factory=list)       # 10.244.1.0/24, fd00:10:244:1::/64 or an address
    ports: list[int] = field(default_factory=list)       # TCP/UDP port on either side
    all_traffic: bool = False                            # every packet (of `family`)
    family: int | None = None                            # --ip-family: 4 or 6 only (None: both)

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


def _net(spec: str, family: int | None = None) -> str:
    """A CIDR (or an address: its /32 or /128) as the kernel filter takes it. Scoped and
    multicast addresses are refused as endpoints are; an IPv4-mapped IPv6 CIDR is its IPv4 one."""
    text = spec.strip()
    if "%" in text:
        raise BadInput(f"{spec!r} is a scoped (link-local) IPv6 address, not a pod, node or Service address",
                       "give a CIDR such as fd00:10:244:1::/64")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BadInput(f"{spec!r} is not an IPv4 or IPv6 address or CIDR",
                       "e.g. 10.244.1.0/24, 10.244.1.2 or fd00:10:244:1::/64") from None
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        v4 = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96), strict=False)
        names._note(f"{spec} is an IPv4-mapped IPv6 CIDR: capturing IPv4 {v4}", None)
        net = v4
    if family is not None and net.version != family:
        raise BadInput(f"{spec!r} is an IPv{net.version} CIDR and --ip-family is {family}",
                       "drop --ip-family or give a CIDR of that family")
    return str(net)


def _fam(addrs, family: int | None) -> list[str]:
    return inventory.of_family(addrs, family)


def _cidr_key(c: str):
    n = ipaddress.ip_network(c)
    return n.version, n


def _fam_cidrs(cidrs, family: int | None) -> list[str]:
    out = []
    for c in cidrs:
        try:
            v = ipaddress.ip_network(c, strict=False).version
        except ValueError:
            continue
        if family is None or v == family:
            out.append(c)
    return out


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
    fam = sel.family
    for spec in sel.pods:
        ep = endpoints.resolve(spec, inv)
        if ep.pod is None:
            raise BadInput(f"--pod {spec}: not a pod", "give NAMESPACE/POD or POD")
        mine = _fam(ep.pod.addresses(), fam)
        if not mine:
            raise BadInput(f"--pod {spec}: no IPv{fam} address ({', '.join(ep.pod.addresses()) or 'none'})",
                           "drop --ip-family or select another pod")
        addrs += mine
        said.append(f"pod {ep.pod.key} ({', '.join(mine)})")
    for ns in sel.namespaces:
        pods = [p for p in inv.pods.values() if p.namespace == ns and _fam(p.addresses(), fam)]
        if not pods:
            known = sorted({p.namespace for p in inv.pods.values()})
            near = difflib.get_close_matches(ns, known, n=3, cutoff=0.5)
            raise BadInput(f"no pods in namespace {ns}", f"did you mean {', '.join(near)}?" if near
                           else f"namespaces with pods: {', '.join(known) or 'none'}")
        addrs += [a for p in pods for a in _fam(p.addresses(), fam)]
        said.append(f"namespace {ns} ({len(pods)} pods)")
    for spec in sel.services:
        ns, name = _ns_of(spec)
        ep = endpoints.resolve(f"svc/{ns}/{name}", inv)
        svc = ep.service
        vips, backs = _fam(svc.addresses(), fam), _fam(svc.backend_ips, fam)
        if not vips:
            raise BadInput(f"--service {spec}: no IPv{fam} cluster IP ({', '.join(svc.addresses())})",
                           "drop --ip-family or select another Service")
        addrs += vips + backs
        said.append(f"service {svc.key} ({', '.join(vips)}, {len(backs)} backends)")
    for name in sel.nodes:
        node = inv.nodes.get(name)
        if node is None:
            ep = endpoints.resolve(f"node/{name}", inv)   # raises with close matches
            node = ep.node
        ncidrs = [_net(c) for c in _fam_cidrs(node.cidrs(), fam)]
        if ncidrs:
            cidrs += ncidrs
        else:
            addrs += [a for p in inv.pods.values() if p.node == node.name for a in _fam(p.addresses(), fam)]
        nips = _fam(node.internal_ips(), fam)
        addrs += nips
        said.append(f"node {node.name} ({', '.join(ncidrs) or 'its pods'}{''.join(', ' + a for a in nips)})")
    for c in sel.cidrs:
        net = _net(c, fam)
        cidrs.append(net)
        said.append(f"cidr {net}")
    ports = sorted(set(sel.ports))
    for p in ports:
        if not 1 <= int(p) <= 65535:
            raise BadInput(f"port {p} is out of range", "use a port between 1 and 65535")
    any_addr = bool(sel.all_traffic) and fam is None
    if sel.all_traffic and fam is not None:   # one family only: the whole of its address space
        cidrs.append("0.0.0.0/0" if fam == 4 else "::/0")
        said.append(f"all IPv{fam} traffic")
    elif any_addr:
        said.append("all traffic (IPv4 and IPv6)")
    elif sel.empty():
        # all pod traffic: every node's pod CIDRs (or every pod) and every Service VIP
        node_cidrs = [_net(c) for n in inv.nodes.values() for c in _fam_cidrs(n.cidrs(), fam)]
        node_cidrs = list(dict.fromkeys(node_cidrs))
        cidrs += node_cidrs
        if not node_cidrs:
            addrs += [a for p in inv.pods.values() for a in _fam(p.addresses(), fam)]
        vips = [a for s in inv.services.values() for a in _fam(s.addresses(), fam)]
        addrs += vips
        said.append("all pod traffic (" + (", ".join(node_cidrs) if node_cidrs else f"{len(inv.pods)} pods")
                    + f" and {len(vips)} Service IPs)")
        if not cidrs and not addrs:
            raise BadInput("no pods or Services known to select", "pass --cluster FILE or bring the lab up")
    if ports:
        said.append("ports " + ",".join(map(str, ports)))
    addrs = sorted(set(a for a in addrs if a), key=addrs_mod.sort_key)
    cidrs = sorted(set(cidrs), key=_cidr_key)
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
