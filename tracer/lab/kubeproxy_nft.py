"""kube-proxy's `kube-proxy` nftables table (nftables mode) for the lab's Services, one per family.

The shape follows kube-proxy's nftables proxier: base chains `filter-*` (priority
dstnat-10) and `nat-*`, the `service-ips` / `no-endpoint-services` verdict maps, the
`cluster-ips` set, one `service-HASH-ns/name/proto/port` chain per Service port spreading
with `numgen random` over one `endpoint-HASH-…__ip/port` chain per backend. The lab adds
a `counter` to the rules that drop or reject (kube-proxy's own rules carry none), so a
trace can see which one counted its packets.
"""

from __future__ import annotations

import base64
import hashlib

from tracer.lab.model import APP_PORT, MASQ_MARK, LabPlan, ServicePlan, addr_family, \
    cluster_cidr, service_cidr

TABLE = "kube-proxy"
SERVICE_IPS = "service-ips"
NO_ENDPOINTS = "no-endpoint-services"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS = "cluster-ips"
_MARK = "0x" + MASQ_MARK.split("/")[0][2:].rjust(8, "0")   # 0x00004000, as kube-proxy prints it


def nft_family(family: int) -> str:
    """The nftables family of kube-proxy's table for an address family: ip or ip6."""
    return "ip" if family == 4 else "ip6"


def _hash8(name: str) -> str:
    """kube-proxy's hashAndTruncate prefix: base32(sha256(name))[:8]."""
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]


def service_chain(namespace: str, name: str, protocol: str, port_name: str) -> str:
    """`service-HASH-ns/name/proto/port` (servicePortChainNameBase with the cluster prefix)."""
    base = f"{namespace}/{name}/{protocol.lower()}/{port_name}"
    return f"service-{_hash8(base)}-{base}"


def endpoint_chain(namespace: str, name: str, protocol: str, port_name: str, ip: str, port: int) -> str:
    """`endpoint-HASH-ns/name/proto/port__ip/port` (an IPv6 address with dots for colons)."""
    base = f"{namespace}/{name}/{protocol.lower()}/{port_name}__{ip.replace(':', '.')}/{port}"
    return f"endpoint-{_hash8(base)}-{base}"


def _vip(svc: ServicePlan, family: int) -> str:
    return next(ip for ip in (svc.cluster_ips or (svc.cluster_ip,)) if addr_family(ip) == family)


def _backend_ip(pod, family: int) -> str:
    return next(ip for ip in (pod.ips or (pod.ip,)) if addr_family(ip) == family)


def service_elements(svc: ServicePlan, family: int) -> list[str]:
    """The Service's `service-ips` elements: `VIP . proto . port : goto service-…`."""
    vip = _vip(svc, family)
    return [f"{vip} . {p.protocol.lower()} . {p.port} : goto "
            f"{service_chain(svc.namespace, svc.name, p.protocol, p.name)}" for p in svc.ports]


def no_endpoint_elements(svc: ServicePlan | dict, family: int) -> list[str]:
    """The Service's `no-endpoint-services` elements when it has no endpoints:
    `VIP . proto . port comment "ns/name:port" : goto reject-chain`."""
    vip, ns, name, ports = _parts(svc, family)
    return [f'{vip} . {proto.lower()} . {port} comment "{ns}/{name}:{pname}" : goto {REJECT_CHAIN}'
            for pname, proto, port, _ in ports]


def service_chains(svc: ServicePlan | dict, family: int) -> list[str]:
    """Every chain of the Service in the table (service and endpoint chains)."""
    _, ns, name, ports = _parts(svc, family)
    out = []
    for pname, proto, _, backends in ports:
        out.append(service_chain(ns, name, proto, pname))
        out += [endpoint_chain(ns, name, proto, pname, ip, tport) for ip, tport in backends]
    return out


def _parts(svc, family: int):
    """(VIP, namespace, name, [(port name, protocol, port, [(backend ip, target port)])])
    of a planned Service or of a lab status document's Service entry."""
    if isinstance(svc, ServicePlan):
        ports = [(p.name, p.protocol, p.port, [(_backend_ip(b, family), p.target_port) for b in svc.backends])
                 for p in svc.ports]
        return _vip(svc, family), svc.namespace, svc.name, ports
    fam = "ipv4" if family == 4 else "ipv6"
    vip = next((ip for ip in svc.get("cluster_ips") or [svc["cluster_ip"]] if addr_family(ip) == family),
               svc["cluster_ip"])
    ips = (svc.get("backend_ips_by_family") or {}).get(fam) or svc.get("backend_ips") or []
    ports = [(p["name"], p["protocol"], p["port"], [(ip, p.get("target_port", APP_PORT)) for ip in ips])
             for p in svc["ports"]]
    return vip, svc["namespace"], svc["name"], ports


def ruleset(topo: LabPlan, family: int = 4) -> str:
    """The `kube-proxy` table of one family, for `nft -f -` (every node gets the same)."""
    fam = nft_family(family)
    ipx = fam
    addr_t = "ipv4_addr" if family == 4 else "ipv6_addr"
    no_local = "ip daddr != 127.0.0.0/8" if family == 4 else "ip6 daddr != ::1"
    vips = [_vip(s, family) for s in topo.services]
    lines = [
        f"table {fam} {TABLE} {{",
        '  comment "rules for kube-proxy"',
        f"  set {CLUSTER_IPS} {{ type {addr_t}; comment \"Active ClusterIPs\";"
        + (f" elements = {{ {', '.join(vips)} }};" if vips else "") + " }",
        f"  map {NO_ENDPOINTS} {{ type {addr_t} . inet_proto . inet_service : verdict; "
        'comment "vmap to drop or reject packets to services with no endpoints"; }',
        "  map no-endpoint-nodeports { type inet_proto . inet_service : verdict; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints"; }',
        f"  map firewall-ips {{ type {addr_t} . inet_proto . inet_service : verdict; "
        'comment "destinations that are subject to LoadBalancerSourceRanges"; }',
        f"  map {SERVICE_IPS} {{ type {addr_t} . inet_proto . inet_service : verdict; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic";'
        + (f" elements = {{ {', '.join(e for s in topo.services for e in service_elements(s, family))} }};"
           if topo.services else "") + " }",
        "  map service-nodeports { type inet_proto . inet_service : verdict; comment \"NodePort traffic\"; }",
    ]
    lines += _chain("filter-prerouting", "type filter hook prerouting priority -110; policy accept;",
                    "ct state new jump firewall-check")
    lines += _chain("filter-input", "type filter hook input priority -110; policy accept;",
                    "ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check")
    lines += _chain("filter-forward", "type filter hook forward priority -110; policy accept;",
                    "ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check")
    lines += _chain("filter-output", "type filter hook output priority -110; policy accept;",
                    "ct state new jump service-endpoints-check", "ct state new jump firewall-check")
    lines += _chain("filter-output-post-dnat", "type filter hook output priority -90; policy accept;",
                    "ct state new jump cluster-ips-check")
    lines += _chain("nat-prerouting", "type nat hook prerouting priority -100; policy accept;", "jump services")
    lines += _chain("nat-output", "type nat hook output priority -100; policy accept;", "jump services")
    lines += _chain("nat-postrouting", "type nat hook postrouting priority 100; policy accept;",
                    "jump masquerading")
    lines += _chain("cluster-ips-check", None,
                    f'{ipx} daddr @{CLUSTER_IPS} counter reject comment "Reject traffic to invalid ports of ClusterIPs"',
                    f'{ipx} daddr {{ {service_cidr(family)} }} counter drop comment "Drop traffic to unallocated ClusterIPs"')
    lines += _chain("service-endpoints-check", None, f"{ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINTS}")
    lines += _chain("nodeport-endpoints-check", None,
                    f"fib daddr type local {no_local} meta l4proto . th dport vmap @no-endpoint-nodeports")
    lines += _chain("firewall-check", None, f"{ipx} daddr . meta l4proto . th dport vmap @firewall-ips")
    lines += _chain("mark-for-masquerade", None, f"mark set mark or {_MARK}")
    lines += _chain("masquerading", None, f"mark and {_MARK} == 0 return", f"mark set mark xor {_MARK}",
                    "masquerade fully-random")
    lines += _chain("services", None, f"{ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                    f"fib daddr type local {no_local} meta l4proto . th dport vmap @service-nodeports")
    lines += _chain(REJECT_CHAIN, 'comment "helper for @no-endpoint-services / @no-endpoint-nodeports";',
                    "counter reject")
    for svc in topo.services:
        lines += _service_lines(svc, family)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _service_lines(svc: ServicePlan | dict, family: int) -> list[str]:
    """The Service's service and endpoint chains with their rules (`nft -f` lines)."""
    ipx = nft_family(family)
    vip, ns, name, ports = _parts(svc, family)
    out = []
    for pname, proto, port, eps in ports:
        names = [endpoint_chain(ns, name, proto, pname, ip, tport) for ip, tport in eps]
        vmap = ", ".join(f"{i} : goto {n}" for i, n in enumerate(names))
        # Traffic to the VIP from outside the pod network is masqueraded.
        out += _chain(service_chain(ns, name, proto, pname), None,
                      f"{ipx} daddr {vip} {proto.lower()} dport {port} {ipx} saddr != "
                      f"{cluster_cidr(family)} jump mark-for-masquerade",
                      f"numgen random mod {len(names)} vmap {{ {vmap} }}")
        for (ip, tport), chain in zip(eps, names):
            target = f"[{ip}]:{tport}" if family == 6 else f"{ip}:{tport}"
            out += _chain(chain, None, f"{ipx} saddr {ip} jump mark-for-masquerade",   # hairpin
                          f"meta l4proto {proto.lower()} dnat to {target}")
    return out


def without_endpoints(svc: dict, family: int) -> tuple[str, str]:
    """(`nft -f` input that programs the Service as kube-proxy does once it has no
    endpoints, the input that puts it back): its `service-ips` elements and chains go, a
    `no-endpoint-services` element per port jumps to the reject chain."""
    fam = nft_family(family)
    vip, ns, name, ports = _parts(svc, family)
    keys = [f"{vip} . {proto.lower()} . {port}" for _, proto, port, _ in ports]
    chains = service_chains(svc, family)
    svc_chains = [service_chain(ns, name, proto, pname) for pname, proto, _, _ in ports]
    gone = [f"delete element {fam} {TABLE} {SERVICE_IPS} {{ {', '.join(keys)} }}",
            f"add element {fam} {TABLE} {NO_ENDPOINTS} {{ {', '.join(no_endpoint_elements(svc, family))} }}"]
    gone += [f"flush chain {fam} {TABLE} {c}" for c in svc_chains]
    gone += [f"delete chain {fam} {TABLE} {c}" for c in chains]
    back = [f"delete element {fam} {TABLE} {NO_ENDPOINTS} {{ {', '.join(keys)} }}",
            f"table {fam} {TABLE} {{", *_service_lines(svc, family), "}",
            f"add element {fam} {TABLE} {SERVICE_IPS} {{ "
            + ", ".join(f"{k} : goto {c}" for k, c in zip(keys, svc_chains)) + " }"]
    return "\n".join(gone) + "\n", "\n".join(back) + "\n"


def _chain(name: str, header: str | None, *rules: str) -> list[str]:
    """A chain in `nft -f` syntax, one statement a line (a jump target ends at a newline)."""
    return [f"  chain {name} {{", *([f"    {header}"] if header else []), *(f"    {r}" for r in rules), "  }"]
