"""Loads the calico lab's IP-in-IP tunnel (calico_ipip.c) onto its nodes' tunl0 and uplink.

The programs stay attached after `lab up` exits (the tc filters hold them) and go with the
node namespaces at `lab down`.
"""

from __future__ import annotations

from pathlib import Path

from tracer.lab import shell
from tracer.lab.model import UPLINK, LabPlan
from tracer.lab.shell import BuildError

IPIP_DEVICE = "tunl0"
# The kernel may lack the ipip driver (CONFIG_NET_IPIP): the lab's tunl0 is then a plain
# device (ifb) whose traffic the programs tunnel. It gets a fixed ifindex (ifindexes are per
# network namespace) so that one program serves every node.
TUNL0_IFINDEX = 4000
TUNNEL_PRIO = 65000               # after anyone else's tc filters (a tracer's observers)
SOURCE = Path(__file__).with_name("calico_ipip.c")
FILTER_NAMES = {"encap": "calico-ipip-encap", "decap": "calico-ipip-decap"}
_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


def attach(topo: LabPlan) -> None:
    """Compile once, then on every node: encapsulate on tunl0's egress, decapsulate on the
    uplink's ingress. Pods send no GSO packets (one segment per skb), so every packet the
    tunnel carries is a plain one the programs can wrap and unwrap."""
    nodes = [n for n in topo.nodes if n.overlay == IPIP_DEVICE]
    if not nodes:
        return
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BuildError("cannot load the IP-in-IP tunnel: BCC is not importable",
                         "run scripts/dev.sh setup, or use --calico-mode vxlan|routed") from exc
    try:
        b = BPF(text=SOURCE.read_text().encode(),
                cflags=[f"-DTUNL0_IFINDEX={TUNL0_IFINDEX}", "-Wno-macro-redefined"])
        fds = {"encap": b.load_func(b"calico_ipip_encap", BPF.SCHED_CLS).fd,
               "decap": b.load_func(b"calico_ipip_decap", BPF.SCHED_CLS).fd}
    except Exception as exc:
        raise BuildError(f"cannot load the IP-in-IP tunnel: {exc}",
                         "use --calico-mode vxlan|routed") from exc
    try:
        for n in nodes:
            _attach(n.netns, IPIP_DEVICE, "egress", fds["encap"], FILTER_NAMES["encap"])
            _attach(n.netns, UPLINK, "ingress", fds["decap"], FILTER_NAMES["decap"])
    finally:
        b.cleanup()   # the attached filters keep their programs
    shell.parallel([(["ip", "-n", p.netns, "-batch", "-"], ["link set eth0 gso_max_segs 1"],
                     f"configuring {p.name}") for p in topo.pods])


def _attach(ns: str, dev: str, direction: str, fd: int, name: str) -> None:
    from pyroute2 import IPRoute

    from tracer.node import netns

    with netns.entered(ns):
        ipr = IPRoute()
    try:
        ifindex = ipr.link_lookup(ifname=dev)[0]
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(ifindex)):
            ipr.tc("add", "clsact", ifindex)
        ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd, name=name, parent=_PARENT[direction],
               classid=1, direct_action=True, prio=TUNNEL_PRIO)
    finally:
        ipr.close()
