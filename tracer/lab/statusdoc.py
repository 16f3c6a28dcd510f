"""The lab status document (`podtrace lab status -o json`) of a planned lab."""

from __future__ import annotations

from tracer.lab.cni import flavour
from tracer.lab.model import (APP_PORT, FABRIC_BRIDGE, VXLAN_PORT, LabPlan, cluster_cidr,
                              service_cidr, underlay_cidr)


def status_document(topo: LabPlan, pids: dict[str, int] | None = None) -> dict:
    """The contract's lab status document. `pids` maps "default/pod-i-j" to the responder's
    pid once the lab is built."""
    pids = pids or {}
    fl = flavour(topo.config.cni)
    fams = topo.families
    uf = topo.config.underlay_family
    return {
        "prefix": topo.prefix,
        "cni": fl.NAME,
        **({"datapath": topo.config.datapath} if fl.NAME == "cilium" else {}),
        "created_at": topo.created_at,
        "state_dir": str(topo.lab_dir),
        "inventory": str(topo.inventory_path),
        "fabric_netns": topo.fabric_netns,
        "fabric_bridge": FABRIC_BRIDGE,
        "underlay_cidr": underlay_cidr(uf),
        "cluster_cidr": cluster_cidr(fams[0]),
        "service_cidr": service_cidr(fams[0]),
        "vxlan": {"vni": fl.VNI, "port": getattr(fl, "VXLAN_PORT", VXLAN_PORT)},
        # ipv4, ipv6 or dual; every family's CIDRs, the first family's first.
        "ip_family": topo.config.ip_family,
        "ip_families": [_FAMILY_NAMES[f] for f in fams],
        "cluster_cidrs": [cluster_cidr(f) for f in fams],
        "service_cidrs": [service_cidr(f) for f in fams],
        "pod_mtu": topo.nodes[0].mtu,
        # kube-proxy's mode: iptables, nftables (the `kube-proxy` table) or ipvs (kube-ipvs0)
        "proxy": topo.config.proxy,
        **fl.status_fields(),
        **({"calico_mode": topo.config.calico_mode} if fl.NAME == "calico" else {}),
        "nodes": [fl.status_node(n) for n in topo.nodes],
        "pods": [
            {
                "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                "ips": list(p.ips or (p.ip,)),
                "netns": p.netns, "host_veth": p.host_veth, **fl.status_pod_fields(p),
                "tcp_port": APP_PORT, "udp_port": APP_PORT, "mac": p.mac, "interface": "eth0",
                "gateway": p.gateway, "gateways": list(p.gateways or (p.gateway,)),
                "labels": p.labels, "responder_pid": pids.get(p.key),
            }
            for p in topo.pods
        ],
        "services": _services(topo),
    }


def _services(topo: LabPlan) -> list[dict]:
    return [
        {
            "namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
            "cluster_ips": list(s.cluster_ips or (s.cluster_ip,)),
            "ip_families": [_FAMILY_NAMES[f] for f in topo.families],
            "ports": [
                {"name": port.name, "port": port.port, "target_port": port.target_port,
                 "protocol": port.protocol, "chain": port.chain,
                 "endpoint_chains": dict(port.endpoint_chains),
                 # per family ("ipv4", "ipv6"): the KUBE-SEP chains in iptables / ip6tables
                 "endpoint_chains_by_family": {
                     _FAMILY_NAMES[f]: dict(chains)
                     for f, chains in (port.family_chains or ((4, port.endpoint_chains),))}}
                for port in s.ports
            ],
            "selector": dict(s.selector),
            "backends": [b.key for b in s.backends],
            "backend_ips": [b.ip for b in s.backends],
            "backend_ips_by_family": {
                _FAMILY_NAMES[f]: [next(ip for ip in (b.ips or (b.ip,)) if (":" in ip) == (f == 6))
                                   for b in s.backends]
                for f in topo.families},
        }
        for s in topo.services
    ]


_FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}
