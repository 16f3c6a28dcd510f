"""Causes that facts prove: link state, both overlay ports, native nftables rules, the chain a
netfilter drop met, and what was checked when no cause fits (hand-built hops and facts)."""

from dataclasses import replace

from tests.unit.test_diagnose import facts, hop, packet
from tracer.node import linkfacts, nftfacts
from tracer.reconstruct import diagnose
from tracer.reconstruct.evidence import Evidence, fact_query
from tracer.reconstruct.model import Encap

ENC = Encap("172.30.0.11", "172.30.0.12", 1, "vxlan")


def evidence(p, per_node: dict, **kw) -> Evidence:
    """Evidence whose node N answers per_node[N] for packet p."""
    return Evidence(answers={n: [{"query": fact_query(n, p), "facts": f}] for n, f in per_node.items()}, **kw)


def encap_packet(reason="NO_SOCKET", status="dropped"):
    hops = [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-1", "flannel.1", "tx"),
            replace(hop("node-1", "eth0", "tx"), encap=ENC), replace(hop("node-2", "eth0", "rx"), encap=ENC)]
    return packet(status, "node-2", "eth0", reason, hops)


def vx(port):
    return {"flannel.1": {"mtu": 1450, "kind": "vxlan", "vxlan_port": port, "admin_up": True, "carrier": True}}


# ---- overlay port: named only when both ends were read and differ ---------------------

def test_overlay_port_named_when_both_ports_read_and_differ():
    p = encap_packet()
    e = evidence(p, {"node-2": facts(links=vx(4789)), "node-1": facts(links=vx(8472))})
    assert diagnose.facts_needed([p], Evidence()).keys() == {"node-2", "node-1"}
    v = diagnose.explain(p, e)
    assert v.cause == "overlay-port"
    assert "8472" in v.hint and "4789" in v.hint
    ports = v.evidence["overlay_ports"]
    assert ports["sender"]["port"] == 8472 and ports["receiver"]["ports"] == {"flannel.1": 4789}


def test_overlay_port_not_named_without_the_senders_port():
    p = encap_packet()
    v = diagnose.explain(p, evidence(p, {"node-2": facts(links=vx(4789))}))
    assert v.cause != "overlay-port"
    assert v.evidence["overlay_ports"]["compared"] is False
    assert v.reason == "NO_SOCKET" and v.node == "node-2"


def test_overlay_port_not_named_when_ports_agree():
    p = encap_packet()
    e = evidence(p, {"node-2": facts(links=vx(8472)), "node-1": facts(links=vx(8472))})
    v = diagnose.explain(p, e)
    assert v.cause != "overlay-port" and v.evidence["overlay_ports"]["compared"] is True


# ---- link state -------------------------------------------------------------------------

def _to_pod_facts(**over):
    f = facts(route={"dst": "10.244.2.2", "dev": "cni0"},
              links={"cni0": {"mtu": 1450, "kind": "bridge", "admin_up": True, "carrier": True},
                     "flannel.1": {"mtu": 1450, "kind": "vxlan", "admin_up": True, "carrier": True}},
              next_hop={"ip": "10.244.2.2", "dev": "cni0",
                        "neigh": {"ip": "10.244.2.2", "lladdr": None, "state": ["INCOMPLETE"]}})
    f.update(over)
    return f


def _lost_at_node2():
    return packet("lost", "node-2", "flannel.1", None,
                  [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "flannel.1", "rx")])


def test_link_down_names_the_bridge_port_to_the_next_hop():
    p = _lost_at_node2()
    down = [{"dev": "veth9", "master": "cni0", "admin_up": False, "carrier": False, "operstate": "DOWN",
             "peer_netns": "cni-1", "peer_addrs": ["10.244.2.2"]}]
    v = diagnose.explain(p, evidence(p, {"node-2": _to_pod_facts(down_links=down)}))
    assert v.cause == "link-down" and "veth9" in v.hint and "admin down" in v.hint
    assert v.runbook == "docs/runbooks/link-down.md"
    assert v.evidence["links"]["flannel.1"]["carrier"] is True


def test_a_down_port_to_another_pod_is_not_the_cause():
    p = _lost_at_node2()
    down = [{"dev": "veth7", "master": "cni0", "admin_up": False, "carrier": False, "operstate": "DOWN",
             "peer_netns": "cni-2", "peer_addrs": ["10.244.2.3"]}]
    v = diagnose.explain(p, evidence(p, {"node-2": _to_pod_facts(down_links=down)}))
    assert v.cause == "neighbour-missing"


def test_link_down_names_a_routed_pod_link_whose_routes_went_with_it():
    # a routed datapath (per-endpoint routes): the route left with the link, the lookup fails
    p = packet("dropped", "node-2", "cilium_vxlan", "IP_INNOROUTES",
               [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "cilium_vxlan", "rx")])
    down = [{"dev": "lxc1", "master": None, "admin_up": False, "carrier": False, "operstate": "DOWN",
             "peer_netns": "cni-1", "peer_addrs": ["10.244.2.2"]}]
    f = facts(route={"dst": "10.244.2.2", "error": "RTNETLINK answers: Network is unreachable"},
              next_hop=None, down_links=down)
    v = diagnose.explain(p, evidence(p, {"node-2": f}))
    assert v.cause == "link-down" and "lxc1 (admin down" in v.hint and "routes through it" in v.hint


def test_link_down_on_the_path_device():
    p = _lost_at_node2()
    f = _to_pod_facts()
    f["links"]["flannel.1"] = {**f["links"]["flannel.1"], "carrier": False, "operstate": "LOWERLAYERDOWN"}
    v = diagnose.explain(p, evidence(p, {"node-2": f}))
    assert v.cause == "link-down" and "flannel.1" in v.hint and "no carrier" in v.hint


def test_link_down_not_blamed_for_a_netfilter_drop():
    p = packet("dropped", "node-2", "flannel.1", "NETFILTER_DROP",
               [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "flannel.1", "rx")])
    f = _to_pod_facts()
    f["links"]["cni0"] = {**f["links"]["cni0"], "admin_up": False}
    v = diagnose.explain(p, evidence(p, {"node-2": f}))
    assert v.cause is None and v.reason == "NETFILTER_DROP"


def test_link_state_from_ip_link():
    s = linkfacts.state({"ifname": "veth9", "flags": ["BROADCAST", "MULTICAST"], "operstate": "DOWN",
                         "master": "cni0", "link_netnsid": 1})
    assert s["admin_up"] is False and s["carrier"] is False and s["master"] == "cni0" and s["peer_netnsid"] == 1
    s = linkfacts.state({"ifname": "flannel.1", "flags": ["UP", "LOWER_UP"], "operstate": "UNKNOWN",
                         "linkinfo": {"info_kind": "vxlan", "info_data": {"port": 8472,
                                                                          "port_range": {"low": 0, "high": 0}}}})
    assert s["admin_up"] and s["carrier"] and s["vxlan_port"] == 8472
    assert linkfacts.usable(s) and not linkfacts.usable({"admin_up": True, "carrier": False})
    assert "no carrier" in linkfacts.why_down("v", {"admin_up": True, "carrier": False})


# ---- native nftables ----------------------------------------------------------------

RULESET = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "hook": "forward"}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 4,
              "expr": [{"counter": {"packets": 9, "bytes": 1}}, {"drop": None}]}},
    {"table": {"family": "inet", "name": "ptfault", "handle": 5}},
    {"chain": {"family": "inet", "table": "ptfault", "name": "ptfwd", "handle": 1, "hook": "forward",
               "prio": -5, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "ptfault", "chain": "ptfwd", "handle": 2, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.244.2.2"}},
        {"counter": {"packets": 3, "bytes": 252}}, {"drop": None}]}},
    {"rule": {"family": "inet", "table": "ptfault", "chain": "ptfwd", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}},
        {"drop": None}]}},
]}


def test_native_rules_skip_iptables_nft_tables():
    rules = nftfacts.rules(RULESET)
    assert {(r["family"], r["table"]) for r in rules} == {("inet", "ptfault")}
    first = rules[0]
    assert first["rule"] == "ip daddr 10.244.2.2 counter drop" and first["packets"] == 3
    assert first["hook"] == "forward" and first["addrs"] == {"daddr": ["10.244.2.2"]}
    assert rules[1]["packets"] is None and rules[1]["rule"] == "ip saddr 10.244.1.0/24 drop"


def test_native_counter_that_moved_is_a_hit_named_by_table_and_chain():
    after = nftfacts.rules(RULESET)
    before = [{**r, "packets": 0 if r["packets"] is not None else None} for r in after]
    hits = nftfacts.hits(before, after)
    assert len(hits) == 1 and hits[0]["packets"] == 3 and hits[0]["table"] == "inet ptfault"
    p = packet("dropped", "node-2", "flannel.1", "NETFILTER_DROP",
               [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "flannel.1", "rx")])
    e = Evidence(answers={"node-2": [{"query": fact_query("node-2", p), "facts": facts()}]},
                 rule_hits={"node-2": hits})
    v = diagnose.explain(p, e)
    assert v.cause == "netfilter-rule"
    assert "table inet ptfault chain ptfwd (hook forward) rule `ip daddr 10.244.2.2 counter drop`" in v.hint


def test_uncounted_native_drop_rule_named_as_likely():
    uncounted = nftfacts.uncounted_drops(nftfacts.rules(RULESET))
    assert [r["index"] for r in uncounted] == [3]
    p = packet("dropped", "node-2", "flannel.1", "NETFILTER_DROP",
               [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "flannel.1", "rx")])
    v = diagnose.explain(p, evidence(p, {"node-2": facts(nft_drop_rules=uncounted)}))
    assert v.cause == "netfilter-rule" and "likely" in v.hint and "not counted" in v.hint
    assert v.evidence["netfilter"][0]["counted"] is False
    # a rule that names other addresses is not this packet's
    other = [{**uncounted[0], "addrs": {"saddr": ["10.9.0.0/16"]}}]
    v = diagnose.explain(p, evidence(p, {"node-2": facts(nft_drop_rules=other)}))
    assert v.cause is None


def test_nft_matches_prefix_and_set():
    rule = {"addrs": {"daddr": ["10.0.0.0/8", "192.168.1.1"]}}
    assert nftfacts.matches(rule, ["10.244.2.2"]) and nftfacts.matches(rule, ["192.168.1.1"])
    assert not nftfacts.matches(rule, ["172.30.0.12", None])


# ---- which chain a netfilter drop met -----------------------------------------------------

def test_encapsulated_drop_says_input_not_forward():
    last = replace(hop("node-2", "eth0", "rx"), encap=ENC)
    v = diagnose.dropped("node-2", "eth0", "NETFILTER_DROP", "nft_do_chain+0x46f", last)
    assert "INPUT" in v.hint and "FORWARD chain" not in v.hint
    v = diagnose.dropped("node-2", "flannel.1", "NETFILTER_DROP", None, hop("node-2", "flannel.1", "rx"))
    assert "FORWARD chain" in v.hint
    v = diagnose.dropped("node-2", "eth0", "NETFILTER_DROP", None)
    assert "FORWARD" in v.hint and "INPUT" in v.hint


def test_no_cause_keeps_reason_and_lists_what_was_checked():
    p = encap_packet("NETFILTER_DROP")
    v = diagnose.explain(p, evidence(p, {"node-2": facts()}))
    assert v.cause is None and v.reason == "NETFILTER_DROP" and v.node == "node-2"
    assert "INPUT" in v.hint and "FORWARD chain" not in v.hint
    assert "checked on node-2: ip_forward on, rp_filter 0" in v.hint and "FDB ok" in v.hint
    assert "conntrack 10/1000: all normal" in v.hint and "\n" not in v.hint


def test_capture_path_says_input_for_an_encapsulated_drop():
    import numpy as np
    import pandas as pd

    from tracer.analysis import vectorised

    packets = pd.DataFrame({"status": ["dropped", "dropped"], "verdict_node": ["node-2", "node-2"],
                            "verdict_dev": ["eth0", "flannel.1"], "last_point": ["rx", "rx"],
                            "reason": ["NETFILTER_DROP", "NETFILTER_DROP"], "location": [None, None]})
    vectorised._verdict_text(packets, np.array([True, False]))
    assert "INPUT (not FORWARD)" in packets["hint"][0]
    assert "FORWARD chain" in packets["hint"][1]


def test_link_down_when_the_bridge_flooded_the_frame_to_another_pod():
    # a warm neighbour entry: the frame goes out, the bridge floods it, another pod drops it
    p = packet("dropped", "node-2", "eth0", "OTHERHOST",
               [hop("node-1", "eth0", "tx", pod="default/pod-1-1"), hop("node-2", "flannel.1", "rx")])
    down = [{"dev": "veth9", "master": "cni0", "admin_up": False, "carrier": False, "operstate": "DOWN",
             "peer_netns": "cni-1", "peer_addrs": ["10.244.2.2"]}]
    f = _to_pod_facts(down_links=down)
    f["next_hop"]["neigh"] = {"ip": "10.244.2.2", "lladdr": "0a:58:0a:f4:02:02", "state": ["REACHABLE"]}
    v = diagnose.explain(p, evidence(p, {"node-2": f}))
    assert v.cause == "link-down" and "veth9" in v.hint
