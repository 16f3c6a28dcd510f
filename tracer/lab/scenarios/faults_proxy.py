"""Break actions on kube-proxy's own state in its nftables and ipvs modes."""

from __future__ import annotations

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
