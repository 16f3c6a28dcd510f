"""Busy watches: above AGGREGATE_ABOVE packets a watch is counted by path, whole columns at a
time, and its failing packets (up to FULL_FAILING) are judged in full by the per-packet
engine; sampling raised on each node is undone to the packets every node kept; the intervals
in which a kernel refused events make the packets seen then partial, not lost."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from bench.analysis import PODS, synth_flow
from tracer import analysis
from tracer.analysis import busy
from tracer.analysis.vectorised import reconstruct_vectorised, sequence_ids
from tracer.kernel import contract, record
from tracer.reconstruct import window as windows
from tracer.reconstruct.packets import build_packets

A, B = "default/pod-1-1", "default/pod-2-1"
PAIRS = 700          # 1400 packets: above AGGREGATE_ABOVE
LOST = 25            # requests whose last hops never happened


def busy_watch(pairs: int = PAIRS, lost: int = LOST):
    """(events frame, meta) of a watched flow of `pairs` request/reply pairs; the first
    `lost` requests stop after their third hop (no drop seen: lost)."""
    arr, meta = synth_flow(probes=pairs)
    meta.update(probes=[], probing=False)
    meta["addresses"] = {PODS[A][2]: ["node-1", A], PODS[B][2]: ["node-2", B]}
    req = arr["ip_id"] != 0            # synth_flow: requests carry an IP ID, replies 0
    cut = np.zeros(len(arr), dtype=bool)
    for i in range(lost):
        at = np.flatnonzero(req & (arr["tcp_seq"] == 1000 + i))
        cut[at[3:]] = True
    return record.to_frame(arr[~cut]), meta


def test_a_busy_watch_is_counted_by_path_and_its_failing_packets_judged_in_full():
    df, meta = busy_watch()
    agg = busy.aggregate(df, meta, PODS[A][2])
    assert agg is not None
    d = agg.doc
    assert (d["packets"], d["delivered"], d["lost"], d["partial"]) == (2 * PAIRS, 2 * PAIRS - LOST, LOST, 0)
    assert d["by_direction"]["request"] == {"packets": PAIRS, "delivered": PAIRS - LOST, "lost": LOST}
    assert d["by_direction"]["reply"] == {"packets": PAIRS, "delivered": PAIRS}
    assert (d["failing"], d["failing_judged"]) == (LOST, busy.FULL_FAILING)
    # failing paths first, then the most taken; the hops of each with time percentiles
    first = d["paths"][0]
    assert (first["direction"], first["status"], first["packets"]) == ("request", "lost", LOST)
    assert len(first["hops"]) == 3 and first["hops"][0]["node"] == "node-1"
    rest = {(p["direction"], p["status"]): p["packets"] for p in d["paths"][1:]}
    assert rest == {("request", "delivered"): PAIRS - LOST, ("reply", "delivered"): PAIRS}
    deliv = d["paths"][1]
    assert deliv["one_way_ns"]["p50"] > 0
    t = [h["t_ns"]["p50"] for h in deliv["hops"]]
    assert t[0] == 0 and t == sorted(t)
    assert d["one_way_ns"]["request"]["p50"] == deliv["one_way_ns"]["p50"]
    assert d["other_paths"] == 0 and d["events"] == len(df)
    # the events of exactly FULL_FAILING packets, judged one by one as `lost` too
    fi = analysis._flow_input(meta)
    full = build_packets(agg.full_events, fi)
    assert len(full) == busy.FULL_FAILING
    assert {p.verdict.status for p in full} == {"lost"} and {p.direction for p in full} == {"request"}
    v = busy.verdict(d, full)
    assert v.status == "failed" and v.summary == f"{2 * PAIRS - LOST}/{2 * PAIRS} packets delivered"
    assert v.problems and v.problems[0].startswith("request lost at node-")
    s = busy.summary(d, {"lost": 0})
    assert (s["packets"], s["delivered"], s["failed"], s["probes"]) == (2 * PAIRS, 2 * PAIRS - LOST, LOST, 0)


def test_a_quiet_watch_keeps_its_per_packet_tables():
    df, meta = busy_watch(pairs=50, lost=2)
    assert busy.aggregate(df, meta, PODS[A][2]) is None
    forced = busy.aggregate(df, meta, PODS[A][2], force=True)
    assert forced.doc["packets"] == 100 and forced.doc["failing_judged"] == 2


def test_all_delivered_is_ok():
    df, meta = busy_watch(lost=0)
    agg = busy.aggregate(df, meta, PODS[A][2])
    v = busy.verdict(agg.doc, [])
    assert v.status == "ok" and not v.problems and agg.full_events.empty


def test_a_saved_busy_watch_gives_the_same_counts_offline():
    df, meta = busy_watch()
    agg = busy.aggregate(df, meta, PODS[A][2])
    meta.update(aggregate=agg.doc, flow_verdict=busy.verdict(agg.doc, []).as_json())
    t = analysis.analyse(df, meta)
    assert t.packets["status"].astype(str).value_counts().to_dict() == {"delivered": 2 * PAIRS - LOST, "lost": LOST}
    assert t.packets["direction"].value_counts().to_dict() == {"request": PAIRS, "reply": PAIRS}
    doc = analysis.summary_doc(t)
    assert doc["flow"]["aggregate"]["packets"] == 2 * PAIRS
    assert len(doc["flow"]["packets"]) == busy.FULL_FAILING and doc["flow"]["more_packets"] == LOST - busy.FULL_FAILING


def test_sequence_ids_name_equal_hop_sequences_alike():
    hops = pd.DataFrame({"packet": [0, 0, 1, 1, 2, 2, 3],
                         "hop": [0, 1, 0, 1, 0, 1, 0],
                         "node": ["a", "b", "a", "b", "b", "a", "a"],
                         "dev": ["x", "y", "x", "y", "y", "x", "x"]})
    ids = sequence_ids(hops, ["node", "dev"])
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["a", "b", None]), st.sampled_from(["x", "y", "z"])),
                         min_size=1, max_size=4), min_size=1, max_size=30),
       st.booleans())
def test_sequence_ids_group_exactly_the_packets_with_the_same_hop_sequence(paths, categorical):
    rows = [(pkt, hop, node, dev) for pkt, path in enumerate(paths) for hop, (node, dev) in enumerate(path)]
    hops = pd.DataFrame(rows, columns=["packet", "hop", "node", "dev"])
    if categorical:
        hops = hops.astype({"node": "category", "dev": "category"})
    hops = hops.sample(frac=1, random_state=len(rows))        # any row order
    ids = sequence_ids(hops, ["node", "dev"])
    assert sorted(ids.index) == list(range(len(paths)))
    for i in range(len(paths)):
        for j in range(len(paths)):
            assert (ids[i] == ids[j]) == (paths[i] == paths[j]), (paths[i], paths[j])


def test_the_event_packet_map_points_every_hop_at_its_packet():
    df, meta = busy_watch(pairs=20, lost=0)
    out: dict = {}
    packets, hops = reconstruct_vectorised(df, busy.with_places(meta), out=out)
    ev = out["event_packet"]
    assert len(ev) == len(df) and (ev >= 0).all()
    assert np.bincount(ev).tolist() == packets["hops"].tolist()


_u16, _u32 = st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)


def _swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 6, 17, 58]), _u16, _u16, _u16, _u16, _u32), min_size=1, max_size=40),
       st.sampled_from([2, 4, 64, 1024]))
def test_the_sampling_mask_is_the_kernels_hash(rows, n):
    """contract.sampled_mask on the record's columns keeps the packets packet_hash() keeps
    (the kernel's values: ports, IP ID and sequence in network order)."""
    proto, sport, dport, ip_id, ip_len, seq = (np.array(c, dtype=np.int64) for c in zip(*rows))
    got = contract.sampled_mask(proto, sport, dport, ip_id, ip_len, seq, n)
    want = [contract.sampled_in(contract.packet_hash(int(p), _swap16(int(s)), _swap16(int(d)), _swap16(int(i)),
                                                     int(ln), int.from_bytes(int(q).to_bytes(4, "big"), "little")), n)
            for p, s, d, i, ln, q in rows]
    assert got.tolist() == want
    # powers of two nest: kept at 1 in 2n, kept at 1 in n
    assert not (contract.sampled_mask(proto, sport, dport, ip_id, ip_len, seq, 2 * n) & ~got).any()


def test_packets_seen_while_a_kernel_refused_events_are_partial():
    w = windows.from_observers({"node-1": (0, 10_000_000_000), "node-2": (0, 10_000_000_000)}, {"node-2": 1000},
                               {"node-2": [(3_000_000_000, 3_500_000_000)]})
    assert w.gaps == {"node-2": ((2_999_999_000, 3_499_999_000),)}
    assert windows.Window.from_json(w.as_json()) == w
    assert w.outside(3_200_000_000, 3_200_050_000) == windows.phrase(windows.REFUSING, ["node-2"])
    assert "node-2 refused or missed events" in w.outside(3_200_000_000, 3_200_050_000)
    assert w.outside(5_000_000_000, 5_000_050_000) is None
    mask = windows.partial_mask(np.array([3_200_000_000, 5_000_000_000]), np.array([3_200_050_000, 5_000_050_000]), w)
    assert mask.tolist() == [True, False]
    # last seen shortly before the gap began: its next hop, held in a queue, may have come in
    # the gap; long before it (more than EDGE_NS), not
    soon, long_before = 2_999_999_000 - 5_000_000, 2_999_999_000 - windows.EDGE_NS - 1_000_000
    assert w.outside(soon - 50_000, soon) == windows.phrase(windows.REFUSING, ["node-2"])
    assert w.outside(long_before - 50_000, long_before) is None
    mask = windows.partial_mask(np.array([soon - 50_000, long_before - 50_000]), np.array([soon, long_before]), w)
    assert mask.tolist() == [True, False]
    # a lost request inside the gap is partial, with the phrase, in the per-packet path too
    df, meta = busy_watch(pairs=20, lost=1)
    start = int(df["ts_ns"].min())
    meta["window"] = windows.Window({"node-1": (0, 10**12), "node-2": (0, 10**12)},
                                    {"node-2": ((start, start + 1_000_000),)}).as_json()
    packets = windows.apply(build_packets(df, analysis._flow_input(meta)), windows.from_meta(meta))
    first = min(packets, key=lambda p: p.first_ts_ns)
    assert first.verdict.status == "partial" and "refused or missed events" in first.verdict.hint
    assert windows.why_partial(packets) == windows.phrase(windows.REFUSING, ["node-2"])


@pytest.mark.parametrize("n", [1, 8])
def test_keep_sampled_keeps_what_every_node_kept(n):
    from tracer.runs.outcome import keep_sampled

    df, _ = busy_watch(pairs=200, lost=0)
    kept = keep_sampled(df, n)
    if n == 1:
        assert kept is df
    else:
        assert 0 < len(kept) < len(df)
        # whole packets (each has its own TCP sequence here): all its hops kept, or none
        full, part = df.groupby("tcp_seq").size(), kept.groupby("tcp_seq").size()
        assert (part == full[part.index]).all()


def test_a_busy_watch_with_nothing_failing_reads_as_a_watch_of_the_packets_counted():
    """No failing packet judged in full is no reason to say no packet was seen, and a watch
    follows every protocol: the header says so rather than the probes' protocol."""
    from types import SimpleNamespace

    from rich.console import Console

    from tracer import render
    from tracer.config import FlowConfig

    df, meta = busy_watch(lost=0)
    agg = busy.aggregate(df, meta, PODS[A][2]).doc
    ep = SimpleNamespace(as_json=lambda: {"kind": "pod", "pod": A, "ip": PODS[A][2]})
    result = SimpleNamespace(config=FlowConfig("pod-1-1", "pod-2-1", probe=False, duration=12), src=ep, dst=ep,
                             proto="icmp", port=None, notes=[], packets=[], aggregate=agg,
                             verdict=busy.verdict(agg, []), summary=busy.summary(agg, {}), probes=[],
                             timings={"startup_s": 1.0})
    con = Console(width=120, record=True, color_system=None, file=open("/dev/null", "w"))
    render.flow_compact(result, con)
    text = con.export_text()
    assert "[watching every protocol for 12 s]" in text and "[icmp]" not in text
    assert "no packet of this flow was seen" not in text
    assert f"{2 * PAIRS} packets" in text and "OK:" in text


def test_a_watch_that_saw_nothing_says_what_to_check():
    from tracer.reconstruct.verdict import watched_verdict

    doc = {"packets": 0, "delivered": 0, "partial": 0, "paths": []}
    for v in (watched_verdict([]), busy.verdict(doc, [])):
        assert v.status == "failed" and "no packet between them was seen" in v.summary
        assert "client is sending" in v.problems[0] and "--no-probe" in v.problems[0]


def test_a_nodes_sampling_raises_are_said_once_the_last():
    from tracer.runs.flow import last_raise_only

    logs = ["node-1: over the event budget (50000/s): now keeping 1 packet in 4", "something else",
            "node-1: over the event budget (50000/s): now keeping 1 packet in 32"]
    assert last_raise_only(logs) == logs[1:]
    assert last_raise_only(logs[1:2]) == logs[1:2] and last_raise_only([]) == []
