"""The lab status document (`podtrace lab status -o json`) of a planned lab."""

from __future__ import annotations

from tracer.lab.cni import flavour
from tracer.lab.model import (APP_PORT, CLUSTER_CIDR, FABRIC_BRIDGE, SERVICE_CIDR, UNDERLAY_CIDR,
                              VXLAN_PORT, LabPlan)


def status_document(topo: LabPlan, pids: dict[str, int] | None = None) -> dict:
    """The contract's lab status document. `pids` maps "default/pod-i-j" to the responder's
    pid once the lab is built."""
    pids = pids or {}
    fl = flavour(topo.config.cni)
    return {
        "prefix": topo.prefix,
        "cni": fl.NAME,
        "created_at": topo.created_at,
        "state_dir": str(topo.lab_dir),
        "inventory": str(topo.inventory_path),
        "fabric_netns": topo.fabric_netns,
        "fabric_bridge": FABRIC_BRIDGE,
        "underlay_cidr": UNDERLAY_CIDR,
        "cluster_cidr": CLUSTER_CIDR,
        "service_cidr": SERVICE_CIDR,
        "vxlan": {"vni": fl.VNI, "port": VXLAN_PORT},
        **fl.status_fields(),
        "nodes": [fl.status_node(n) for n in topo.nodes],
        "pods": [
            {
                "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                "netns": p.netns, "host_veth": p.host_veth, **fl.status_pod_fields(p),
                "tcp_port": APP_PORT, "udp_port": APP_PORT, "mac": p.mac, "interface": "eth0",
                "gateway": p.gateway, "labels": p.labels, "responder_pid": pids.get(p.key),
            }
            for p in topo.pods
        ],
        "services": _services(topo),
    }


def _services(topo: LabPlan) -> list[dict]:
    return [
        {
            "namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
            "ports": [
                {"name": port.name, "port": port.port, "target_port": port.target_port,
                 "protocol": port.protocol, "chain": port.chain,
                 "endpoint_chains": dict(port.endpoint_chains)}
                for port in s.ports
            ],
            "selector": dict(s.selector),
            "backends": [b.key for b in s.backends],
            "backend_ips": [b.ip for b in s.backends],
        }
        for s in topo.services
    ]
