"""The node that owns a destination: pod CIDRs of Node objects, a bare IP's owner in the plan,
and `partial` (no view beyond a node) for packets that left towards a node nobody traced."""

from __future__ import annotations

import numpy as np

from bench.analysis import LOST_AFTER, PODS, _path, _records, synth_flow
from tracer import analysis
from tracer.cluster import endpoints, inventory
from tracer.config import FlowConfig
from tracer.kernel import record
from tracer.reconstruct import beyond, diagnose
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import Encap, Hop
from tracer.reconstruct.packets import build_packets
from tracer.runs import plan as planner

GONE = "10.244.2.99"      # in node-2's pod CIDR, no pod has it


def _node(name, ip, cidr=None, cidrs=None, external=None):
    addrs = [{"type": "InternalIP", "address": ip}] + (
        [{"type": "ExternalIP", "address": external}] if external else [])
    spec = {}
    if cidr:
        spec["podCIDR"] = cidr
    if cidrs:
        spec["podCIDRs"] = cidrs
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec, "status": {"addresses": addrs}}


def test_node_objects_give_their_pod_cidrs():
    n = inventory.node_from_obj(_node("a", "172.30.0.1", cidrs=["10.1.0.0/24", "fd00::/64"]))
    assert n.pod_cidr == "10.1.0.0/24" and n.cidrs() == ["10.1.0.0/24", "fd00::/64"]
    n = inventory.node_from_obj(_node("b", "172.30.0.2", cidr="10.2.0.0/24"))
    assert n.cidrs() == ["10.2.0.0/24"]


def test_a_node_endpoint_carries_its_cni_addresses():
    """Cilium's router IP and Calico's tunnel address (node annotations) are the node's own:
    a `node/NAME` endpoint's filter holds them, beside its InternalIP; a bad value is ignored."""
    obj = _node("a", "172.30.0.1", cidr="10.244.1.0/24")
    obj["metadata"]["annotations"] = {"network.cilium.io/ipv4-cilium-host": "10.244.1.1",
                                      "network.cilium.io/ipv6-cilium-host": "fd00:10:244:1::1",
                                      "projectcalico.org/IPv4IPIPTunnelAddr": "not-an-ip",
                                      "projectcalico.org/IPv4VXLANTunnelAddr": "10.244.1.0/32"}
    n = inventory.node_from_obj(obj)
    assert n.cni_ips == ["10.244.1.1", "fd00:10:244:1::1", "10.244.1.0"]
    assert n.internal_ips() == ["172.30.0.1"]          # not an uplink address
    inv = inventory.from_items([obj], "test")
    ep = endpoints.resolve("node/a", inv)
    assert ep.addresses() == ["172.30.0.1", "10.244.1.1", "10.244.1.0"]     # the endpoint's family
    assert endpoints.resolve("172.30.0.1", inv).addresses() == ["172.30.0.1"]   # an address typed: itself


def test_cidr_owner_pod_cidrs_then_node_addresses():
    inv = inventory.from_items([_node("a", "172.30.0.1", "10.1.0.0/16"),
                                _node("b", "172.30.0.2", "10.1.2.0/24", external="198.51.100.2"),
                                _node("c", "172.30.0.3")], "test")
    assert inv.cidr_owner("10.1.2.7").name == "b"          # the narrowest CIDR
    assert inv.cidr_owner("10.1.9.7").name == "a"
    assert inv.cidr_owner("172.30.0.3").name == "c"        # a node address
    assert inv.cidr_owner("198.51.100.2").name == "b"      # an ExternalIP
    assert inv.cidr_owner("8.8.8.8") is None
    assert inv.cidr_owner(None) is None and inv.cidr_owner("bogus") is None


def test_the_lab_inventory_carries_pod_cidrs(inv):
    assert {n.name: n.cidrs() for n in inv.nodes.values()} == {
        "node-1": ["10.244.1.0/24"], "node-2": ["10.244.2.0/24"]}


def test_a_bare_ip_endpoint_names_its_owner(inv):
    ep = endpoints.resolve(GONE, inv)
    assert ep.pod is None and ep.node is None and ep.owner.name == "node-2"
    j = ep.as_json()
    assert j["owner"] == "node-2" and j["node"] is None     # the contract's keys unchanged
    assert endpoints.resolve("10.244.1.2", inv).as_json()["owner"] == "node-1"    # a pod's node
    assert endpoints.resolve("8.8.8.8", inv).as_json()["owner"] is None
    assert endpoints.resolve("svc/default/web", inv).as_json()["owner"] is None


def _plan(inv, src, dst):
    cfg = FlowConfig(src=src, dst=dst)
    s, d = endpoints.resolve(src, inv), endpoints.resolve(dst, inv)
    proto, port, notes = planner.choose_proto(cfg, d)
    from tracer.reconstruct import packets
    return planner.Plan(cfg, inv, None, object(), s, d, proto, port, notes, packets.Placement(), {}, {},
                        sorted(set(s.addresses() + d.addresses())), 0.0)


def test_the_plan_traces_the_owner_of_a_bare_ip(inv):
    assert [r.node for r in planner.agent_requests(_plan(inv, "pod-1-1", GONE))] == ["node-1", "node-2"]
    assert [r.node for r in planner.agent_requests(_plan(inv, "pod-1-1", "8.8.8.8"))] == ["node-1"]


# -- left_view on hand-built hops ---------------------------------------------------------------

ENC = Encap("172.30.0.11", "172.30.0.12", 1, "vxlan")
VIEW = beyond.View(("node-1",), {"node-2": "its agent failed: exit 9"},
                   {"172.30.0.11": "node-1", "172.30.0.12": "node-2"},
                   {"10.244.1.0/24": "node-1", "10.244.2.0/24": "node-2"})


def _hops(upto: int, dst: str = "10.244.2.3", enc: Encap = ENC) -> tuple[Hop, ...]:
    path = [("node-1", "default/pod-1-1", "eth0", "tx", None), ("node-1", None, "veth1", "rx", None),
            ("node-1", None, "cni0", "rx", None), ("node-1", None, "flannel.1", "tx", None),
            ("node-1", None, "eth0", "tx", enc), (None, None, "n1", "rx", enc), (None, None, "n2", "tx", enc)]
    return tuple(Hop(n, p, d, pt, "10.244.1.2", dst, encap=e) for n, p, d, pt, e in path[:upto])


def test_left_towards_an_untraced_node_is_partial_there():
    v = beyond.left_view(_hops(7), VIEW.traced, VIEW.node_of, VIEW.untraced)
    assert (v.status, v.node, v.dev, v.point, v.cause) == ("partial", "node-1", "eth0", "tx", None)
    assert v.hint == ("No view beyond node-1: the packet left towards 172.30.0.12 "
                      "(node-2, not traced: its agent failed: exit 9).")
    assert v.evidence["view"]["towards_node"] == "node-2" and v.evidence["view"]["encapsulated"]


def test_not_partial_when_the_next_node_was_traced_or_the_packet_never_left():
    assert beyond.left_view(_hops(7), ("node-1", "node-2"), VIEW.node_of, {}) is None
    assert beyond.left_view(_hops(3), VIEW.traced, VIEW.node_of, VIEW.untraced) is None   # last: cni0 rx
    # routed (no tunnel) towards a local address: not leaving the node
    assert beyond.left_view(_hops(4, dst="10.244.1.3"), VIEW.traced, VIEW.node_of, VIEW.untraced) is None


def test_not_planned_and_unknown_destinations_are_named():
    v = beyond.left_view(_hops(5), ("node-1",), VIEW.node_of)
    assert v.hint.endswith(f"(node-2, not traced: {beyond.NOT_PLANNED}).")
    odd = Encap("172.30.0.11", "172.30.0.99", 1, "vxlan")
    v = beyond.left_view(_hops(5, enc=odd), ("node-1",), VIEW.node_of)
    assert v.status == "partial" and "towards 172.30.0.99 (not traced: no node of the cluster" in v.hint


def test_view_of_an_inventory(inv):
    v = beyond.view_of(inv.nodes.values(), ["node-1", "fabric"], {"node-2": "its agent failed: x"})
    assert v.traced == ("node-1", "fabric") and v.untraced == {"node-2": "its agent failed: x"}
    assert v.node_of("172.30.0.12") == "node-2" and v.node_of(GONE) == "node-2" and v.node_of("1.1.1.1") is None
    assert beyond.View.from_json(v.as_json()) == v
    v = beyond.view_of(inv.nodes.values(), ["node-1"])
    assert v.untraced == {"node-2": beyond.NOT_PLANNED}


# -- the engine: build_packets, judge, the flow verdict, a saved flow ---------------------------

def _flow_left_node_1(view: beyond.View | None):
    """One probe whose request is seen up to the fabric's n2 (node-2 untraced) and no reply."""
    client, server = "default/pod-1-1", "default/pod-2-2"
    recs = [(5_000_000_000 + j * 5000, 0xFFFF888100000000, ns, dev, hook, enc, PODS[client][2], 40000,
             PODS[server][2], 8080, 1000, 100, 0)
            for j, (ns, dev, hook, enc) in enumerate(_path(client, server)[:LOST_AFTER + 3])]
    arr = _records(recs)
    arr["tcp_flags"] = 0x02
    arr["ip_len"] = 60
    _, meta = synth_flow(probes=1, client=client, server=server)
    meta["probes"][0].update(outcome="timeout", reply_from=None, rtt_ns=None)
    meta["dst"] = {"spec": PODS[server][2], "ip": PODS[server][2], "pod": None, "node": None,
                   "service": None, "owner": "node-2"}
    if view is not None:
        meta["view"] = view.as_json()
    return arr, meta


def _judged(arr, meta):
    fi = analysis._flow_input(meta)
    packets = diagnose.judge(build_packets(record.to_frame(arr), fi), Evidence())
    return packets, fi


def test_build_packets_partial_not_lost_and_the_flow_verdict_says_so():
    arr, meta = _flow_left_node_1(VIEW)
    packets, fi = _judged(arr, meta)
    (p,) = packets
    assert (p.verdict.status, p.verdict.node, p.verdict.dev) == ("partial", "node-1", "eth0")
    assert p.verdict.cause is None and "view" in p.verdict.evidence
    fv, _ = verdicts.flow_verdict(packets, fi, True)
    assert fv.status == "failed"         # nothing proves delivery
    assert fv.problems == (
        "probe 1: request left node-1 towards 172.30.0.12 (node-2): not traced (its agent failed: exit 9)",
        "probe 1: no view beyond node-1: no reply, and nothing shows the request was delivered")
    assert not any("partial at" in s for s in fv.problems)


def test_without_a_view_the_old_verdict_stays():
    arr, meta = _flow_left_node_1(None)
    packets, _ = _judged(arr, meta)
    assert packets[0].verdict.status == "lost"


def test_a_saved_flow_gives_the_live_partial_verdict():
    arr, meta = _flow_left_node_1(VIEW)
    from tracer.analysis import flowfile
    (p,) = flowfile.reconstruct(record.to_frame(arr), meta)
    assert p.verdict.status == "partial" and p.verdict.hint.startswith("No view beyond node-1")


def test_judge_never_adds_a_cause_to_partial():
    arr, meta = _flow_left_node_1(VIEW)
    packets, _ = _judged(arr, meta)
    from tracer.reconstruct.evidence import fact_query
    facts = {"node-1": [{"query": fact_query("node-1", packets[0]), "facts": {"ip_forward": 0}}]}
    again = diagnose.judge(packets, Evidence().with_answers(facts))
    assert again[0].verdict == packets[0].verdict
    assert diagnose.facts_needed(packets, Evidence()) == {}


def test_vectorised_capture_marks_the_same_packet_partial():
    arr, meta = _flow_left_node_1(VIEW)
    meta = {**meta, "kind": "capture"}
    pk, _ = analysis.reconstruct_vectorised(record.to_frame(arr), meta)
    row = pk.iloc[0]
    assert (row["status"], row["verdict_node"], row["verdict_dev"]) == ("partial", "node-1", "eth0")
    assert row["hint"].startswith("No view beyond node-1: the packet left towards 172.30.0.12 (node-2")
    np.testing.assert_array_equal(pk["status"].astype(str).to_numpy(), ["partial"])


def test_the_api_fetch_adds_the_owner_node_of_a_bare_ip(tmp_path):
    from tests.fakeapi import FakeApi
    from tracer.cluster import api as kube, fetch

    with FakeApi.from_lab("pttestow") as fake:
        conn = kube.connect(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            inv, _ = fetch.inventory_for(conn, ["pod-1-1", GONE])
            assert inv.nodes["node-2"].cidrs() == ["10.244.2.0/24"]
            ep = endpoints.resolve(GONE, inv)
            assert ep.pod is None and ep.owner.name == "node-2"
            inv, _ = fetch.inventory_for(conn, ["192.0.2.1"])
            assert endpoints.resolve("192.0.2.1", inv).owner is None
        finally:
            conn.close()


def test_an_agent_failure_reads_as_a_reason():
    assert beyond.agent_failed("the agent stopped before the end (exit 9)") == \
        "its agent stopped before the end (exit 9)"
    assert beyond.agent_failed("boom") == "its agent failed: boom"
