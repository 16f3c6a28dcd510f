"""The scenario table: what each `lab break` scenario does, where it applies, how to see it.

Each entry names its break action (`faults`, `conntrack`), the node it acts on by default
and the nodes it can act on, the CNI flavours it does not apply to (with the reason given to
the user) and the `podtrace flow` arguments that show the fault.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from tracer.errors import BadInput
from tracer.lab import topology as T
from tracer.lab.model import prefix_flag
from tracer.lab.scenarios import (conntrack, faults, faults_bpf, faults_calico, faults_causes, faults_delivery,
                                      faults_dnat, faults_loop, faults_owner, faults_source)
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab, Pod

# Scenarios about flannel's objects do not apply to the cilium lab.
_NO_BRIDGE = {"cilium": "the cilium lab has no bridge: pods hang off lxc devices and every "
                        "packet between them is routed, so bridge-nf-call-iptables changes nothing"}
_NO_FDB = {"cilium": f"it removes an FDB entry of {T.OVERLAY}; the cilium lab's overlay is "
                     f"{T.CILIUM_OVERLAY}"}
_NO_NEIGH = {"cilium": f"it rewrites a neighbour entry on {T.OVERLAY}; the cilium lab's overlay is "
                       f"{T.CILIUM_OVERLAY}"}
# ... nor to the calico lab (no bridge; tunl0, vxlan.calico or no overlay at all).
_NO_BRIDGE["calico"] = ("the calico lab has no bridge: pods hang off cali devices and every packet "
                        "between them is routed, so bridge-nf-call-iptables changes nothing")
_NOT_FLANNEL_1 = ("it acts on flannel.1; the calico lab's nodes have tunl0 (IP-in-IP), vxlan.calico "
                  "or no overlay (routed)")
_NO_FDB["calico"] = _NO_NEIGH["calico"] = _NOT_FLANNEL_1


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str                                  # one line for listings
    default_node: Callable[[Lab], str] | None     # None: cluster-wide, takes no --node
    valid_nodes: Callable[[Lab], list[str]]
    show: Callable[[Lab, str | None], str]        # `podtrace flow` arguments that show it
    inject: Callable[[Changes, Lab, str | None], None] = field(repr=False)
    why_no_nodes: str = "it needs a lab with at least 2 nodes (podtrace lab up --nodes 2)"
    not_on: dict[str, str] = field(default_factory=dict)   # CNI flavour -> why it does not apply
    families: tuple[int, ...] = (4,)              # address families of the target it can break

    @property
    def cluster_wide(self) -> bool:
        return self.default_node is None


_REGISTRY: dict[str, Scenario] = {}


# Lab flavours a scenario may apply to: the CNIs, and the cilium lab on its eBPF datapath.
EBPF = "cilium-ebpf"
FLAVOURS = (*T.CNIS, EBPF)
_EBPF_SCENARIOS = {"bpf-policy-drop"}    # the ones built and checked on the eBPF datapath


def flavour_key(doc: dict | None) -> str:
    """The flavour a lab status document describes: its CNI, or cilium-ebpf."""
    doc = doc or {}
    cni = doc.get("cni") or "flannel"
    return EBPF if cni == "cilium" and doc.get("datapath") == "ebpf" else cni


def _register(sc: Scenario) -> Scenario:
    if sc.name not in _EBPF_SCENARIOS and EBPF not in sc.not_on:
        why = sc.not_on.get("cilium") or (
            "on the eBPF datapath forwarding, Services and policy are BPF programs "
            "(netfilter never sees pod traffic); this scenario is not built for it")
        object.__setattr__(sc, "not_on", {**sc.not_on, EBPF: why})
    _REGISTRY[sc.name] = sc
    return sc


def names() -> list[str]:
    return list(_REGISTRY)


def all_scenarios() -> list[Scenario]:
    return list(_REGISTRY.values())


def get(name: str) -> Scenario:
    sc = _REGISTRY.get(name)
    if sc is None:
        near = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else "list them with `podtrace lab scenarios`"
        raise BadInput(f"unknown scenario {name!r}", hint)
    return sc


def check_family(sc: Scenario, lab: Lab, family: int | None) -> None:
    """Bad input when the lab has no pods of `family`, or the scenario cannot break it."""
    if family is not None and family not in lab.families:
        have = " and ".join(f"IPv{f}" for f in lab.families)
        raise BadInput(f"--ip-family {family}: the lab {lab.prefix} has {have} pods only",
                       f"use --ip-family {lab.families[0]} or leave it out")
    if lab.family not in sc.families:
        v6 = ", ".join(s.name for s in all_scenarios() if 6 in s.families)
        raise BadInput(f"{sc.name} does not apply to IPv{lab.family} targets (it breaks IPv4 only)",
                       f"IPv6 scenarios: {v6}" if lab.family == 6 else "see `podtrace lab scenarios`")


def resolve_node(sc: Scenario, lab: Lab, node: str | None) -> str | None:
    """The node a scenario acts on: --node checked against the lab, or the default."""
    why = unsupported(flavour_key(lab.doc), sc.name)
    if why:
        raise BadInput(f"{sc.name} does not apply to the {flavour_key(lab.doc)} lab: {why}",
                       "see `podtrace lab scenarios` for the ones that do")
    check_family(sc, lab, None)
    if sc.cluster_wide:
        if node is not None:
            raise BadInput(f"{sc.name} is cluster-wide (every node's kube-proxy programs it)",
                           "run it without --node")
        return None
    valid = sc.valid_nodes(lab)
    if not valid:
        raise BadInput(f"{sc.name} cannot run on this lab: {sc.why_no_nodes}")
    if node is None:
        return sc.default_node(lab)
    if node not in valid:
        what = "unknown node" if node not in lab.node_names else f"{sc.name} cannot run on node"
        raise BadInput(f"{what} {node!r}", f"use one of: {', '.join(valid)}")
    return node


def unsupported(cni: str | None, name: str) -> str | None:
    """Why `podtrace lab break NAME` does not apply to a lab of this CNI, or None."""
    sc = _REGISTRY.get(name)
    return sc.not_on.get(cni or "flannel") if sc else None


def flow_command(sc: Scenario, lab: Lab, node: str | None = None) -> str:
    node = node if node is not None or sc.cluster_wide else sc.default_node(lab)
    # A dual-stack lab's pods are reached over their first family unless told otherwise.
    family = f" --ip-family {lab.family}" if lab.family != lab.families[0] else ""
    return "podtrace flow " + sc.show(lab, node) + family + prefix_flag(lab.prefix)


def _two_nodes(lab: Lab) -> list[str]:
    return lab.node_names if len(lab.nodes) > 1 else []


def _any_node(lab: Lab) -> list[str]:
    return [n for n in lab.node_names if lab.client_for(n) is not None]


def _first(lab: Lab) -> str:
    return lab.node_names[0]


def _second(lab: Lab) -> str:
    return lab.node_names[1 if len(lab.nodes) > 1 else 0]


def _web_nodes(lab: Lab) -> list[str]:
    """Nodes with a backend of `web` and another pod to be its client."""
    backends = {b.split("/", 1)[1] for b in lab.web()["backends"]}
    return [n for n in lab.node_names
            if any(p.name in backends for p in lab.pods_on(n))
            and any(p.name not in backends for p in lab.pods_on(n))]


def _web_client(lab: Lab, node: str) -> Pod:
    backends = {b.split("/", 1)[1] for b in lab.web()["backends"]}
    return next(p for p in lab.pods_on(node) if p.name not in backends)


def _show_to_first_pod(lab: Lab, node: str) -> str:
    """From another node's pod to the first pod of `node` (the request crosses `node` last)."""
    return f"{lab.client_for(node).name} {lab.pods_on(node)[0].name}"


def _show_from_first_pod(lab: Lab, node: str) -> str:
    """From the first pod of `node` to a pod on the peer node (the request leaves `node`)."""
    return f"{lab.pods_on(node)[0].name} {lab.pods_on(lab.peer(node).name)[0].name}"


_register(Scenario(
    "netpol-drop",
    "a NetworkPolicy-style iptables chain (KUBE-NWPLCY-…) on the destination's node drops "
    "traffic to its first pod",
    _second, _any_node, _show_to_first_pod, faults.netpol_drop,
    why_no_nodes="it needs a second pod to send from", families=(4, 6)))
_register(Scenario(
    "ip-forward-off",
    "net.ipv4.ip_forward=0 (IPv6: net.ipv6.conf.all.forwarding=0) on a node: pod traffic to "
    "other nodes is not forwarded",
    _first, _two_nodes, _show_from_first_pod, faults.ip_forward_off, families=(4, 6)))
_register(Scenario(
    "br-netfilter-off",
    "net.bridge.bridge-nf-call-iptables=0 on the node of web's backend: a same-node client's "
    "replies skip conntrack and come from the backend IP, not the ClusterIP",
    lambda lab: _web_nodes(lab)[0], _web_nodes,
    lambda lab, node: f"{_web_client(lab, node).name} svc/default/web --proto udp --port 80",
    faults.br_netfilter_off,
    why_no_nodes="it needs a node with a backend of svc/default/web and another pod", not_on=_NO_BRIDGE))
_register(Scenario(
    "conntrack-full",
    "a node's conntrack table filled to nf_conntrack_max with ASSURED entries: new flows "
    "through it are dropped",
    _first, _any_node,
    lambda lab, node: (_show_from_first_pod(lab, node) if len(lab.nodes) > 1
                       else f"{lab.pods_on(node)[0].name} {lab.client_for(node).name}"),
    conntrack.conntrack_full,
    why_no_nodes="it needs a second pod to send to"))
_register(Scenario(
    "conntrack-invalid",
    "SYNs leaving a node are NOTRACKed and FORWARD drops ctstate INVALID: the SYN-ACK "
    "coming back is dropped",
    _first, _two_nodes,
    lambda lab, node: _show_from_first_pod(lab, node) + f" --proto tcp --port {T.APP_PORT}",
    conntrack.conntrack_invalid))
_register(Scenario(
    "rp-filter-strict",
    "rp_filter=1 (all) on a node plus an asymmetric host route back to a client pod: the "
    "client's packets are dropped on flannel.1",
    _second, _two_nodes, _show_to_first_pod, faults.rp_filter_strict))
_register(Scenario(
    "mtu-blackhole",
    f"the underlay switch port of a node carries only {faults.BLACKHOLE_MTU}-byte packets: full-size "
    "pod packets (VXLAN outer 1500) vanish silently, small ones pass",
    _first, _two_nodes,
    lambda lab, node: _show_from_first_pod(lab, node) + f" --size {lab.pod_mtu}",
    faults.mtu_blackhole, families=(4, 6)))
_register(Scenario(
    "no-route",
    "the flannel route to the peer node's pod CIDR removed from a node",
    _first, _two_nodes, _show_from_first_pod, faults.no_route, families=(4, 6)))
_register(Scenario(
    "fdb-missing",
    "a node's VXLAN FDB entry for the peer node's VTEP MAC removed",
    _first, _two_nodes, _show_from_first_pod, faults.fdb_missing, not_on=_NO_FDB))
_register(Scenario(
    "neigh-wrong",
    "a node's neighbour entry for the peer's flannel.1 address points at a stale VTEP MAC "
    "(IPv6: the NDP entry)",
    _first, _two_nodes, _show_from_first_pod, faults.neigh_wrong, not_on=_NO_NEIGH,
    families=(4, 6)))
_register(Scenario(
    "svc-no-endpoints",
    "svc/default/web has no endpoints, programmed as kube-proxy's mode does (a REJECT; nft: "
    "no-endpoint-services; ipvs: no real servers) on every node; an empty EndpointSlice",
    None, lambda lab: [],
    lambda lab, node: f"{lab.pods[0].name} svc/default/web --proto tcp --port 80",
    faults.svc_no_endpoints))
_register(Scenario(
    "stale-udp-conntrack",
    f"a conntrack entry on the client's node still DNATs web's UDP port from source port "
    f"{conntrack.STALE_SPORT} to a backend IP that no longer exists",
    _first, lambda lab: [n for n in lab.node_names if lab.pods_on(n)],
    lambda lab, node: (f"{lab.pods_on(node)[0].name} svc/default/web --proto udp --port 80 "
                       f"--sport {conntrack.STALE_SPORT} --count 1"),
    conntrack.stale_udp_conntrack,
    why_no_nodes="it needs a pod"))
_register(Scenario(
    "pod-input-drop",
    "a DROP rule in the INPUT chain of the destination pod's own namespace, for traffic from "
    "its client: the packets arrive on the pod's eth0 and die in its stack",
    _second, _any_node, _show_to_first_pod, faults_delivery.pod_input_drop,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "pod-mac-wrong",
    "the node's neighbour entry for its first pod's address replaced with a MAC no pod has "
    "(permanent): frames reach the pod addressed to another host and are discarded (OTHERHOST)",
    _second, _any_node, _show_to_first_pod, faults_delivery.pod_mac_wrong,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "pod-no-route",
    "the default route of a node's first pod removed: its sends to another node's pods fail "
    "(ENETUNREACH) before any packet leaves the pod",
    _first, _two_nodes, _show_from_first_pod, faults_source.pod_no_route))
_register(Scenario(
    "pod-pmtu",
    f"a route inside a node's first pod to the peer node's first pod with a locked MTU of "
    f"{faults_source.PMTU}: full-size DF probes cannot leave the pod (EMSGSIZE)",
    _first, _two_nodes,
    lambda lab, node: _show_from_first_pod(lab, node) + " --size 1400",
    faults_source.pod_pmtu))
_register(Scenario(
    "pod-gw-neigh",
    "every ARP frame to and from a node's first pod is dropped at its node-side device (nftables, "
    "netdev ingress): the pod cannot resolve its gateway, nothing it sends leaves it",
    _first, _two_nodes, _show_from_first_pod, faults_source.pod_gw_neigh))
_register(Scenario(
    "hostport-unreversed",
    f"a hostPort DNAT (node IP, port {faults_dnat.HOST_PORT}) to a node's first pod and "
    "bridge-nf-call-iptables=0 there: same-node clients get replies from the pod IP",
    _second, lambda lab: [n for n in lab.node_names if len(lab.pods_on(n)) > 1],
    lambda lab, node: (f"{faults_dnat.client(lab, node).name} {lab.node(node).ip} --proto udp "
                       f"--port {faults_dnat.HOST_PORT}"),
    faults_dnat.hostport_unreversed,
    why_no_nodes="it needs a node with two pods", not_on=_NO_BRIDGE))
_register(Scenario(
    "link-down",
    "the host side of a pod's veth set down on its node: the node cannot reach the pod",
    _second, _any_node, _show_to_first_pod, faults_causes.link_down,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "nft-native-drop",
    f"a native nftables table (inet {faults_causes.NFT_TABLE}, forward hook) on a node drops traffic to its "
    "first pod, outside iptables",
    _second, _any_node, _show_to_first_pod, faults_causes.nft_native_drop,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "overlay-input-drop",
    f"a node's filter INPUT chain drops UDP {T.VXLAN_PORT}: the overlay's VXLAN packets from other "
    "nodes are dropped before decapsulation",
    _second, _two_nodes, _show_to_first_pod, faults_causes.overlay_input_drop,
    not_on={"calico": f"it drops UDP {T.VXLAN_PORT}; the calico lab tunnels with IP-in-IP or VXLAN on "
                      "UDP 4789 (see ipip-blocked)"}))

_register(Scenario(
    "routing-loop",
    f"a node routes the unused CIDR {faults_loop.LOOP_CIDR} over the overlay to its peer, which "
    "routes it back: packets loop until their TTL runs out",
    _first, _two_nodes,
    lambda lab, node: f"{lab.pods_on(node)[0].name} {faults_loop.LOOP_DST}",
    faults_loop.routing_loop, not_on={"cilium": f"its routes go via {T.OVERLAY}; the cilium "
                                                  f"lab's overlay is {T.CILIUM_OVERLAY}",
                                        "calico": _NOT_FLANNEL_1}))
_register(Scenario(
    "icmp-prohibited",
    "a REJECT --reject-with icmp-admin-prohibited rule in FORWARD on the destination's node "
    "for traffic to its first pod",
    _second, _any_node,
    lambda lab, node: _show_to_first_pod(lab, node) + f" --proto udp --port {T.APP_PORT}",
    faults_loop.icmp_prohibited,
    why_no_nodes="it needs a second pod to send from"))
_register(Scenario(
    "pod-ip-gone",
    "a pod's address removed from its eth0 and from its status (its sandbox died): its IP, "
    "given bare, is in the node's pod CIDR but nothing answers there",
    _second, lambda lab: [n for n in _two_nodes(lab) if lab.pods_on(n)],
    lambda lab, node: f"{lab.client_for(node).name} {faults_owner.target(lab, node).ip}",
    faults_owner.pod_ip_gone))

# Calico's own objects: only the calico lab has them.
_CALICO_ONLY = {c: "it acts on Calico's objects (Felix chains, cali devices, BIRD routes, the IP-in-IP "
                   "tunnel); only the calico lab has them" for c in ("flannel", "cilium")}
_register(Scenario(
    "felix-policy-drop",
    "a deny-all policy selects a node's first pod: Felix's to-workload chain drops what no policy "
    "passed",
    _second, _two_nodes, _show_to_first_pod, faults_calico.felix_policy_drop, not_on=_CALICO_ONLY))
_register(Scenario(
    "proxy-arp-off",
    "proxy ARP off on the cali device of a node's first pod: nobody answers its ARP for "
    "169.254.1.1, nothing it sends leaves it",
    _first, _two_nodes, _show_from_first_pod, faults_calico.proxy_arp_off, not_on=_CALICO_ONLY))
_register(Scenario(
    "bgp-route-withdrawn",
    "the route BIRD installed for the peer node's block removed from a node, as when their BGP "
    "session drops (routed and ipip modes)",
    _first, _two_nodes, _show_from_first_pod, faults_calico.bgp_route_withdrawn, not_on=_CALICO_ONLY))
_register(Scenario(
    "ipip-blocked",
    "the underlay drops IP protocol 4 towards a node: IP-in-IP packets from other nodes vanish "
    "(ipip mode)",
    _second, _two_nodes, _show_to_first_pod, faults_calico.ipip_blocked, not_on=_CALICO_ONLY))


_register(Scenario(
    "bpf-policy-drop",
    "a deny entry in the eBPF datapath's policy map on the destination's node: the BPF "
    "program delivering to its first pod returns TC_ACT_SHOT for a client's traffic",
    _second, _two_nodes, _show_to_first_pod, faults_bpf.bpf_policy_drop,
    not_on={c: "it writes into the eBPF datapath's policy map (podtrace lab up --cni cilium "
               "--datapath ebpf)" for c in T.CNIS}))


def applies_to(sc: Scenario) -> list[str]:
    """The CNI flavours a scenario applies to: every lab flavour but those in `not_on`."""
    return [c for c in FLAVOURS if c not in sc.not_on]



def listing(lab: Lab | None = None) -> list[dict]:
    """One entry per scenario: name, summary, default node, valid nodes, the flow command,
    the CNI flavours and the address families (of the target: ipv4, ipv6) it applies to.
    The node and flow fields are those of the lab's family (`lab.family`)."""
    lab = lab or Lab.planned()
    out = []
    for sc in all_scenarios():
        why_not = unsupported(flavour_key(lab.doc), sc.name) or (lab.family not in sc.families)
        valid = [] if sc.cluster_wide or why_not else sc.valid_nodes(lab)
        node = None if sc.cluster_wide or not valid else sc.default_node(lab)
        shown = (sc.cluster_wide or valid) and not why_not
        out.append({"name": sc.name, "summary": sc.summary, "default_node": node,
                    "nodes": valid, "cluster_wide": sc.cluster_wide,
                    "flow": flow_command(sc, lab, node) if shown else None,
                    "applies_to": applies_to(sc),
                    "families": [f"ipv{f}" for f in sc.families]})
    return out
