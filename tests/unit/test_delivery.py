"""Drops after arrival, on hand-built events: a packet that reached the destination pod's eth0
and was then freed with a drop reason in that pod is `dropped` there, with the cause the
facts prove; socket housekeeping, an echo reply no ping socket wanted and a flooded copy's
OTHERHOST in another pod stay no drop. The per-packet path, the vectorised path and the
capture's drop count agree."""

from __future__ import annotations

import numpy as np

from bench.analysis import BACKEND, PODS, VIP, _records, synth_flow
from tests.unit.test_engine import equal_paths, judged, svc_flow
from tracer import analysis
from tracer.kernel import record
from tracer.reconstruct import arrival, diagnose, drops
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence, fact_query
from tracer.reconstruct.packets import build_packets

A, B, C = "default/pod-1-1", "default/pod-2-1", "default/pod-2-2"
REASONS = {6: "NETFILTER_DROP", 2: "NO_SOCKET", 30: "OTHERHOST", 40: "QUEUE_PURGE", 41: "TCP_CSUM"}
CODE = {v: k for k, v in REASONS.items()}
POD_MAC, WRONG_MAC = "0a:58:0a:f4:02:02", "0e:00:00:00:ee:03"


def _event(t, skb, pod, hook, src, sport, dst, dport, seq, ip_id, reason=0, dev="eth0"):
    a = _records([(t, skb, PODS[pod][0], dev, hook, False, PODS[src][2] if src in PODS else src, sport,
                   PODS[dst][2] if dst in PODS else dst, dport, seq, ip_id, reason)])
    a["tcp_flags"], a["ip_len"] = 0x02, 60
    return a


def _flow(*extra, reply: bool = False):
    """One TCP SYN pod-1-1 → pod-2-1 that reaches pod-2-1's eth0; no reply unless asked;
    `extra`: (pod, hook, reason, skb offset, dev) events after its arrival."""
    arr, meta = synth_flow(probes=1)
    meta["drop_reasons"] = {str(k): v for k, v in REASONS.items()}
    if not reply:
        arr = arr[arr["ip_id"] != 0]
        meta["probes"][0].update(outcome="timeout", reply_from=None, rtt_ns=None)
    last = arr[arr["ip_id"] != 0][-1]
    more = [arr]
    for k, (pod, hook, reason, skb_off, dev) in enumerate(extra):
        t = int(last["ts_ns"]) + 1000 * (k + 1)
        if hook != 3 and hook != 4:     # a hop (a flooded copy's arrival elsewhere)
            more.append(_event(t, int(last["skb"]) + skb_off, pod, hook, A, 40000, B, 8080,
                               int(last["tcp_seq"]), int(last["ip_id"]), dev=dev))
        else:
            more.append(_event(t, int(last["skb"]) + skb_off, pod, hook, A, 40000, B, 8080,
                               int(last["tcp_seq"]), int(last["ip_id"]), reason, dev=dev))
    arr = np.concatenate(more)
    return arr[np.argsort(arr["ts_ns"], kind="stable")], meta


def _request(arr, meta, ev=None):
    packets, fi = judged(arr, meta, ev)
    return next(p for p in packets if p.direction == "request"), packets, fi


def test_netfilter_drop_inside_the_pod_is_dropped_there_with_the_pods_rule():
    arr, meta = _flow((B, 3, CODE["NETFILTER_DROP"], 0, "eth0"))
    p, packets, fi = _request(arr, meta)
    v = p.verdict
    assert (v.status, v.node, v.dev, v.point, v.reason) == ("dropped", "node-2", "eth0", "drop", "NETFILTER_DROP")
    assert v.evidence == {"after_arrival": True, "pod": B} and v.cause is None      # no counter: no cause
    assert v.hint.startswith(f"Dropped inside pod {B} after arriving on its eth0: ")
    assert p.one_way_ns is None
    equal_paths(record.to_frame(arr), meta)
    fast = analysis.analyse(record.to_frame(arr), dict(meta), mode="capture").packets
    assert fast["hint"].iloc[0] == v.hint and fast["runbook"].iloc[0] == v.runbook
    hit = {"table": "filter", "chain": "INPUT", "base_chain": "INPUT", "index": 1, "packets": 1,
           "rule": f"-A INPUT -s {PODS[A][2]}/32 -j DROP", "target": "DROP", "comment": None}
    p, packets, fi = _request(arr, meta, Evidence(rule_hits={B: [hit]}))
    v = p.verdict
    assert v.cause == "netfilter-rule" and v.evidence["after_arrival"] is True and v.evidence["netfilter"] == [hit]
    assert f"pod {B}" in v.hint and hit["rule"] in v.hint and "INPUT" in v.hint
    assert v.runbook == "docs/runbooks/netfilter-drop.md"
    verdict, _ = verdicts.flow_verdict(packets, fi, True)
    assert verdict.problems[0] == "probe 1: request dropped in pod-2-1 (eth0, NETFILTER_DROP): netfilter-rule"
    # a rule counted on the node (not in the pod) is no cause of a drop inside the pod
    p, _, _ = _request(arr, meta, Evidence(rule_hits={"node-2": [hit]}))
    assert p.verdict.cause is None


def test_otherhost_is_wrong_mac_when_the_neighbour_entry_and_the_pods_mac_differ():
    arr, meta = _flow((B, 3, CODE["OTHERHOST"], 0, "eth0"))
    built = build_packets(record.to_frame(arr), analysis._flow_input(meta))
    p = built[0]
    assert p.verdict.status == "dropped" and p.verdict.reason == "OTHERHOST"
    need = diagnose.facts_needed(built, Evidence())
    q = fact_query("node-2", p)
    assert need == {"node-2": [q]} and q["pod_netns"] == PODS[B][0] and q["pod_dev"] == "eth0"

    def facts(neigh_mac):
        return {"next_hop": {"ip": PODS[B][2], "dev": "cni0",
                             "neigh": {"ip": PODS[B][2], "dev": "cni0", "lladdr": neigh_mac, "state": ["PERMANENT"]}},
                "pod": {"netns": PODS[B][0], "dev": "eth0", "mac": POD_MAC}}
    v = diagnose.judge(built, Evidence(answers={"node-2": [{"query": q, "facts": facts(WRONG_MAC)}]}))[0].verdict
    assert v.cause == "wrong-mac" and v.runbook == "docs/runbooks/wrong-mac.md"
    assert WRONG_MAC in v.hint and POD_MAC in v.hint and v.evidence["mac"]["neighbour"] == WRONG_MAC
    # the entry is right (the frame was addressed elsewhere for another reason): no cause
    v = diagnose.judge(built, Evidence(answers={"node-2": [{"query": q, "facts": facts(POD_MAC)}]}))[0].verdict
    assert v.cause is None and v.reason == "OTHERHOST"
    # without the facts: the reason stays, no cause
    v = diagnose.judge(built, Evidence())[0].verdict
    assert v.cause is None and v.reason == "OTHERHOST" and v.status == "dropped"
    equal_paths(record.to_frame(arr), meta)


def test_no_socket_and_bad_checksum_after_arrival():
    p, _, _ = _request(*_flow((B, 3, CODE["NO_SOCKET"], 0, "eth0")))
    assert (p.verdict.status, p.verdict.cause, p.verdict.runbook) == ("dropped", "no-socket", "docs/runbooks/no-socket.md")
    assert "TCP/8080" in p.verdict.hint
    p, _, _ = _request(*_flow((B, 3, CODE["TCP_CSUM"], 0, "eth0")))
    assert (p.verdict.status, p.verdict.cause) == ("dropped", "bad-checksum")


def test_delivered_when_consumed_or_freed_by_socket_housekeeping():
    for extra in [(B, 4, 0, 0, "eth0"), (B, 3, CODE["QUEUE_PURGE"], 0, "eth0")]:
        arr, meta = _flow(extra, reply=True)
        p, packets, fi = _request(arr, meta)
        assert p.verdict.status == "delivered" and p.verdict.evidence is None, extra
        assert verdicts.flow_verdict(packets, fi, True)[0].status == "ok"
        equal_paths(record.to_frame(arr), meta)


def test_a_flooded_copy_elsewhere_is_not_the_verdict():
    # the copy meant for pod-2-1 is consumed there; a copy flooded into pod-2-2 dies OTHERHOST
    arr, meta = _flow((B, 4, 0, 0, "eth0"), (C, 1, 0, 64, "eth0"), (C, 3, CODE["OTHERHOST"], 64, "eth0"),
                      reply=True)
    p, _, _ = _request(arr, meta)
    assert p.verdict.status == "delivered" and p.verdict.node == "node-2"
    equal_paths(record.to_frame(arr), meta)
    # both copies die OTHERHOST: the verdict is the one in the destination pod
    arr, meta = _flow((C, 1, 0, 64, "eth0"), (C, 3, CODE["OTHERHOST"], 64, "eth0"), (B, 3, CODE["OTHERHOST"], 0, "eth0"))
    p, _, _ = _request(arr, meta)
    assert (p.verdict.status, p.verdict.reason, p.verdict.evidence["pod"]) == ("dropped", "OTHERHOST", B)
    equal_paths(record.to_frame(arr), meta)


def test_echo_reply_no_socket_in_the_client_is_delivered():
    arr, meta = synth_flow(probes=1)
    meta["drop_reasons"] = {str(k): v for k, v in REASONS.items()}
    req = arr["ip_id"] != 0
    arr["proto"] = 1
    arr["icmp_type"] = np.where(req, 8, 0)
    arr["sport"], arr["dport"], arr["tcp_flags"], arr["tcp_seq"] = 777, 1, 0, 0
    last = arr[~req][-1]
    free = _records([(int(last["ts_ns"]) + 1000, int(last["skb"]), PODS[A][0], "eth0", 3, False,
                      PODS[B][2], 777, PODS[A][2], 1, 0, 0, CODE["NO_SOCKET"])])
    free["proto"], free["icmp_type"], free["tcp_flags"], free["ip_len"] = 1, 0, 0, arr["ip_len"][-1]
    arr = np.concatenate([arr, free])
    meta.update(proto="icmp", port=None)
    meta["probes"][0].update(proto="icmp", sport=777, dport=1)
    packets, fi = judged(arr, meta)
    assert [(p.direction, p.verdict.status) for p in packets] == [("request", "delivered"), ("reply", "delivered")]
    equal_paths(record.to_frame(arr), meta)


def test_unreversed_reply_freed_no_socket_keeps_its_cause():
    arr, meta = svc_flow(reverse_nat=False)
    meta["drop_reasons"] = {str(k): v for k, v in REASONS.items()}
    last = arr[arr["ip_id"] == 0][-1]
    free = _records([(int(last["ts_ns"]) + 1000, int(last["skb"]), PODS[A][0], "eth0", 3, False,
                      PODS[BACKEND][2], 8080, PODS[A][2], 40000, 9000, 0, CODE["NO_SOCKET"])])
    free["tcp_flags"], free["ip_len"] = 0x12, arr["ip_len"][-1]
    arr = np.concatenate([arr, free])
    fi = analysis._flow_input(meta)
    built = build_packets(record.to_frame(arr), fi)
    assert built[1].verdict.status == "dropped" and built[1].verdict.reason == "NO_SOCKET"
    ev = Evidence(vip=VIP, service="default/web", backends=[PODS[BACKEND][2]])
    need = diagnose.facts_needed(built, ev)
    ev = ev.with_answers({"node-1": [{"query": need["node-1"][0], "facts": {"bridge_nf_call_iptables": 0}}]})
    rep = diagnose.judge(built, ev)[1].verdict
    assert rep.cause == "unreversed-reply" and "bridge-nf-call-iptables is 0" in rep.hint


def test_the_rule_counts_drops_after_arrival_live_and_offline():
    rule = arrival.Rule.of(REASONS, {1: 100, 2: 200}, pods=[100, 200, 300])
    reason = np.array([6, 40, 2, 2, 30, 30, 30])
    proto = np.array([6, 6, 1, 17, 6, 6, 6])
    icmp = np.array([0, 0, 0, 0, 0, 0, 0])
    netns = np.array([100, 100, 100, 100, 100, 300, 999])
    daddr = np.array([1, 1, 1, 1, 1, 1, 1])
    hook = np.full(7, 3)
    got = drops.counted(hook, reason, netns, daddr, proto, icmp, rule)
    # a netfilter drop at home counts; housekeeping no; an echo reply no socket wanted no; a
    # UDP datagram to no socket yes; OTHERHOST at home yes, in another pod no, on a node yes
    assert got.tolist() == [True, False, False, True, True, False, True]
