"""Break actions on kube-proxy's own state in its nftables and ipvs modes."""

from __future__ import annotations

from tracer.lab import kubeproxy_ipvs as V
from tracer.lab import kubeproxy_nft as N
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab


def nft_no_endpoints(ch: Changes, lab: Lab, n) -> None:
    """svc-no-endpoints in nftables mode on one node: web's `service-ips` elements and
    chains removed, a `no-endpoint-services` element per port jumping to `reject-chain`."""
    svc = lab.web()
    gone, back = N.without_endpoints(svc, lab.family)
    argv = ["ip", "netns", "exec", n.netns, "nft", "-f", "-"]
    fam = N.nft_family(lab.family)
    ch.run(argv, f"{n.name}: {fam} {N.TABLE}: {svc['namespace']}/{svc['name']} moved from @{N.SERVICE_IPS} "
                 f"to @{N.NO_ENDPOINTS} (goto {N.REJECT_CHAIN}), its service and endpoint chains deleted",
           argv, input=gone, undo_input=back)


def ipvs_no_endpoints(ch: Changes, lab: Lab, n) -> None:
    """svc-no-endpoints in ipvs mode on one node: web's virtual servers keep their address
    on kube-ipvs0 but lose every real server (as kube-proxy leaves them)."""
    svc = lab.web()
    fam = "ipv4" if lab.family == 4 else "ipv6"
    vip = next((ip for ip in svc.get("cluster_ips") or [svc["cluster_ip"]] if (":" in ip) == (lab.family == 6)),
               svc["cluster_ip"])
    ips = (svc.get("backend_ips_by_family") or {}).get(fam) or svc["backend_ips"]
    for p in svc["ports"]:
        kind = "-t" if p["protocol"] == "TCP" else "-u"
        virtual = V.host_port(vip, p["port"])
        for ip in ips:
            real = V.host_port(ip, p["target_port"])
            base = ["ip", "netns", "exec", n.netns, "ipvsadm"]
            ch.run([*base, "-d", kind, virtual, "-r", real],
                   f"{n.name}: IPVS {virtual}/{p['protocol'].lower()}: real server {real} removed",
                   [*base, "-a", kind, virtual, "-r", real, "-m", "-w", "1"])
