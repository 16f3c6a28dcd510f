"""kube-proxy's iptables rules (iptables mode) for the lab's Services, one document per node."""

from __future__ import annotations

from tracer.lab.cni import flavour
from tracer.lab.model import APP_PORT, CLUSTER_CIDR, K8S_NAMESPACE, MASQ_MARK, PodPlan, ServicePlan, \
    ServicePortPlan, LabPlan, hash16


def svc_chain(service_port_name: str, protocol: str) -> str:
    """kube-proxy's servicePortChainName: KUBE-SVC- + base32(sha256(svcPortName + proto))[:16]."""
    return "KUBE-SVC-" + hash16(service_port_name + protocol.lower())


def sep_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """kube-proxy's servicePortEndpointChainName (endpoint is "ip:port")."""
    return "KUBE-SEP-" + hash16(service_port_name + protocol.lower() + endpoint)


def service(name: str, cluster_ip: str, selector: dict, backends: list[PodPlan]) -> ServicePlan:
    """A ClusterIP Service with an http (TCP) and a udp port 80 to the backends' APP_PORT,
    with the chain names kube-proxy gives them."""
    ports = []
    for port_name, proto in (("http", "TCP"), ("udp", "UDP")):
        spn = f"{K8S_NAMESPACE}/{name}:{port_name}"
        ports.append(ServicePortPlan(
            name=port_name, port=80, target_port=APP_PORT, protocol=proto,
            chain=svc_chain(spn, proto),
            endpoint_chains=tuple((b.key, sep_chain(spn, proto, f"{b.ip}:{APP_PORT}")) for b in backends),
        ))
    return ServicePlan(name, K8S_NAMESPACE, cluster_ip, dict(selector), tuple(ports), tuple(backends))


def iptables_rules(topo: LabPlan) -> str:
    """The nat rules kube-proxy and the filter rules the CNI would program on every node, for
    `iptables-restore --noflush` (every node gets the same Service rules)."""
    return "\n".join(nat_rules(topo) + flavour(topo.config.cni).filter_rules()) + "\n"


def nat_rules(topo: LabPlan) -> list[str]:
    """kube-proxy's nat table: Service portals, masquerading, one KUBE-SVC chain per
    Service port spreading over one KUBE-SEP chain per backend."""
    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    for svc in topo.services:
        for port in svc.ports:
            nat.append(f":{port.chain} - [0:0]")
            nat.extend(f":{sep} - [0:0]" for _, sep in port.endpoint_chains)
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
            match = f"-d {svc.cluster_ip}/32 -p {proto} -m {proto} --dport {port.port}"
            nat.append(f'-A KUBE-SERVICES {match} -m comment --comment "{spn} cluster IP" '
                       f"-j {port.chain}")
            # Traffic to the VIP from outside the pod network must be masqueraded back.
            nat.append(f"-A {port.chain} ! -s {CLUSTER_CIDR} {match} "
                       f'-m comment --comment "{spn} cluster IP" -j KUBE-MARK-MASQ')
            n = len(port.endpoint_chains)
            for k, (key, sep) in enumerate(port.endpoint_chains):
                ip = by_key[key].ip
                stat = (f"-m statistic --mode random --probability {1.0 / (n - k):.11f} "
                        if k < n - 1 else "")
                nat.append(f'-A {port.chain} -m comment --comment "{spn} -> {ip}:{port.target_port}" '
                           f"{stat}-j {sep}")
            for key, sep in port.endpoint_chains:
                ip = by_key[key].ip
                # Hairpin: a pod reaching itself through the VIP must be masqueraded.
                nat.append(f'-A {sep} -s {ip}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
                nat.append(f'-A {sep} -p {proto} -m comment --comment "{spn}" -m {proto} '
                           f"-j DNAT --to-destination {ip}:{port.target_port}")
    nat.append("COMMIT")
    return nat
