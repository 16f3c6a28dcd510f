"""kube-proxy's iptables rules (iptables mode) for the lab's Services, one document per node."""

from __future__ import annotations

from tracer.lab.cni import flavour
from tracer.lab.model import APP_PORT, K8S_NAMESPACE, MASQ_MARK, PodPlan, ServicePlan, \
    ServicePortPlan, LabPlan, addr_family, cluster_cidr, hash16, plen, service_ip


def svc_chain(service_port_name: str, protocol: str) -> str:
    """kube-proxy's servicePortChainName: KUBE-SVC- + base32(sha256(svcPortName + proto))[:16]."""
    return "KUBE-SVC-" + hash16(service_port_name + protocol.lower())


def sep_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """kube-proxy's servicePortEndpointChainName (endpoint is "ip:port", "[ip6]:port")."""
    return "KUBE-SEP-" + hash16(service_port_name + protocol.lower() + endpoint)


def endpoint(ip: str, port: int) -> str:
    """net.JoinHostPort: "10.244.1.2:8080", "[fd00:10:244:1::2]:8080"."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def pod_ip_of(pod: PodPlan, family: int) -> str:
    """The pod's address of this family."""
    return next(ip for ip in (pod.ips or (pod.ip,)) if addr_family(ip) == family)


def service(name: str, cluster_ip: str, selector: dict, backends: list[PodPlan],
            families: tuple[int, ...] = (4,)) -> ServicePlan:
    """A ClusterIP Service with an http (TCP) and a udp port 80 to the backends' APP_PORT,
    with the chain names kube-proxy gives them. `cluster_ip` is the IPv4 form; a Service of
    an IPv6 family gets the matching fd00:10:96:: address."""
    cluster_ips = tuple(service_ip(f, cluster_ip) for f in families)
    ports = []
    for port_name, proto in (("http", "TCP"), ("udp", "UDP")):
        spn = f"{K8S_NAMESPACE}/{name}:{port_name}"
        per_family = tuple(
            (f, tuple((b.key, sep_chain(spn, proto, endpoint(pod_ip_of(b, f), APP_PORT)))
                      for b in backends))
            for f in families)
        ports.append(ServicePortPlan(
            name=port_name, port=80, target_port=APP_PORT, protocol=proto,
            chain=svc_chain(spn, proto), endpoint_chains=per_family[0][1],
            family_chains=per_family,
        ))
    return ServicePlan(name, K8S_NAMESPACE, cluster_ips[0], dict(selector), tuple(ports),
                       tuple(backends), cluster_ips)


def iptables_rules(topo: LabPlan, family: int = 4) -> str:
    """The nat rules kube-proxy and the filter rules the CNI would program on every node, for
    `iptables-restore --noflush` (`ip6tables-restore` for family 6; every node gets the same
    Service rules)."""
    fl = flavour(topo.config.cni)
    return "\n".join(nat_rules(topo, family) + fl.filter_rules(family)) + "\n"


def nat_rules(topo: LabPlan, family: int = 4) -> list[str]:
    """kube-proxy's nat table: Service portals, masquerading, one KUBE-SVC chain per
    Service port spreading over one KUBE-SEP chain per backend (for one family: kube-proxy
    runs one such proxier per family of a dual-stack cluster, with the same chain shapes)."""
    def chains_of(port: ServicePortPlan):
        return dict(port.family_chains or ((4, port.endpoint_chains),))[family]

    def vip_of(svc: ServicePlan) -> str:
        return next(ip for ip in (svc.cluster_ips or (svc.cluster_ip,)) if addr_family(ip) == family)

    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    for svc in topo.services:
        for port in svc.ports:
            nat.append(f":{port.chain} - [0:0]")
            nat.extend(f":{sep} - [0:0]" for _, sep in chains_of(port))
    nat += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE",
    ]
    by_key = {p.key: p for p in topo.pods}
    for svc in topo.services:
        for port in svc.ports:
            proto = port.protocol.lower()
            spn = f"{svc.key}:{port.name}"
            match = f"-d {vip_of(svc)}/{plen(family)} -p {proto} -m {proto} --dport {port.port}"
            nat.append(f'-A KUBE-SERVICES {match} -m comment --comment "{spn} cluster IP" '
                       f"-j {port.chain}")
            # Traffic to the VIP from outside the pod network must be masqueraded back.
            nat.append(f"-A {port.chain} ! -s {cluster_cidr(family)} {match} "
                       f'-m comment --comment "{spn} cluster IP" -j KUBE-MARK-MASQ')
            eps = chains_of(port)
            n = len(eps)
            for k, (key, sep) in enumerate(eps):
                ep = endpoint(pod_ip_of(by_key[key], family), port.target_port)
                stat = (f"-m statistic --mode random --probability {1.0 / (n - k):.11f} "
                        if k < n - 1 else "")
                nat.append(f'-A {port.chain} -m comment --comment "{spn} -> {ep}" '
                           f"{stat}-j {sep}")
            for key, sep in eps:
                ip = pod_ip_of(by_key[key], family)
                # Hairpin: a pod reaching itself through the VIP must be masqueraded.
                nat.append(f'-A {sep} -s {ip}/{plen(family)} -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
                nat.append(f'-A {sep} -p {proto} -m comment --comment "{spn}" -m {proto} '
                           f"-j DNAT --to-destination {endpoint(ip, port.target_port)}")
    nat.append("COMMIT")
    return nat
