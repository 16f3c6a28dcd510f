"""IPv6 and dual-stack reconstruction on hand-built frames in the decoded format (address keys
+ `*_str` texts + flow_lbl): cross-node ICMPv6 echo over VXLAN (IPv4 and IPv6 underlay), a
Service DNAT with its reply un-DNATed, UDP datagrams of one flow told apart by their payload
hash, a TCP SYN, a trace holding both families, a drop on an IPv6 path; both engine paths
agree, the JSON matches the schema and the tables fit 120 columns."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import jsonschema
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from bench.analysis import DROP_AFTER, DROP_LOCATION, FABRIC, N1, NETFILTER_DROP, PODS, _path
from bench.analysis import meta as base_meta
from tests.unit.test_engine import equal_paths
from tracer import addrs, analysis, render
from tracer.cluster import inventory
from tracer.kernel.record import HOOKS, IP_COLUMNS
from tracer.node.prober import ProbeResult
from tracer.reconstruct import diagnose, drops, identity
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct import evidence
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import FlowVerdict
from tracer.reconstruct.packets import assign_packets, build_packets

A, B, BACKEND = "default/pod-1-1", "default/pod-2-1", "default/pod-2-2"
V6 = {"default/pod-1-1": "fd00:10:244:1::2", "default/pod-1-2": "fd00:10:244:1::3",
      "default/pod-2-1": "fd00:10:244:2::2", "default/pod-2-2": "fd00:10:244:2::3"}
VIP6, VIP_PORT = "fd00:10:96::a", 80
UNDERLAY = {4: ("172.30.0.11", "172.30.0.12"), 6: ("fd00:172:30::1", "fd00:172:30::2")}
SCHEMA = json.loads((pathlib.Path(__file__).resolve().parents[2] / "tracer/schema/flow.schema.json").read_text())
CT_NAMES = {0: "IP_CT_ESTABLISHED", 1: "IP_CT_RELATED", 2: "IP_CT_NEW", 3: "IP_CT_ESTABLISHED_REPLY"}


def frame(rows: list[dict]) -> pd.DataFrame:
    """A decoded event frame as record.to_frame / a loaded trace give it: address columns are
    addrs.key numbers (uint64), their text in `*_str` categoricals, flow_lbl a plain column."""
    ints = {"ts_ns": np.uint64, "skb": np.uint64, "location": np.uint64, "netns": np.uint32,
            "ifindex": np.uint32, "vni": np.uint32, "tcp_seq": np.uint32, "len": np.uint32,
            "reason": np.uint32, "ct_status": np.uint32, "flow_lbl": np.uint32, "sport": np.uint16,
            "dport": np.uint16, "ip_id": np.uint16, "ip_len": np.uint16, "ct_orig_sport": np.uint16,
            "ct_orig_dport": np.uint16, "ct_reply_sport": np.uint16, "ct_reply_dport": np.uint16,
            "hook": np.uint8, "proto": np.uint8, "tcp_flags": np.uint8, "icmp_type": np.uint8,
            "flags": np.uint8, "encap": np.uint8, "cpu": np.uint8, "ttl": np.uint8, "ct_info": np.uint8}
    cols: dict = {k: np.array([r.get(k, 0) for r in rows], dtype=t) for k, t in ints.items()}
    for c in IP_COLUMNS:
        text = [r.get(c) or "" for r in rows]
        cols[c] = np.array([addrs.key(t) for t in text], dtype=np.uint64)
        cols[c + "_str"] = pd.Categorical(text)
    cols["ifname"] = pd.Categorical([r["ifname"] for r in rows])
    cols["hook_name"] = pd.Categorical([HOOKS[int(r["hook"])] for r in rows])
    return pd.DataFrame(cols)


def path_rows(a: str, b: str, t0: int, skb: int, underlay: int = 4, **pkt) -> list[dict]:
    """One packet's hop events from pod a to pod b across the VXLAN overlay: `pkt` holds the
    inner header (saddr, daddr, proto, …); `nat_at` (hop index, {field: value}) rewrites it
    from that hop on."""
    nat_at = pkt.pop("nat_at", None)
    out_src, out_dst = UNDERLAY[underlay] if PODS[a][1] == "node-1" else UNDERLAY[underlay][::-1]
    rows = []
    for j, (ns, dev, hook, enc) in enumerate(_path(a, b)):
        r = {"ts_ns": t0 + j * 5000, "skb": skb + (j >= 5) * 0x10000, "netns": ns, "ifname": dev,
             "ifindex": 2 + sum(map(ord, dev)) % 40, "hook": hook, "ttl": 64 if j < 5 else 63,
             "flags": 0, **pkt}
        if nat_at and j >= nat_at[0]:
            r.update(nat_at[1])
        if enc:
            r.update(encap=1, vni=1, outer_saddr=out_src, outer_daddr=out_dst)
        r["len"] = r.get("ip_len", 0) + (50 if enc else 0)
        rows.append(r)
    return rows


def dual_meta() -> dict:
    """A capture's metadata in a dual-stack cluster: pods and Services with both families."""
    m = base_meta()
    for p in m["pods"]:
        p["ips"] = [PODS[p["key"]][2], V6[p["key"]]]
    m["services"] = [{"key": "default/web", "namespace": "default", "name": "web", "cluster_ip": "10.96.0.10",
                      "cluster_ips": ["10.96.0.10", VIP6], "backends": [BACKEND],
                      "backend_ips": [PODS[BACKEND][2], V6[BACKEND]]}]
    return m


def flow_meta(src: str, dst: str, proto: str, port: int | None, probes: list[dict], dst_ip: str | None = None,
              family: int = 6) -> dict:
    m = dual_meta()
    ip = (lambda k: V6[k]) if family == 6 else (lambda k: PODS[k][2])
    m.update(kind="flow", src={"spec": src, "ip": ip(src), "pod": src, "node": PODS[src][1], "service": None},
             dst={"spec": dst, "ip": dst_ip or ip(dst), "pod": dst, "node": PODS[dst][1], "service": None},
             proto=proto, port=port, probes=probes, service=None, probing=True, inventory="synthetic", version=1,
             ct_info_names={str(k): v for k, v in CT_NAMES.items()})
    return m


def probe(seq: int, proto: str, src: str, dst: str, sport: int, dport: int, sent_ns: int, reply_from=None) -> dict:
    return {"seq": seq, "proto": proto, "src": src, "dst": dst, "sport": sport, "dport": dport, "sent_ns": sent_ns,
            "outcome": "answered" if reply_from else "timeout", "reply_from": reply_from,
            "rtt_ns": 400_000 if reply_from else None, "detail": None}


def judged(df: pd.DataFrame, meta: dict, ev: Evidence | None = None):
    fi = analysis._flow_input(meta)
    packets = diagnose.judge(build_packets(df, fi), ev or Evidence())
    return packets, fi


def doc_of(packets, fi, meta) -> dict:
    """The `flow -o json` document's contract part (runs/outcome.py's keys)."""
    verdict, probes = verdicts.flow_verdict(packets, fi, True)
    ep = lambda d: {"spec": d["spec"], "ip": d["ip"], "pod": d["pod"], "node": d["node"],  # noqa: E731
                    "service": d.get("service")}
    return {"src": ep(meta["src"]), "dst": ep(meta["dst"]),
            "probe": {"proto": meta["proto"], "port": meta["port"], "count": len(probes)},
            "packets": [p.as_json() for p in packets], "verdict": verdict.as_json(),
            "probes": [p.as_json() for p in probes]}


def rendered(packets, fi, meta, width: int = 120) -> dict[str, list[str]]:
    """What `flow -o wide` and `-o compact` print, line by line."""
    doc = doc_of(packets, fi, meta)
    ep = lambda e: SimpleNamespace(as_json=lambda: e)   # noqa: E731
    res = SimpleNamespace(src=ep(doc["src"]), dst=ep(doc["dst"]), proto=meta["proto"], port=meta["port"],
                          notes=[], packets=packets, verdict=FlowVerdict(**doc["verdict"]),
                          summary={"median_one_way_ns": 1000, "median_rtt_ns": 2000, "events_lost": 0},
                          probes=[ProbeResult(**p) for p in doc["probes"]], timings={})
    out = {}
    for name, fn in (("wide", render.flow_table), ("compact", render.flow_compact)):
        con = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
        fn(res, con)
        out[name] = con.export_text().splitlines()
    return out


def check_outputs(packets, fi, meta) -> dict[str, list[str]]:
    jsonschema.validate(doc_of(packets, fi, meta), SCHEMA)
    out = rendered(packets, fi, meta)
    for lines in out.values():
        assert max(len(x) for x in lines) <= 120
    return out


# -- cross-node ICMPv6 echo over VXLAN ---------------------------------------------------------

def echo_flow(underlay: int, probes: int = 2):
    rows, sent = [], []
    for i in range(probes):
        t0 = 5_000_000_000 + i * 50_000_000
        echo = dict(proto=58, sport=0x1234, dport=i + 1, ip_len=104, flow_lbl=0)
        rows += path_rows(A, B, t0, 0xFFFF888100000000 + i * 4096, underlay, saddr=V6[A], daddr=V6[B],
                          icmp_type=128, **echo)
        rows += path_rows(B, A, t0 + 200_000, 0xFFFF888200000000 + i * 4096, underlay, saddr=V6[B], daddr=V6[A],
                          icmp_type=129, **echo)
        sent.append(probe(i + 1, "icmp", V6[A], V6[B], 0x1234, i + 1, t0 - 1000, V6[B]))
    return frame(rows), flow_meta(A, B, "icmp", None, sent)


@pytest.mark.parametrize("underlay", [4, 6])
def test_icmpv6_echo_across_nodes_over_vxlan(underlay):
    df, meta = echo_flow(underlay)
    packets, fi = judged(df, meta)
    assert [(p.direction, p.seq) for p in packets] == [("request", 1), ("reply", 1), ("request", 2), ("reply", 2)]
    out_src, out_dst = UNDERLAY[underlay]
    for p in packets:
        assert p.five_tuple.proto == "icmpv6" and p.five_tuple.sport is None and p.df
        assert p.verdict.status == "delivered" and p.verdict.point == "rx" and len(p.hops) == 12
        assert {h.src for h in p.hops} == {p.five_tuple.src} and not p.nat
        encap = [h.encap for h in p.hops if h.encap]
        assert len(encap) == 4
        if p.direction == "request":
            assert p.five_tuple.src == V6[A] and p.five_tuple.dst == V6[B] and p.verdict.node == "node-2"
            assert {(e.src, e.dst) for e in encap} == {(out_src, out_dst)}
        else:
            assert {(e.src, e.dst) for e in encap} == {(out_dst, out_src)}
    verdict, _ = verdicts.flow_verdict(packets, fi, True)
    assert verdict.as_json() == {"status": "ok", "summary": "2/2 delivered, 2/2 answered", "problems": []}
    out = check_outputs(packets, fi, meta)
    title = next(x for x in out["wide"] if x.startswith("request 1"))
    assert f"icmpv6 {V6[A]} → {V6[B]}" in title and "ip_id" not in title
    assert any(f"vxlan {out_src}→" in x for x in out["wide"])
    equal_paths(df, meta)


def test_echo_seq_and_id_tell_icmpv6_packets_apart_and_the_wrong_type_is_no_reply():
    df, meta = echo_flow(4, probes=3)
    got = assign_packets(df)
    assert got["pkt"].nunique() == 6
    # an echo request coming back to the client is not the answer (type 128, not 129)
    df2 = df.copy()
    df2.loc[df2["icmp_type"] == 129, "icmp_type"] = 128
    packets, _ = judged(df2, meta)
    assert [(p.direction, p.seq) for p in packets] == [("request", 1), ("request", 2), ("request", 3)]


# -- a Service over IPv6: DNAT with conntrack, reply un-DNATed ---------------------------------

def svc_rows(reverse_nat: bool = True) -> list[dict]:
    cip, bip, sport = V6[A], V6[BACKEND], 40000
    ct_req = dict(ct_info=3, ct_status=0x8 | 0x20 | 0x100, ct_orig_src=cip, ct_orig_dst=VIP6,
                  ct_reply_src=bip, ct_reply_dst=cip, ct_orig_sport=sport, ct_orig_dport=VIP_PORT,
                  ct_reply_sport=8080, ct_reply_dport=sport)
    syn = dict(proto=6, tcp_flags=0x02, tcp_seq=1000, ip_len=80, flow_lbl=0x5a5a5)
    rows = path_rows(A, BACKEND, 5_000_000_000, 0xFFFF888100000000, 4, saddr=cip, daddr=VIP6, sport=sport,
                     dport=VIP_PORT, nat_at=(2, dict(daddr=bip, dport=8080, **ct_req)), **syn)
    ct_rep = {**ct_req, "ct_info": 4}
    synack = dict(proto=6, tcp_flags=0x12, tcp_seq=9000, ip_len=80, flow_lbl=0x1b1b1)
    nat_back = (10, dict(saddr=VIP6, sport=VIP_PORT)) if reverse_nat else None
    rows += path_rows(BACKEND, A, 5_000_200_000, 0xFFFF888200000000, 4, saddr=bip, daddr=cip, sport=8080,
                      dport=sport, nat_at=nat_back, **ct_rep, **synack)
    return rows


def svc_meta(reply_from: str) -> dict:
    meta = flow_meta(A, BACKEND, "tcp", VIP_PORT,
                     [probe(1, "tcp", V6[A], VIP6, 40000, VIP_PORT, 5_000_000_000 - 1000, reply_from)], dst_ip=VIP6)
    meta["dst"] = {"spec": "svc/default/web", "ip": VIP6, "pod": None, "node": None, "service": "default/web"}
    meta["service"] = {"key": "default/web", "backends": [BACKEND], "backend_ips": [V6[BACKEND]]}
    return meta


def test_ipv6_service_dnat_and_reply_un_dnat():
    df, meta = frame(svc_rows()), svc_meta(VIP6)
    ev = Evidence(vip=VIP6, service="default/web", backends=[V6[BACKEND]])
    packets, fi = judged(df, meta, ev)
    req, rep = packets
    assert (req.direction, rep.direction) == ("request", "reply")
    assert [n.type for n in req.nat] == ["dnat"] and req.nat[0].backend == V6[BACKEND] and req.nat[0].hop == 2
    assert req.nat[0].before.dst == VIP6 and req.nat[0].after.dst == V6[BACKEND] and req.nat[0].after.dport == 8080
    assert [n.type for n in rep.nat] == ["reverse-dnat"] and rep.nat[0].after.src == VIP6
    assert req.verdict.status == rep.verdict.status == "delivered" and rep.verdict.cause is None
    ct = req.hops[2].ct
    assert ct.nat == "dnat" and ct.orig.dst == VIP6 and ct.reply.src == V6[BACKEND] and ct.of is None
    assert req.tcp_flags == "S" and rep.tcp_flags == "S."
    assert verdicts.flow_verdict(packets, fi, True)[0].status == "ok"
    out = check_outputs(packets, fi, meta)
    # IPv6 tuples are long: the NAT lines name the side that changed, in [addr]:port form
    assert f"  DNAT at hop 3 (node-1/cni0): dst [{VIP6}]:80 → [{V6[BACKEND]}]:8080  backend {V6[BACKEND]}" \
        in out["wide"]
    assert f"  reverse DNAT at hop 11 (node-1/veth11111111): src [{V6[BACKEND]}]:8080 → [{VIP6}]:80" in out["wide"]
    assert f"    DNAT at node-1/cni0: dst [{VIP6}]:80 → [{V6[BACKEND]}]:8080  backend {V6[BACKEND]}" \
        in [x.rstrip() for x in out["compact"]]
    wide = rendered(packets, fi, meta, width=200)["wide"]
    assert any(f"[{V6[A]}]:40000→[{VIP6}]:80 → [{V6[A]}]:40000→[{V6[BACKEND]}]:8080" in x for x in wide)
    equal_paths(df, meta)


def test_ipv6_service_reply_not_reversed_is_a_wrong_reply():
    df, meta = frame(svc_rows(reverse_nat=False)), svc_meta(V6[BACKEND])
    ev = Evidence(vip=VIP6, service="default/web", backends=[V6[BACKEND]])
    packets, fi = judged(df, meta, ev)
    rep = packets[1].verdict
    assert rep.status == "delivered" and rep.cause == "unreversed-reply" and rep.problem
    assert verdicts.flow_verdict(packets, fi, True)[0].status == "failed"


def test_capture_tables_mark_an_ipv6_reply_that_came_back_unreversed():
    """A hostPort-like DNAT (no Service in the inventory) over IPv6: the capture's tables
    name the address the client sent to, in IPv6 text."""
    rows = svc_rows(reverse_nat=False)
    t = analysis.analyse(frame(rows), dual_meta(), mode="capture")
    p = t.packets
    assert list(p["src"].astype(str)) == [V6[A], V6[BACKEND]]
    assert list(p["final_dst"].astype(str)) == [V6[BACKEND], V6[A]]
    hint = p["hint"].iloc[1]
    assert p["cause"].iloc[1] == "unreversed-reply" and f"should be {VIP6}" in hint
    assert set(t.hops["src"].astype(str)) == {V6[A], V6[BACKEND]}
    assert len(t.flows) == 1 and t.flows["src"].iloc[0] == V6[A] and t.flows["packets"].iloc[0] == 2


# -- UDP over IPv6: datagrams of one flow told apart by their payload hash ---------------------

def udp_flow(same_hash: bool = False):
    rows, sent = [], []
    for i in range(2):
        t0 = 5_000_000_000 + i * 1_000_000
        dgram = dict(proto=17, sport=50000, dport=5353, ip_len=60, flow_lbl=0x777,
                     tcp_seq=0xABCD if same_hash else 0x1111 * (i + 1))
        rows += path_rows(A, B, t0, 0xFFFF888100000000 + i * 4096, 6, saddr=V6[A], daddr=V6[B], **dgram)
        sent.append(probe(i + 1, "udp", V6[A], V6[B], 50000, 5353, t0 - 1000))
    return frame(rows), flow_meta(A, B, "udp", 5353, sent)


def test_udp_datagrams_of_one_ipv6_flow_are_two_packets():
    df, meta = udp_flow()
    packets, fi = judged(df, meta)
    assert len(packets) == 2 and all(len(p.hops) == 12 for p in packets)
    assert [p.verdict.status for p in packets] == ["delivered", "delivered"]
    assert [p.ip_id for p in packets] == [0, 0]
    check_outputs(packets, fi, meta)
    t = analysis.analyse(df, meta, mode="capture")
    assert len(t.packets) == 2 and list(t.packets["hops"]) == [12, 12]


def test_equal_ipv6_datagrams_in_flight_together_are_still_two_packets():
    """Equal content (same payload hash): the k-th pass of one place is the k-th packet,
    even when the two interleave."""
    df, meta = udp_flow(same_hash=True)
    df["ts_ns"] = np.where(df["skb"] % 0x2000 >= 4096, df["ts_ns"] - 1_000_000 + 2500, df["ts_ns"])
    for mode in ("flow", "capture"):
        t = analysis.analyse(df, dict(meta), mode=mode)
        assert len(t.packets) == 2 and list(t.packets["hops"]) == [12, 12], mode
        assert list(t.packets["status"].astype(str)) == ["delivered", "delivered"]


def test_a_routing_loop_stays_one_ipv6_packet():
    """Going round the same devices with a lower hop limit each time is one packet (loops.py)."""
    rows = []
    for k in range(3):
        for j, dev in enumerate(("eth0", "flannel.1")):
            rows.append({"ts_ns": 1_000 + (2 * k + j) * 1000, "skb": 0xAA00, "netns": N1, "ifname": dev,
                         "ifindex": 2 + j, "hook": 2, "ttl": 64 - k, "saddr": V6[A], "daddr": "fd00:99::1",
                         "proto": 17, "ip_len": 60, "tcp_seq": 5})
    got = assign_packets(frame(rows))
    assert got["pkt"].nunique() == 1


# -- TCP SYN over IPv6; a drop on an IPv6 path -------------------------------------------------

def syn_rows(drop: bool) -> list[dict]:
    syn = dict(proto=6, tcp_flags=0x02, tcp_seq=77, ip_len=80, flow_lbl=0x12345, sport=40001, dport=8080)
    rows = path_rows(A, B, 5_000_000_000, 0xFFFF888100000000, 6, saddr=V6[A], daddr=V6[B], **syn)
    if drop:
        rows = rows[:DROP_AFTER + 1]
        last = rows[-1]
        rows.append({**last, "ts_ns": last["ts_ns"] + 1000, "hook": 3, "reason": NETFILTER_DROP,
                     "location": DROP_LOCATION})
    else:
        back = dict(proto=6, tcp_flags=0x12, tcp_seq=9000, ip_len=80, flow_lbl=0x54321, sport=8080, dport=40001)
        rows += path_rows(B, A, 5_000_200_000, 0xFFFF888200000000, 6, saddr=V6[B], daddr=V6[A], **back)
    return rows


@pytest.mark.parametrize("drop", [False, True])
def test_tcp_syn_over_ipv6(drop):
    df = frame(syn_rows(drop))
    meta = flow_meta(A, B, "tcp", 8080, [probe(1, "tcp", V6[A], V6[B], 40001, 8080, 5_000_000_000 - 1000,
                                               None if drop else V6[B])])
    packets, fi = judged(df, meta)
    if drop:
        (p,) = packets
        v = p.verdict
        assert (v.status, v.node, v.dev, v.reason) == ("dropped", "node-2", "flannel.1", "NETFILTER_DROP")
        assert v.location == "nft_do_chain+0x46f" and len(p.hops) == DROP_AFTER + 1
        assert verdicts.flow_verdict(packets, fi, True)[0].status == "failed"
        t = analysis.analyse(df, meta, mode="capture")
        assert list(t.packets["status"].astype(str)) == ["dropped"] and t.drops["count"].iloc[0] == 1
    else:
        assert [(p.direction, p.tcp_flags, p.verdict.status) for p in packets] == \
            [("request", "S", "delivered"), ("reply", "S.", "delivered")]
        assert verdicts.flow_verdict(packets, fi, True)[0].status == "ok"
    out = check_outputs(packets, fi, meta)
    assert f"request 1 tcp [{V6[A]}]:40001 → [{V6[B]}]:8080 [S]" in [x.rstrip() for x in out["wide"]]
    equal_paths(df, meta)


def test_drop_after_arrival_in_an_ipv6_pod_and_the_home_namespace_by_address():
    """drops.homes knows a pod by each of its addresses: a NO_SOCKET drop inside the pod that
    owns an IPv6 address is its own (after arrival), and an ICMPv6 echo reply no socket took
    is no drop."""
    m = dual_meta()
    home = drops.homes(m)
    assert home[drops.ip_num(V6[B])] == PODS[B][0] and home[drops.ip_num(PODS[B][2])] == PODS[B][0]
    rule = drops.rule({**m, "drop_reasons": {"2": "NO_SOCKET"}})
    dst = np.array([drops.ip_num(V6[B])] * 3, dtype=np.int64)
    hook = np.array([3, 3, 3])
    keep = drops.counted(hook, np.array([2, 2, 2]), np.array([PODS[B][0]] * 3), dst.astype(np.uint64),
                         np.array([17, 58, 58]), np.array([0, 129, 128]), rule)
    assert keep.tolist() == [True, False, True]


# -- both families in one trace ----------------------------------------------------------------

def test_dual_stack_trace_holds_both_families():
    """A capture of IPv4 and IPv6 flows between the same pods: each family's packets have their
    own addresses, the tables keep them apart, and a flow of either family reads its own."""
    rows = path_rows(A, B, 5_000_000_000, 0xFFFF888100000000, 4, saddr=PODS[A][2], daddr=PODS[B][2],
                     proto=6, tcp_flags=0x02, tcp_seq=77, ip_len=60, ip_id=100, sport=40001, dport=8080, flags=2)
    rows += syn_rows(drop=False)
    df = frame(sorted(rows, key=lambda r: r["ts_ns"]))
    t = analysis.analyse(df, dual_meta(), mode="capture")
    fam = {str(s): addrs.family(str(s)) for s in t.packets["src"]}
    assert sorted(fam.values()) == [4, 6, 6]
    assert list(t.packets["status"].astype(str)) == ["delivered"] * 3
    assert len(t.flows) == 2 and sorted(t.flows["packets"]) == [1, 2]
    assert sorted(addrs.family(s) for s in t.flows["src"]) == [4, 6]
    m6 = flow_meta(A, B, "tcp", 8080, [probe(1, "tcp", V6[A], V6[B], 40001, 8080, 4_999_999_000, V6[B])])
    packets, fi = judged(df, m6)
    assert [p.five_tuple.src for p in packets] == [V6[A], V6[B]]
    m4 = flow_meta(A, B, "tcp", 8080, [probe(1, "tcp", PODS[A][2], PODS[B][2], 40001, 8080, 4_999_999_000)],
                   family=4)
    packets4, _ = judged(df, m4)
    assert [p.five_tuple.src for p in packets4] == [PODS[A][2]] and packets4[0].ip_id == 100
    check_outputs(packets, fi, m6)


def test_ipv4_keys_and_identity_are_unchanged():
    assert drops.ip_num("10.244.1.2") == 0x0AF40102 and drops.ip_num("") == 0 and drops.ip_num("bad") == 0
    assert drops.ip_num(V6[A]) < 0 and drops.ip_num(V6[A]) == np.uint64(addrs.key(V6[A])).astype(np.int64)
    assert identity.same_proto("icmpv6", "icmp") and not identity.same_proto("udp", "icmp")
    assert identity.is_echo(58, 128, True) and identity.is_echo(1, 0, False) and not identity.is_echo(58, 8, True)
    # two IPv4 datagrams of equal content on one place: one packet, as before (IP ID tells them apart)
    v4 = dict(saddr=PODS[A][2], daddr=PODS[B][2], proto=17, ip_id=7, ip_len=60)
    rows = [{"ts_ns": 1000 * k, "netns": FABRIC, "ifname": "n1", "hook": 1, "skb": 1, **v4} for k in (1, 2)]
    assert assign_packets(frame(rows))["pkt"].nunique() == 1


def test_mtu_on_an_ipv6_path_needs_no_df_flag():
    """IPv6 is never fragmented on the way: a packet larger than the outgoing MTU is the MTU
    cause whatever its flags (the record's DF bit is an IPv4 notion)."""
    from tests.unit import test_diagnose as td

    hops = [td.hop("node-1", "eth0", "tx", V6[A], V6[B], pod=A), td.hop("node-1", "cni0", "rx", V6[A], V6[B])]
    f = td.facts(route={"dst": V6[B], "gateway": "fd00:10:244:2::", "dev": "flannel.1"}, next_hop=None)
    assert td.cause(td.packet(status="lost", ip_len=1500, df=True, hops=hops), td.ev(f)) == "mtu"
    hint = td.judged().hint
    assert "1500-byte IPv6 packet" in hint and "MTU 1450" in hint and "packet too big" in hint
    # what build_packets sets for an IPv6 packet: df holds
    df, meta = udp_flow()
    packets, _ = judged(df, meta)
    assert all(p.df for p in packets)


def test_the_live_drop_count_reads_raw_16_byte_addresses():
    """The capture counts drops on raw records (16-byte addresses): the same keys as frames."""
    from tracer.reconstruct import arrival

    raw = np.zeros((3, 16), dtype=np.uint8)
    for i, a in enumerate((PODS[B][2], V6[B], "")):
        if a:
            raw[i] = np.frombuffer(addrs.packed16(a), dtype=np.uint8)
    assert arrival.raw_keys(raw).tolist() == [drops.ip_num(PODS[B][2]), drops.ip_num(V6[B]), 0]
    rule = drops.rule({**dual_meta(), "drop_reasons": {"2": "NO_SOCKET"}})
    assert rule.home_ns(raw).tolist() == [PODS[B][0], PODS[B][0], 0]
    keep = drops.counted(np.array([3, 3, 3]), np.array([2, 2, 2]), np.array([PODS[B][0]] * 3), raw,
                         np.array([1, 58, 17]), np.array([0, 129, 0]), rule)
    assert keep.tolist() == [False, False, True]


def test_analyze_report_and_plot_labels_write_ipv6_with_brackets():
    from tracer.analysis import plots, report

    t = analysis.analyse(frame(svc_rows(reverse_nat=True)), base_meta(), mode="capture")   # pods unnamed
    con = Console(width=200, record=True, color_system=None, file=open("/dev/null", "w"))
    report.render_summary(report.summary_doc(t), con)
    text = con.export_text()
    assert f"[{V6[A]}]:40000" in text and f"[{VIP6}]:80" in text
    hops = t.hops[t.hops["packet"] == 0].reset_index(drop=True)
    assert plots._nat_label(hops.iloc[2], hops.iloc[1]) == f"dst → [{V6[BACKEND]}]:8080"


def test_dual_stack_service_reply_is_reverse_dnat_to_the_ipv6_vip():
    """A dual-stack Service's first cluster IP is IPv4: an IPv6 flow to it still names its
    IPv6 VIP, so the reply's source change back to it is the reverse DNAT, not an SNAT."""
    df, meta = frame(svc_rows()), svc_meta(VIP6)
    fi = analysis._flow_input(meta)
    fi.dst.service = inventory.Service("default", "web", "10.96.0.10", backends=[BACKEND],
                                       backend_ips=["10.244.2.3", V6[BACKEND]], cluster_ips=["10.96.0.10", VIP6])
    ev = evidence.service_evidence(fi.dst.service, fi.dst.ip)
    assert ev.vip == VIP6
    req, rep = diagnose.judge(build_packets(df, fi), ev)
    assert [n.type for n in req.nat] == ["dnat"] and req.nat[0].backend == V6[BACKEND]
    assert [n.type for n in rep.nat] == ["reverse-dnat"] and rep.nat[0].after.src == VIP6
    assert req.verdict.status == rep.verdict.status == "delivered" and rep.verdict.cause is None
