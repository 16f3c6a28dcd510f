"""The reconstruction and verdict engine on hand-built hop events (no kernel): delivered,
dropped, lost, wrong reply, Service DNAT, partial views; the per-packet path `flow` runs and
the vectorised path captures use give the same packets, hops and verdicts."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from bench.analysis import (BACKEND, DROP_AFTER, PODS, VIP, VIP_PORT, _path, _records,
                            synth, synth_flow)
from tracer import analysis
from tracer.kernel import record
from tracer.reconstruct import diagnose
from tracer.reconstruct.packets import build_packets
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence, fact_query
from tracer.reconstruct.model import Packet

A, B = "default/pod-1-1", "default/pod-2-1"


def judged(arr, meta, ev: Evidence | None = None):
    fi = analysis._flow_input(meta)
    packets = build_packets(record.to_frame(arr), fi)
    return diagnose.judge(packets, ev or Evidence()), fi


def svc_flow(reverse_nat: bool):
    """One TCP SYN to the web Service, DNATed to its backend at node-1's cni0, and the SYN-ACK
    back; without reverse_nat the reply reaches the client from the backend's address."""
    client, backend = A, BACKEND
    cip, bip = PODS[client][2], PODS[backend][2]
    recs = []
    t0, sport = 5_000_000_000, 40000
    for j, (ns, dev, hook, enc) in enumerate(_path(client, backend)):
        dst, dport = (VIP, VIP_PORT) if j < 2 else (bip, 8080)
        recs.append((t0 + j * 5000, 0xFFFF888100000000, ns, dev, hook, enc, cip, sport, dst, dport, 1000, 100, 0))
    for j, (ns, dev, hook, enc) in enumerate(_path(backend, client)):
        src, port = (VIP, VIP_PORT) if reverse_nat and j >= 10 else (bip, 8080)
        recs.append((t0 + 200_000 + j * 5000, 0xFFFF888100001000, ns, dev, hook, enc, src, port, cip, sport,
                     9000, 0, 0))
    arr = _records(recs)
    arr["tcp_flags"] = np.where(arr["ip_id"] != 0, 0x02, 0x12)
    _, meta = synth_flow(probes=1)
    svc = {"key": "default/web", "backends": [backend], "backend_ips": [bip]}
    meta.update(dst={"spec": "svc/default/web", "ip": VIP, "pod": None, "node": None, "service": "default/web"},
                service=svc, port=VIP_PORT,
                probes=[{**meta["probes"][0], "dst": VIP, "dport": VIP_PORT,
                         "reply_from": VIP if reverse_nat else bip}])
    return arr, meta


def test_delivered_both_ways():
    arr, meta = synth_flow(probes=2)
    packets, fi = judged(arr, meta)
    assert [(p.direction, p.seq) for p in packets] == [("request", 1), ("reply", 1), ("request", 2),
                                                               ("reply", 2)]
    for p in packets:
        v = p.verdict
        assert v.status == "delivered" and v.dev == "eth0" and v.point == "rx"
        assert v.node == (PODS[B][1] if p.direction == "request" else PODS[A][1])
        assert len(p.hops) == 12 and p.one_way_ns == p.hops[-1].t_ns
    verdict, probes = verdicts.flow_verdict(packets, fi, True)
    assert verdict.as_json() == {"status": "ok", "summary": "2/2 delivered, 2/2 answered", "problems": []}


def test_dropped_names_node_device_reason_and_location():
    arr, meta = synth_flow(probes=1, drop_requests=True)
    (p,), fi = judged(arr, meta)
    v = p.verdict
    assert (v.status, v.node, v.dev, v.point, v.reason) == \
        ("dropped", "node-2", "flannel.1", "drop", "NETFILTER_DROP")
    assert v.location == "nft_do_chain+0x46f" and v.runbook == "docs/runbooks/netfilter-drop.md"
    assert len(p.hops) == DROP_AFTER + 1
    verdict, _ = verdicts.flow_verdict([p], fi, True)
    assert verdict.status == "failed"
    assert verdict.problems[0].startswith("probe 1: request dropped at node-2/flannel.1 (NETFILTER_DROP)")


def test_lost_is_the_last_hop_seen():
    arr, meta = synth_flow(probes=1, drop_requests=True)
    arr = arr[arr["hook"] != 3][:5]          # no drop event, and the path ends at node-1's eth0
    (p,), _ = judged(arr, meta)
    v = p.verdict
    assert (v.status, v.node, v.dev, v.point) == ("lost", "node-1", "eth0", "tx")
    assert v.runbook == "docs/runbooks/packet-lost.md"


def test_service_dnat_and_reverse_nat():
    arr, meta = svc_flow(reverse_nat=True)
    packets, fi = judged(arr, meta, Evidence(vip=VIP, service="default/web", backends=[PODS[BACKEND][2]]))
    req, rep = packets
    assert [n.type for n in req.nat] == ["dnat"]
    assert req.nat[0].backend == PODS[BACKEND][2] and req.nat[0].hop == 2
    assert [n.type for n in rep.nat] == ["reverse-dnat"]
    assert req.verdict.status == rep.verdict.status == "delivered"
    assert rep.verdict.cause is None
    assert verdicts.flow_verdict(packets, fi, True)[0].status == "ok"


def test_wrong_reply_is_judged_without_touching_the_inputs():
    arr, meta = svc_flow(reverse_nat=False)
    fi = analysis._flow_input(meta)
    built = build_packets(record.to_frame(arr), fi)
    ev = Evidence(vip=VIP, service="default/web", backends=[PODS[BACKEND][2]])
    # the facts the diagnosis will look up: the client's node about the reply
    need = diagnose.facts_needed(built, ev)
    assert need == {"node-1": [fact_query("node-1", built[1])]}
    ev = ev.with_answers({"node-1": [{"query": need["node-1"][0], "facts": {"bridge_nf_call_iptables": 0}}]})
    before, probes_before = copy.deepcopy(built), copy.deepcopy(fi.probes)
    packets = diagnose.judge(built, ev)
    verdict, probes = verdicts.flow_verdict(packets, fi, True)
    assert built == before and fi.probes == probes_before        # nothing rewritten in place
    rep = packets[1].verdict
    assert rep.status == "delivered" and rep.cause == "unreversed-reply" and rep.problem is True
    assert "bridge-nf-call-iptables is 0" in rep.hint
    assert [p.outcome for p in probes] == ["wrong-reply"] and fi.probes[0].outcome == "answered"
    assert verdict.status == "failed"
    assert verdicts.summary(packets, probes, {})["answered"] == 0


def test_partial_view_an_agent_missing():
    """node-2's agent sent nothing: the request is lost where node-1's view ends, and the
    diagnosis says node-2's facts are missing rather than guessing."""
    arr, meta = synth_flow(probes=1)
    n2 = {PODS[B][0], 4026531003}
    arr = arr[~np.isin(arr["netns"], list(n2))]
    packets, fi = judged(arr, meta)
    req = next(p for p in packets if p.direction == "request")
    assert [h.node for h in req.hops][-2:] == [None, None]     # last seen on the fabric
    assert req.verdict.status == "lost" and req.verdict.node is None
    rep = next(p for p in packets if p.direction == "reply")
    assert rep.hops[0].node is None and rep.verdict.status == "delivered"
    # a node that answered nothing: the verdict says so
    arr2, meta2 = synth_flow(probes=1, drop_requests=True)
    (p,), _ = judged(arr2, meta2, Evidence(answers={"node-1": []}))
    assert p.verdict.evidence["node_facts"] == "not available for node-2 (not on this machine)"
    assert diagnose.facts_needed([p], Evidence()) == {"node-2": [fact_query("node-2", p)]}


def test_model_json_round_trip_and_key_order():
    """Every stage's packets are typed; their JSON is the contract's shape and reads back equal."""
    arr, meta = svc_flow(reverse_nat=False)
    ev = Evidence(vip=VIP, service="default/web", backends=[PODS[BACKEND][2]])
    packets, _ = judged(arr, meta, ev)
    arr2, meta2 = synth_flow(probes=1, drop_requests=True)
    packets += judged(arr2, meta2, Evidence(answers={"node-1": []}))[0]
    for p in packets:
        doc = p.as_json()
        assert Packet.from_json(doc) == p
        assert list(doc) == ["direction", "nat", "seq", "tuple", "ip_id", "ip_len", "df", "first_ts_ns",
                             "one_way_ns", "hops", "verdict", "tcp_flags"]
        assert list(doc["verdict"])[:8] == ["status", "node", "dev", "point", "reason", "location", "hint",
                                            "runbook"]
        assert list(doc["hops"][0])[:4] == ["node", "pod", "dev", "point"] and "src_is" not in doc["hops"][0]
        named = p.as_json({h.src: {"pod": "x"} for h in p.hops})
        assert named["hops"][0]["src_is"] == {"pod": "x"} and "dst_is" in named["hops"][0]
    assert packets[1].as_json()["verdict"]["problem"] is True
    assert packets[0].as_json()["nat"][0]["type"] == "dnat"


def _paths(t, keep: set | None = None) -> dict:
    """(first_ts_ns, ip_id) → (status, node, dev, reason, hops as (node, dev, point))."""
    out = {}
    hops = {k: g for k, g in t.hops.groupby("packet")}
    for r in t.packets.itertuples():
        key = (int(r.first_ts_ns), int(r.ip_id))
        if keep is not None and key not in keep:
            continue
        h = hops.get(r.packet, pd.DataFrame(columns=["node", "dev", "point"]))
        na = (lambda x: None if pd.isna(x) else str(x))
        out[key] = (str(r.status), na(r.node), na(r.dev), na(r.reason),
                    tuple((na(a), str(b), str(c)) for a, b, c in zip(h["node"], h["dev"], h["point"])))
    return out


def equal_paths(frame: pd.DataFrame, meta: dict) -> None:
    """The vectorised path gives every packet the per-packet path found the same hops,
    status, node, device and reason."""
    per_packet = _paths(analysis.analyse(frame, dict(meta), mode="flow"))
    fast = _paths(analysis.analyse(frame, dict(meta), mode="capture"), set(per_packet))
    assert per_packet and fast == per_packet


@pytest.mark.parametrize("drop", [False, True])
def test_fast_path_equals_per_packet_path_on_flows(drop):
    arr, meta = synth_flow(probes=3, drop_requests=drop)
    equal_paths(record.to_frame(arr), meta)


def test_fast_path_equals_per_packet_path_on_service_and_partial_views():
    arr, meta = svc_flow(reverse_nat=True)
    equal_paths(record.to_frame(arr), meta)
    arr, meta = synth_flow(probes=2)
    equal_paths(record.to_frame(arr[~np.isin(arr["netns"], [PODS[B][0], 4026531003])]), meta)


def test_fast_path_equals_per_packet_path_on_mixed_traffic():
    """Many flows with drops and losses: each packet the per-packet path builds for one
    client/server pair is the packet the fast path finds among all the traffic."""
    arr, meta, _ = synth(3_000, drop_rate=0.1, lost_rate=0.08, block_packets=256)
    frame = record.to_frame(arr)
    src, dst = A, B
    meta = dict(meta, kind="flow", proto="tcp", port=None, probes=[], service=None, probing=False,
                src={"spec": src, "ip": PODS[src][2], "pod": src, "node": PODS[src][1], "service": None},
                dst={"spec": dst, "ip": PODS[dst][2], "pod": dst, "node": PODS[dst][1], "service": None})
    per_packet = _paths(analysis.analyse(frame, dict(meta), mode="flow"))
    assert {s for s, *_ in per_packet.values()} == {"delivered", "dropped", "lost"}
    fast = _paths(analysis.analyse(frame, dict(meta), mode="capture"), set(per_packet))
    assert fast == per_packet
    assert len(per_packet) > 20


def _tc_only(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The events at `rows` as the tc observers record them (no skb, tc hook ids)."""
    out = arr.copy()
    rx, tx = record.HOOK_IDS["rx"], record.HOOK_IDS["tx"]
    sel = rows & np.isin(out["hook"], [rx, tx])
    out["hook"][sel & (out["hook"] == rx)] = record.HOOK_IDS["tc_ingress"]
    out["hook"][sel & (out["hook"] == tx)] = record.HOOK_IDS["tc_egress"]
    out["skb"][sel] = 0
    return out[~rows | sel]


def test_a_packet_only_the_tc_observers_saw_is_partial_not_lost():
    """Every path through the network passes a device tracepoint (the pod's own devices
    first): a request whose hops only tc recorded is a gap in the trace, in both engines."""
    from tracer.reconstruct import window as windows

    arr, meta = synth_flow(probes=1)
    src_ip = np.frombuffer(__import__("ipaddress").ip_address(PODS[A][2]).packed, dtype=np.uint8)
    req = (arr["saddr"][:, :4] == src_ip).all(axis=1)
    # the request vanishes once on node-2 (its events there are gone): lost
    arr = arr[~(req & np.isin(arr["netns"], [PODS[B][0], 4026531003]))]
    req = (arr["saddr"][:, :4] == src_ip).all(axis=1)

    def status(a, mode):
        t = analysis.analyse(record.to_frame(a), dict(meta), mode=mode)
        first = t.packets.sort_values("first_ts_ns").iloc[0]
        return str(first["status"]), str(first["hint"])
    assert status(arr, "flow")[0] == status(arr, "capture")[0] == "lost"      # the control
    only_tc = _tc_only(arr, req)
    for mode in ("flow", "capture"):
        s, hint = status(only_tc, mode)
        assert s == "partial" and windows.TC_ONLY in hint, (mode, s, hint)
    # one hop a tracepoint saw: the tc observers are not alone, and the loss stands
    keep_one = req.copy()
    keep_one[np.flatnonzero(req & np.isin(arr["hook"], [record.HOOK_IDS["rx"], record.HOOK_IDS["tx"]]))[0]] = False
    mixed = _tc_only(arr, keep_one)
    assert status(mixed, "flow")[0] == status(mixed, "capture")[0] == "lost"
