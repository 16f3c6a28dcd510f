"""kube-proxy's IPVS mode for the lab's Services: kube-ipvs0, virtual and real servers, ipsets.

As kube-proxy does it: every ClusterIP on the dummy device `kube-ipvs0` (left down), one
IPVS virtual server per Service port (round robin) with a masquerading (NAT) real server
per endpoint, `net.ipv4.vs.conntrack=1` so netfilter's conntrack entry carries the DNAT,
and nat rules that match the `KUBE-CLUSTER-IP` ipset instead of one chain per Service.
Needs a kernel with IPVS (`ip_vs`) and the `ipvsadm` and `ipset` tools.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab.cni import flavour
from tracer.lab.model import MASQ_MARK, LabPlan, addr_family, cluster_cidr, plen

DEVICE = "kube-ipvs0"
SCHEDULER = "rr"
# What kube-proxy sets in ipvs mode (net.ipv4.vs.*; IPv6 uses the same ones).
SYSCTLS = {"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/conn_reuse_mode": "0",
           "net/ipv4/vs/expire_nodest_conn": "1", "net/ipv4/vs/expire_quiescent_template": "1"}


def check_kernel() -> None:
    """An error naming what is missing when this kernel cannot run IPVS."""
    if not Path("/proc/net/ip_vs").exists():
        subprocess.run(["modprobe", "ip_vs"], capture_output=True, timeout=30)
    if not Path("/proc/net/ip_vs").exists():
        raise EnvironmentProblem("this kernel has no IPVS (ip_vs is neither built in nor loadable): "
                                 "kube-proxy's ipvs mode cannot be built here",
                                 "use --proxy iptables or --proxy nftables, or a kernel with CONFIG_IP_VS")


def set_name(family: int) -> str:
    return "KUBE-CLUSTER-IP" if family == 4 else "KUBE-6-CLUSTER-IP"


def loop_set(family: int) -> str:
    return "KUBE-LOOP-BACK" if family == 4 else "KUBE-6-LOOP-BACK"


def _vip(svc, family: int) -> str:
    return next(ip for ip in (svc.cluster_ips or (svc.cluster_ip,)) if addr_family(ip) == family)


def _ip(pod, family: int) -> str:
    return next(ip for ip in (pod.ips or (pod.ip,)) if addr_family(ip) == family)


def host_port(ip: str, port: int) -> str:
    """ipvsadm's spelling of an address and port: 10.96.0.10:80, [fd00:10:96::10]:80."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def virtual_servers(topo: LabPlan, family: int) -> str:
    """`ipvsadm-restore` input: a virtual server per Service port, a NAT real server (weight
    1) per backend."""
    out = []
    for svc in topo.services:
        vip = _vip(svc, family)
        for p in svc.ports:
            kind = "-t" if p.protocol == "TCP" else "-u"
            out.append(f"-A {kind} {host_port(vip, p.port)} -s {SCHEDULER}")
            out += [f"-a {kind} {host_port(vip, p.port)} -r {host_port(_ip(b, family), p.target_port)} -m -w 1"
                    for b in svc.backends]
    return "\n".join(out) + "\n"


def ipsets(topo: LabPlan, family: int) -> str:
    """`ipset restore` input: the ClusterIP,proto:port set and the hairpin set."""
    inet = "inet" if family == 4 else "inet6"
    out = [f"create {set_name(family)} hash:ip,port family {inet} hashsize 1024 maxelem 65536 -exist",
           f"create {loop_set(family)} hash:ip,port,ip family {inet} hashsize 1024 maxelem 65536 -exist"]
    for svc in topo.services:
        for p in svc.ports:
            proto = p.protocol.lower()
            out.append(f"add {set_name(family)} {_vip(svc, family)},{proto}:{p.port} -exist")
            out += [f"add {loop_set(family)} {_ip(b, family)},{proto}:{p.target_port},{_ip(b, family)} -exist"
                    for b in svc.backends]
    return "\n".join(out) + "\n"


def iptables_rules(topo: LabPlan, family: int = 4) -> str:
    """kube-proxy's nat rules in ipvs mode (no per-Service chains: the ipsets decide) and
    the CNI's filter rules, for `iptables-restore --noflush`."""
    cs, ls = set_name(family), loop_set(family)
    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-NODE-PORT - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for '
        f'solving hairpin purpose" -m set --match-set {ls} dst,dst,src -j MASQUERADE',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A KUBE-SERVICES ! -s {cluster_cidr(family)} -m comment --comment \"Kubernetes service "
        f"cluster ip + port for masquerade purpose\" -m set --match-set {cs} dst,dst -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        f"-A KUBE-SERVICES -m set --match-set {cs} dst,dst -j ACCEPT",
        "COMMIT",
    ]
    return "\n".join(nat + flavour(topo.config.cni).filter_rules(family)) + "\n"


def device_batch(topo: LabPlan) -> list[str]:
    """`ip -batch` lines: kube-ipvs0 (a dummy, down) holding every ClusterIP."""
    lines = [f"link add {DEVICE} type dummy"]
    for svc in topo.services:
        for family in topo.families:
            lines.append(f"addr add {_vip(svc, family)}/{plen(family)} dev {DEVICE}")
    return lines


def program(topo: LabPlan) -> None:
    """kube-ipvs0, the sysctls, the ipsets and the virtual servers on every node."""
    from tracer.lab import shell

    for n in topo.nodes:
        shell.sysctls(n.netns, SYSCTLS)
        shell.ip_batch(n.netns, device_batch(topo), f"adding {DEVICE} on {n.name}")
    jobs = []
    for family in topo.families:
        jobs += [(["ip", "netns", "exec", n.netns, "ipset", "restore"], ipsets(topo, family),
                  f"programming ipsets on {n.name}") for n in topo.nodes]
    shell.parallel(jobs)
    shell.parallel([(["ip", "netns", "exec", n.netns, "ipvsadm-restore"],
                     "".join(virtual_servers(topo, f) for f in topo.families),
                     f"programming IPVS on {n.name}") for n in topo.nodes])
