"""Routing loops found in hand-built hops, and probes' ICMP errors named by type and code."""

import socket
import struct
from dataclasses import replace

from tests.unit.test_diagnose import bind, cause, facts, judged, packet
from tracer.node import icmperr
from tracer.node.prober import ProbeResult
from tracer.reconstruct import diagnose, loops
from tracer.reconstruct.model import Encap, Hop

SRC, DST = "10.244.1.2", "10.244.99.5"
N1, N2, FAB = 101, 202, 303
OUT12 = Encap("172.30.0.11", "172.30.0.12", 1, "vxlan")
OUT21 = Encap("172.30.0.12", "172.30.0.11", 1, "vxlan")


def h(node, dev, point, netns, pod=None, encap=None):
    return Hop(node=node, pod=pod, dev=dev, point=point, src=SRC, dst=DST, netns=netns, len=84, encap=encap)


def start():
    return [h("node-1", "eth0", "tx", 11, pod="default/pod-1-1"), h("node-1", "veth1", "rx", N1),
            h("node-1", "cni0", "rx", N1)]


def round_trip():
    """One round: node-1 → fabric → node-2 → fabric → node-1 over the overlay."""
    return [h("node-1", "flannel.1", "tx", N1), h("node-1", "eth0", "tx", N1, encap=OUT12),
            h(None, "n1", "rx", FAB, encap=OUT12), h(None, "n2", "tx", FAB, encap=OUT12),
            h("node-2", "eth0", "rx", N2, encap=OUT12), h("node-2", "flannel.1", "rx", N2),
            h("node-2", "flannel.1", "tx", N2), h("node-2", "eth0", "tx", N2, encap=OUT21),
            h(None, "n2", "rx", FAB, encap=OUT21), h(None, "n1", "tx", FAB, encap=OUT21),
            h("node-1", "eth0", "rx", N1, encap=OUT21), h("node-1", "flannel.1", "rx", N1)]


def looping(rounds=32, only_node1=False):
    hops = start()
    for _ in range(rounds):
        hops += [x for x in round_trip() if not only_node1 or x.node == "node-1"]
    return hops


def route(gw):
    return {"dst": DST, "gateway": gw, "dev": "flannel.1"}


def test_a_path_without_repeats_is_no_loop():
    assert loops.find_loop(start() + round_trip()[:6]) is None
    # twice through one place (a hairpin, a retransmission merged) is not yet a loop
    assert loops.find_loop(start() + round_trip() + round_trip()) is None


def test_loop_found_with_its_nodes_and_rounds():
    loop = loops.find_loop(looping(32))
    assert loop["rounds"] == 32 and loop["nodes"] == ["node-1", "node-2"]
    assert [x.dev for x in loop["cycle"]][:2] == ["flannel.1", "eth0"]
    assert loop["left_to"] is None


def test_loop_seen_from_one_node_names_where_it_left_to():
    loop = loops.find_loop(looping(10, only_node1=True))
    assert loop["nodes"] == ["node-1"] and loop["left_to"] == "172.30.0.12"


def test_routing_loop_cause_names_both_nodes_and_routes():
    hops = looping(31)
    p = packet(status="dropped", node="node-2", dev="flannel.1", reason="IP_INHDR", hops=hops)
    per_node = {"node-1": facts(route=route("10.244.2.0")), "node-2": facts(route=route("10.244.1.0"))}
    e = bind(p, (facts(), {}))
    e.answers["node-1"][0]["facts"] = per_node["node-1"]
    e.answers["node-2"][0]["facts"] = per_node["node-2"]
    v = diagnose.explain(p, e)
    assert v.cause == "routing-loop" and v.status == "dropped" and v.reason == "IP_INHDR"
    assert v.runbook == "docs/runbooks/routing-loop.md"
    assert "looped between node-1 and node-2" in v.hint and "31 times" in v.hint
    assert "node-1 routes 10.244.99.5 via 10.244.2.0 dev flannel.1" in v.hint
    assert "node-2 routes it back via 10.244.1.0 dev flannel.1" in v.hint
    assert v.evidence["loop"]["nodes"] == ["node-1", "node-2"]
    assert set(diagnose.facts_needed([p], e)) == {"node-1", "node-2"}


def test_lost_loop_is_named_too_and_asks_only_loop_nodes():
    p = packet(status="lost", node="node-1", dev="eth0", hops=looping(8, only_node1=True))
    assert cause(p, (facts(route=route("10.244.2.0")), {})) == "routing-loop"
    assert "untraced node at 172.30.0.12" in judged().hint
    assert judged().status == "lost"


def test_delivered_packet_is_never_a_loop():
    p = packet(status="delivered", node="node-1", dev="eth0", hops=looping(5))
    assert loops.loop_nodes(p) == []
    assert diagnose.explain(p, bind(p, (facts(), {}))).cause is None


# --- ICMP errors by type ---------------------------------------------------------------


def test_icmp_names():
    assert icmperr.describe(3, 13, "10.244.2.0") == "administratively prohibited (ICMP 3/13) from 10.244.2.0"
    assert icmperr.describe(3, 9, None).startswith("administratively prohibited (ICMP 3/9)")
    assert icmperr.describe(3, 10, None).startswith("administratively prohibited (ICMP 3/10)")
    assert icmperr.describe(11, 0, "10.244.2.0") == "time exceeded (ICMP 11/0) from 10.244.2.0"
    assert icmperr.describe(3, 4, "172.30.0.1", 1400) == "fragmentation needed (ICMP 3/4, MTU 1400) from 172.30.0.1"
    assert icmperr.describe(3, 3, "10.244.2.2").startswith("port unreachable")
    assert icmperr.describe(3, 1, None).startswith("host unreachable")
    assert icmperr.describe(3, 0, None).startswith("network unreachable")
    assert icmperr.name(3, 99) == "destination unreachable" and icmperr.name(42, 0) == "ICMP type 42"


def _ip(src="10.244.2.0"):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 56, 0, 0, 64, 1, 0, socket.inet_aton(src),
                       socket.inet_aton(SRC))


def test_icmp_from_raw_packet_reads_the_mtu():
    data = _ip() + struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + b"\0" * 28
    assert icmperr.from_icmp(data, 20, "10.244.2.0") == "fragmentation needed (ICMP 3/4, MTU 1400) from 10.244.2.0"
    data = _ip() + struct.pack("!BBHHH", 11, 0, 0, 0, 0) + b"\0" * 28
    assert icmperr.from_icmp(data, 20, "10.244.2.0").startswith("time exceeded (ICMP 11/0)")


def _ee(origin, typ, code, info, sender):
    sa = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(sender))
    return struct.pack("=IBBBBII", 113, origin, typ, code, 0, info, 0) + sa


def test_error_queue_message_parsed():
    assert icmperr.parse_ee(_ee(2, 3, 13, 0, "10.244.2.0")) == (3, 13, 0, "10.244.2.0")
    assert icmperr.parse_ee(_ee(2, 3, 4, 1400, "172.30.0.1")) == (3, 4, 1400, "172.30.0.1")
    assert icmperr.parse_ee(_ee(1, 0, 0, 1450, "0.0.0.0")) is None      # a local error
    assert icmperr.parse_ee(b"\0" * 4) is None


def test_error_queue_of_a_real_socket_is_empty():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        icmperr.enable(s)
        assert icmperr.read_queue(s) is None
    finally:
        s.close()


def test_problem_line_names_the_icmp_error():
    from tracer.reconstruct import verdict
    from tracer.reconstruct.packets import FlowInput, Placement
    from tracer.cluster.inventory import Endpoint

    pr = ProbeResult(1, "udp", SRC, "10.244.2.2", 40000, 8080, 1, "refused", "10.244.2.0", 10,
                     "administratively prohibited (ICMP 3/13) from 10.244.2.0")
    fi = FlowInput(Endpoint("a", SRC), Endpoint("b", "10.244.2.2"), "udp", 8080, [pr], Placement(), {}, lambda a: None)
    fv, probes = verdict.flow_verdict([], fi, True)
    assert "probe 1: administratively prohibited (ICMP 3/13) from 10.244.2.0" in fv.problems
    assert probes[0].outcome == "refused"
    rst = ProbeResult(1, "tcp", SRC, "10.244.2.2", 40000, 8080, 1, "refused", "10.244.2.2", 10,
                      "connection refused (RST)")
    fi.probes = [rst]
    fv, _ = verdict.flow_verdict([], fi, True)
    assert "probe 1: refused (connection refused (RST))" in fv.problems


def test_an_address_nobody_owns_is_traced_on_every_node(inv):
    from tests.unit.test_plan import _plan
    from tracer.runs import plan as planner

    reqs = planner.agent_requests(_plan(inv, "pod-1-1", DST))
    assert [r.node for r in reqs] == list(inv.nodes) and len(reqs) > 1
    assert [r.node for r in reqs if r.probe] == ["node-1"]
    owned = planner.agent_requests(_plan(inv, "pod-1-1", "pod-1-2"))
    assert [r.node for r in owned] == ["node-1"]


def _with_ttl(hops, start_ttl=64):
    """The hops with the TTL a router loop gives: one less after every forwarding node."""
    out, ttl, prev_node = [], start_ttl, None
    for x in hops:
        if x.node is not None and x.pod is None and x.point == "tx" and x.dev == "flannel.1":
            ttl -= 1
        out.append(replace(x, ttl=ttl))
        prev_node = x.node
    assert prev_node is not None
    return out


def test_ttl_falling_at_each_round_is_a_loop():
    loop = loops.find_loop(_with_ttl(looping(20)))
    assert loop is not None and loop["rounds"] == 20


def test_equal_datagrams_grouped_together_are_no_loop():
    """Datagrams of one content (IP ID 0, same length) fall into one group: they pass each
    place with the same TTL, so they are not one packet going round."""
    same = [replace(x, ttl=64) for x in start() + round_trip()[:6]] * 5
    assert loops.find_loop(same) is None
