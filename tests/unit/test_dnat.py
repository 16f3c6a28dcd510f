"""DNAT the inventory does not know (a hostPort, a NodePort, a hand-written rule), on hand-built
hops and events with conntrack views: the request is delivered at the DNAT target, the
target's answers are the flow's replies, and an answer that reaches the client from the
target's own address is the un-reversed reply (bridge-nf-call-iptables=0 named when that is
why); the healthy path, reverse-NATed, is ok."""

from __future__ import annotations

import numpy as np
import pytest

from bench.analysis import FABRIC, IP, N1, N2, NODES, PODS, _records, synth_flow
from tests.unit.test_engine import equal_paths
from tracer import analysis
from tracer.kernel import record
from tracer.lab import scenarios as S
from tracer.lab import topology as T
from tracer.lab.scenarios import faults_dnat
from tracer.reconstruct import diagnose, dnat
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import Addr, ConntrackView, Hop
from tracer.reconstruct.packets import build_packets

CLIENT, TARGET, FAR = "default/pod-2-2", "default/pod-2-1", "default/pod-1-1"
NODE_IP, HOST_PORT, APP = NODES["node-2"][1], 30080, 8080
CT_NAMES = {0: "IP_CT_ESTABLISHED", 1: "IP_CT_RELATED", 2: "IP_CT_NEW", 3: "IP_CT_ESTABLISHED_REPLY"}
DNAT_STATUS = 0x8 | 0x20 | 0x100          # confirmed, dst_nat, dst_nat_done


def hop(node, dev, point, src, dst, pod=None, ct=None):
    return Hop(node=node, pod=pod, dev=dev, point=point, src=src, dst=dst, ct=ct)


def ct_view(client_ip, sport, nat="dnat", of=None, orig_dst=NODE_IP):
    return ConntrackView("new", "original", ("confirmed", "dst_nat"), nat, of,
                         Addr(client_ip, sport, orig_dst, HOST_PORT),
                         Addr(PODS[TARGET][2], APP, client_ip, sport))


# -- the targets, from one packet's hops -------------------------------------------------------

def test_targets_from_conntrack_and_from_the_changed_destination():
    cip = PODS[CLIENT][2]
    tip = PODS[TARGET][2]
    before = hop("node-2", "cni0", "rx", cip, NODE_IP)
    # conntrack's reply tuple names the target even where no later hop was seen
    assert dnat.of_hops([before, hop("node-2", "cni0", "rx", cip, NODE_IP, ct=ct_view(cip, 40000))], NODE_IP) == [tip]
    # the destination changing between hops says it without conntrack
    assert dnat.of_hops([before, hop("node-2", "cni0", "tx", cip, tip)], NODE_IP) == [tip]
    # the tunnel's own UDP flow, an SNAT, an entry of another destination: no DNAT of ours
    assert dnat.of_hops([before, hop("node-2", "eth0", "tx", cip, NODE_IP, ct=ct_view(cip, 1, of="outer"))], NODE_IP) == []
    assert dnat.of_hops([before, hop("node-2", "eth0", "tx", cip, NODE_IP, ct=ct_view(cip, 1, nat="snat"))], NODE_IP) == []
    assert dnat.of_hops([before, hop("node-2", "eth0", "tx", cip, NODE_IP,
                                     ct=ct_view(cip, 1, orig_dst="10.96.0.10"))], NODE_IP) == []
    assert dnat.of_hops([before, before], NODE_IP) == []


def test_learn_maps_targets_to_the_address_sent_to_and_leaves_services_alone():
    cip, tip = PODS[CLIENT][2], PODS[TARGET][2]
    packets = judged_flow(reversed_reply=False, facts_node2=None)[0]
    assert dnat.learn(Evidence(), packets).dnat == {tip: NODE_IP}
    svc = Evidence(vip="10.96.0.10", service="default/web", backends=[tip])
    assert dnat.learn(svc, packets) is svc
    # the evidence carries the DNATs through JSON (a saved trace judges the same)
    e = Evidence().with_dnat({tip: NODE_IP})
    assert Evidence.from_json(e.as_json()) == e and "dnat" not in Evidence().as_json()
    assert e.with_answers({}).dnat == {tip: NODE_IP}
    assert cip not in dnat.learn(Evidence(), packets).dnat


# -- whole flows from events -----------------------------------------------------------------

def _ct_cols(arr, rows, client_ip, sport):
    arr["ct_info"][rows] = 3                      # IP_CT_NEW + 1
    arr["ct_status"][rows] = DNAT_STATUS
    arr["ct_orig_src"][rows] = record.v4_field(IP(client_ip))
    arr["ct_orig_dst"][rows] = record.v4_field(IP(NODE_IP))
    arr["ct_orig_sport"][rows] = sport
    arr["ct_orig_dport"][rows] = HOST_PORT
    arr["ct_reply_src"][rows] = record.v4_field(IP(PODS[TARGET][2]))
    arr["ct_reply_dst"][rows] = record.v4_field(IP(client_ip))
    arr["ct_reply_sport"][rows] = APP
    arr["ct_reply_dport"][rows] = sport


def hostport_flow(client=CLIENT, reversed_reply=True, probes=2, reply=True, masquerade=False):
    """(records, meta) of `flow CLIENT <node-2 IP> --proto udp --port 30080` with node-2's
    hostPort DNAT to pod-2-1:8080 at cni0; the answers come back reverse-NATed to the node's
    address, or (reversed_reply=False) bridged straight back from the pod's own address. With
    masquerade, the DNAT comes with an SNAT to node-2's address (a NodePort's): the target
    answers to node-2, which reverses both."""
    cns, cnode, cip, cveth = PODS[client]
    tns, _, tip, tveth = PODS[TARGET]
    same = cnode == "node-2"
    if same:
        out = [(cns, "eth0", 2), (N2, cveth, 1), (N2, "cni0", 1)]
    else:
        out = [(cns, "eth0", 2), (N1, cveth, 1), (N1, "eth0", 2), (FABRIC, "n1", 1), (FABRIC, "n2", 2),
               (N2, "eth0", 1)]
    dnat_at = len(out)
    out += [(N2, "cni0", 2), (N2, tveth, 2), (tns, "eth0", 1)]
    if same:
        back = [(tns, "eth0", 2, False), (N2, tveth, 1, False), (N2, cveth, 2, False), (cns, "eth0", 1, False)]
        undnat_at = 2
    else:
        back = [(tns, "eth0", 2, False), (N2, tveth, 1, False), (N2, "cni0", 1, False), (N2, "flannel.1", 2, False),
                (N2, "eth0", 2, True), (FABRIC, "n2", 1, True), (FABRIC, "n1", 2, True), (N1, "eth0", 1, True),
                (N1, "flannel.1", 1, False), (N1, "cni0", 2, False), (N1, cveth, 2, False), (cns, "eth0", 1, False)]
        undnat_at = 3
    recs, ct_rows, sent = [], [], []
    for i in range(probes):
        sport, t0, skb = 40000 + i, 5_000_000_000 + i * 50_000_000, 0xFFFF888100000000 + i * 4096
        for j, (ns, dev, hook) in enumerate(out):
            dst, dport = (NODE_IP, HOST_PORT) if j < dnat_at else (tip, APP)
            src = NODE_IP if masquerade and j >= dnat_at else cip
            if j >= dnat_at:
                ct_rows.append(len(recs))
            recs.append((t0 + j * 5000, skb, ns, dev, hook, False, src, sport, dst, dport, 0, 100 + i, 0))
        if reply:
            for j, (ns, dev, hook, enc) in enumerate(back):
                src, port = (NODE_IP, HOST_PORT) if reversed_reply and j >= undnat_at else (tip, APP)
                to = NODE_IP if masquerade and not (reversed_reply and j >= undnat_at) else cip
                recs.append((t0 + 200_000 + j * 5000, skb + 1024, ns, dev, hook, enc, src, port, to, sport,
                             0, 9000 + i, 0))
        sent.append({"seq": i + 1, "proto": "udp", "src": cip, "dst": NODE_IP, "sport": sport, "dport": HOST_PORT,
                     "sent_ns": t0 - 1000, "outcome": "answered" if reply and reversed_reply else "timeout",
                     "reply_from": NODE_IP if reply and reversed_reply else None,
                     "rtt_ns": 400_000 if reply and reversed_reply else None, "detail": None})
    arr = _records(recs)
    arr["proto"] = 17
    arr["tcp_flags"] = 0
    _ct_cols(arr, np.array(ct_rows), cip, arr["sport"][ct_rows])
    _, meta = synth_flow(probes=1)
    meta.update(src={"spec": client, "ip": cip, "pod": client, "node": cnode, "service": None},
                dst={"spec": NODE_IP, "ip": NODE_IP, "pod": None, "node": "node-2", "service": None},
                proto="udp", port=HOST_PORT, probes=sent, ct_info_names={str(k): v for k, v in CT_NAMES.items()},
                addresses={**{ip: [node, key] for key, (_, node, ip, _) in PODS.items()},
                           **{ip: [n, None] for n, (_, ip, _) in NODES.items()}})
    return arr, meta


def judged_flow(client=CLIENT, reversed_reply=True, facts_node2=None, **kw):
    arr, meta = hostport_flow(client, reversed_reply, **kw)
    fi = analysis._flow_input(meta)
    packets = build_packets(record.to_frame(arr), fi)
    need = diagnose.facts_needed(packets, Evidence())
    answers = {n: [{"query": q, "facts": facts_node2} for q in qs] for n, qs in need.items()
               if facts_node2 is not None}
    return diagnose.judge(packets, Evidence().with_answers(answers)), fi, need


def test_same_node_unreversed_reply_names_bridge_nf():
    """The seed case: pod-2-2 → node-2:30080 (hostPort of pod-2-1), the answer bridged back
    to pod-2-2 from pod-2-1's own address without conntrack."""
    packets, fi, need = judged_flow(reversed_reply=False, facts_node2={"bridge_nf_call_iptables": 0})
    assert [(p.direction, p.seq) for p in packets] == [("request", 1), ("reply", 1), ("request", 2), ("reply", 2)]
    req, rep = packets[0], packets[1]
    # delivered at the DNAT target (pod-2-1's eth0), not at the node that owns the address
    assert (req.verdict.status, req.verdict.node, req.verdict.dev, req.hops[-1].pod) == \
        ("delivered", "node-2", "eth0", TARGET)
    assert req.one_way_ns == req.hops[-1].t_ns
    assert [n.type for n in req.nat] == ["dnat"] and req.nat[0].backend is None
    # the facts asked: the node where the reply was bridged
    assert list(need) == ["node-2"]
    v = rep.verdict
    assert (v.status, v.cause, v.problem, v.node) == ("delivered", "unreversed-reply", True, "node-2")
    assert "DNAT target 10.244.2.2" in v.hint and f"should be {NODE_IP}" in v.hint
    assert "bridge-nf-call-iptables is 0" in v.hint and v.runbook == "docs/runbooks/wrong-reply.md"
    assert v.evidence["node"] == {"bridge_nf_call_iptables": 0}
    verdict, probes = verdicts.flow_verdict(packets, fi, True)
    assert verdict.status == "failed" and verdict.summary == "2/2 delivered, 0/2 answered"
    assert all("un-reversed" in p for p in verdict.problems)


def test_unreversed_without_node_facts_says_conntrack_was_skipped():
    packets, _, _ = judged_flow(reversed_reply=False, facts_node2={"bridge_nf_call_iptables": 1})
    v = packets[1].verdict
    assert v.cause == "unreversed-reply" and "bridge-nf-call-iptables" not in v.hint
    assert "never passed conntrack on node-2" in v.hint


@pytest.mark.parametrize("client", [CLIENT, FAR])
def test_healthy_hostport_is_ok(client):
    """The same DNAT, answers reverse-NATed: delivered and answered (before: the node's own
    namespace was called the destination, the answers were not recognised as replies)."""
    packets, fi, need = judged_flow(client, reversed_reply=True)
    assert [p.direction for p in packets] == ["request", "reply"] * 2
    assert all(p.verdict.status == "delivered" and p.verdict.cause is None for p in packets)
    assert packets[0].hops[-1].pod == TARGET and packets[1].hops[-1].pod == client
    assert [n.type for n in packets[1].nat] == ["reverse-dnat"]
    assert need == {}
    verdict, _ = verdicts.flow_verdict(packets, fi, True)
    assert verdict.as_json() == {"status": "ok", "summary": "2/2 delivered, 2/2 answered", "problems": []}


def test_a_target_that_got_nothing_is_not_delivered():
    """The request stops after the DNAT: lost on node-2, not delivered at node-2's address."""
    arr, meta = hostport_flow(probes=1, reply=False)
    arr = arr[:-1]                                  # pod-2-1 never received it
    fi = analysis._flow_input(meta)
    (p,) = build_packets(record.to_frame(arr), fi)
    assert (p.verdict.status, p.verdict.node, p.verdict.dev) == ("lost", "node-2", PODS[TARGET][3])


def test_a_target_no_traced_pod_owns_is_not_delivered_in_a_pod_it_was_flooded_to():
    arr, meta = hostport_flow(probes=1, reply=False)
    meta["addresses"] = {k: v for k, v in meta["addresses"].items() if k != PODS[TARGET][2]}
    (p,) = build_packets(record.to_frame(arr), analysis._flow_input(meta))
    assert p.verdict.status == "lost"
    # a trace saved without the addresses: the one pod namespace that received it
    del meta["addresses"]
    (p,) = build_packets(record.to_frame(arr), analysis._flow_input(meta))
    assert p.verdict.status == "delivered" and p.hops[-1].pod == TARGET


@pytest.mark.parametrize("reversed_reply", [True, False])
def test_fast_path_agrees(reversed_reply):
    arr, meta = hostport_flow(reversed_reply=reversed_reply)
    equal_paths(record.to_frame(arr), meta)


def test_scenario_on_the_default_lab():
    lab = S.Lab.planned(T.LabConfig(prefix="ptlab", state_dir="/run/podtrace"))
    sc = S.get("hostport-unreversed")
    assert S.resolve_node(sc, lab, None) == "node-2"
    assert S.flow_command(sc, lab, "node-2") == "podtrace flow pod-2-2 172.30.0.12 --proto udp --port 30080"
    assert S.flow_command(sc, lab, "node-1") == "podtrace flow pod-1-2 172.30.0.11 --proto udp --port 30080"
    assert "cilium" in sc.not_on and "flannel" not in sc.not_on
    rules = faults_dnat.hostport_rules(lab, "node-2")
    assert [r.split(" -p ")[1].split()[0] for r in rules] == ["udp", "tcp"]
    assert all(f"-d 172.30.0.12/32" in r and f"--to-destination 10.244.2.2:{T.APP_PORT}" in r for r in rules)


@pytest.mark.parametrize("reversed_reply", [True, False])
def test_capture_tables_name_the_unreversed_reply(reversed_reply):
    """The fast path (captures) finds the same un-reversed answers, from the packets alone."""
    arr, meta = hostport_flow(reversed_reply=reversed_reply)
    t = analysis.analyse(record.to_frame(arr), dict(meta), mode="capture")
    back = t.packets[t.packets["src"].astype(str) == PODS[TARGET][2]]
    assert len(back) == 2 and (back["status"].astype(str) == "delivered").all()
    if reversed_reply:
        assert back["cause"].isna().all() and t.packets["cause"].isna().all()
    else:
        assert (back["cause"] == "unreversed-reply").all()
        assert all(f"should be {NODE_IP}" in h for h in back["hint"])
        assert t.packets["cause"].notna().sum() == 2


def test_nodeport_masquerade_answers_are_replies():
    """A NodePort-style DNAT with SNAT to the node: the target answers to node-2's address and
    node-2 reverses both; those answers are the flow's replies, delivered to the client."""
    arr, meta = hostport_flow(FAR, reversed_reply=True, masquerade=True)
    fi = analysis._flow_input(meta)
    packets = diagnose.judge(build_packets(record.to_frame(arr), fi), Evidence())
    assert [p.direction for p in packets] == ["request", "reply"] * 2
    assert all(p.verdict.status == "delivered" and p.verdict.cause is None for p in packets)
    assert packets[0].hops[-1].pod == TARGET and packets[1].hops[-1].pod == FAR
    assert packets[1].five_tuple.dst == NODE_IP and packets[1].hops[-1].dst == PODS[FAR][2]
    assert verdicts.flow_verdict(packets, fi, True)[0].status == "ok"
    equal_paths(record.to_frame(arr), meta)
