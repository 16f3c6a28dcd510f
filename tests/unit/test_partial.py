"""Partial views: packets seen while an observer on their path was not yet, or no longer,
tracing are `partial` (never `lost`, never a failure), in the live flow, in a saved flow and
in a capture analysed offline; the flow verdict and the summary always give the same figures."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bench.analysis import N2, PODS, synth_flow
from tracer import analysis, testhooks
from tracer.agents import coordinator
from tracer.kernel import record
from tracer.reconstruct import diagnose, window as windows
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import FiveTuple, Hop, Packet, Verdict
from tracer.reconstruct.packets import build_packets

A, B = "default/pod-1-1", "default/pod-2-1"
BASE = 5_000_000_000            # synth_flow's first probe; one probe every 50 ms
NODE2 = [PODS[B][0], N2]        # node-2's namespaces: its agent's view


def watched_flow(late_node2: bool):
    """Three request/reply pairs of watched traffic (no probes). With late_node2, node-2's
    agent got ready only between the first and the second pair: the first pair's events on
    node-2 are not in the trace."""
    arr, meta = synth_flow(probes=3)
    meta.update(probes=[], probing=False)
    spans = {"node-1": (BASE - 10_000_000, BASE + 10_000_000_000), "node-2": (BASE, BASE + 10_000_000_000)}
    if late_node2:
        spans["node-2"] = (BASE + 25_000_000, BASE + 10_000_000_000)
        arr = arr[~(np.isin(arr["netns"], NODE2) & (arr["ts_ns"] < BASE + 25_000_000))]
    meta["window"] = windows.Window(spans).as_json()
    return arr, meta


def live(arr, meta):
    """What `finish` does with an agents trace: build, judge, apply the window."""
    fi = analysis._flow_input(meta)
    packets = diagnose.judge(build_packets(record.to_frame(arr), fi), Evidence())
    return windows.apply(packets, windows.from_meta(meta)), fi


def test_window_is_latest_ready_to_earliest_stop_on_the_reference_clock():
    w = windows.from_observers({"node-1": (100, 900), "node-2": (5_000, 700_000_000)}, {"node-2": 4_000})
    assert (w.start_ns, w.end_ns) == (1_000, 900)
    assert w.spans == {"node-1": (100, 900), "node-2": (1_000, 699_996_000)}
    assert windows.Window.from_json(w.as_json()) == w
    assert windows.from_observers({"node-1": (1, 2)}, {}) is None      # one observer: no gap possible
    w = windows.Window({"node-1": (0, 10_000_000_000), "node-2": (1_000_000_000, 10_000_000_000)})
    assert w.outside(500_000_000, 500_010_000) == "seen only while node-2 was not yet tracing"
    assert w.outside(5_000_000_000, 5_000_010_000) is None
    assert w.outside(9_900_000_000, 9_900_010_000) == "seen only while node-1 was no longer tracing"
    assert w.outside(10_100_000_000, 10_100_000_000) == "seen only while node-1, node-2 were no longer tracing"


def test_late_agent_partial_not_lost_and_the_verdict_is_ok():
    arr, meta = watched_flow(late_node2=True)
    packets, fi = live(arr, meta)
    first = [p for p in packets if p.first_ts_ns < BASE + 25_000_000]
    assert [(p.direction, p.verdict.status) for p in first] == [("request", "partial"), ("reply", "delivered")]
    v = first[0].verdict
    assert (v.node, v.cause, v.reason) == (None, None, None)      # last seen on the fabric
    assert "seen only while node-2 was not yet tracing" in v.hint and v.runbook == windows.RUNBOOK
    assert all(p.verdict.status == "delivered" for p in packets if p not in first)
    verdict, _ = verdicts.flow_verdict(packets, fi, False)
    assert verdict.status == "ok"
    assert verdict.summary == "5/6 packets delivered (1 partial: seen only while node-2 was not yet tracing)"
    s = verdicts.summary(packets, [], {}, probing=False)
    assert (s["packets"], s["delivered"], s["partial"]) == (6, 5, 1)


def test_without_the_window_the_same_trace_was_a_false_loss():
    arr, meta = watched_flow(late_node2=True)
    fi = analysis._flow_input(meta)
    packets = diagnose.judge(build_packets(record.to_frame(arr), fi), Evidence())
    assert [p.verdict.status for p in packets].count("lost") == 1
    assert verdicts.flow_verdict(packets, fi, False)[0].status == "failed"


def test_a_loss_inside_the_window_stays_lost_and_a_drop_stays_dropped():
    arr, meta = watched_flow(late_node2=False)
    # the second request vanishes after the fabric while both nodes trace: a real loss
    t2 = BASE + 50_000_000
    arr = arr[~(np.isin(arr["netns"], NODE2) & (arr["ts_ns"] >= t2) & (arr["ts_ns"] < t2 + 100_000))]
    packets, fi = live(arr, meta)
    assert [p.verdict.status for p in packets].count("lost") == 1
    verdict, _ = verdicts.flow_verdict(packets, fi, False)
    assert verdict.status == "failed" and verdict.summary == "5/6 packets delivered"
    assert verdict.problems == ("request lost at fabric/n2",)
    darr, dmeta = synth_flow(probes=1, drop_requests=True)
    dmeta["window"] = windows.Window({"node-1": (BASE, None), "node-2": (BASE + 1_000_000_000, None)}).as_json()
    (p,), _ = live(darr, dmeta)
    assert p.verdict.status == "dropped"           # a drop was observed: never partial


def test_saved_and_captured_analysis_give_the_live_partial_verdicts():
    arr, meta = watched_flow(late_node2=True)
    packets, _ = live(arr, meta)
    frame = record.to_frame(arr)
    for mode in ("flow", "capture"):
        t = analysis.analyse(frame, dict(meta), mode=mode)
        got = sorted(zip(t.packets["first_ts_ns"].astype(int), t.packets["status"].astype(str)))
        assert got == sorted((p.first_ts_ns, p.verdict.status) for p in packets), mode
        assert t.summary()["partial"] == 1 and t.summary()["lost"] == 0
        assert t.flows["partial"].sum() == 1
    # without the window (an older file), the offline answer is the old one
    t = analysis.analyse(frame, {k: v for k, v in meta.items() if k != "window"}, mode="capture")
    assert t.summary()["lost"] == 1 and t.summary()["partial"] == 0


def test_partial_request_of_an_answered_probe_counts_as_delivered():
    arr, meta = synth_flow(probes=1)
    arr = arr[~(np.isin(arr["netns"], NODE2) & (arr["ip_id"] != 0))]   # the request on node-2
    meta["window"] = windows.Window({"node-1": (0, None), "node-2": (BASE + 1_000_000_000, None)}).as_json()
    packets, fi = live(arr, meta)
    assert packets[0].verdict.status == "partial"
    verdict, _ = verdicts.flow_verdict(packets, fi, True)
    assert verdict.status == "ok" and verdict.summary == "1/1 delivered, 1/1 answered"


def test_agent_spans_from_ready_and_drained_frames_or_the_first_clock_reading():
    runs = [coordinator.AgentRun(coordinator.AgentPlan(n, {})) for n in ("node-1", "node-2", "node-3")]
    runs[0].ready, runs[0].ready_ns, runs[0].stop_ns = True, 10, 90
    runs[1].ready, runs[1].clocks = True, [{"monotonic_ns": 20, "realtime_ns": 5}]   # an older agent
    assert coordinator.spans(runs) == {"node-1": (10, 90), "node-2": (20, None)}   # node-3 never ready


def test_ready_delay_switch_reaches_only_that_agent(monkeypatch):
    monkeypatch.setenv("PODTRACE_TEST_AGENT_READY_DELAY", "node-2=1.5")
    assert testhooks.agent_env() == {"node-2": {"PODTRACE_AGENT_START_DELAY_S": "1.5"}}
    monkeypatch.setenv("PODTRACE_AGENT_START_DELAY_S", "1.5")
    assert testhooks.agent_start_delay() == 1.5
    monkeypatch.delenv("PODTRACE_AGENT_START_DELAY_S")
    assert testhooks.agent_start_delay() == 0


STATUS = st.sampled_from(["delivered", "dropped", "lost", "partial"])


def _packet(i: int, status: str, direction: str) -> Packet:
    hop = Hop("node-1", None, "eth0", "tx", "10.244.1.2", "10.244.2.2")
    v = Verdict(status, "node-1", "eth0", "tx", hint="Last seen on node-1 (eth0); seen only while node-2 "
                "was not yet tracing: a gap in the trace, not a loss." if status == "partial" else None)
    return Packet(direction, None, FiveTuple("icmp", "10.244.1.2", "10.244.2.2", None, None), i, 84, True,
                  i * 1000, None, (hop,), v)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(STATUS, st.sampled_from(["request", "reply"])), max_size=30))
def test_summary_and_verdict_always_agree(items):
    packets = [_packet(i, s, d) for i, (s, d) in enumerate(items)]
    fi = analysis._flow_input(synth_flow(probes=1)[1])
    verdict, _ = verdicts.flow_verdict(packets, fi, False)
    s = verdicts.summary(packets, [], {}, probing=False)
    n, ok, part = s["packets"], s["delivered"], s["partial"]
    assert n == len(packets) and ok + part + s["failed"] == n
    if n:
        assert verdict.summary.startswith(f"{ok}/{n} packets delivered")
        assert (f"({part} partial: " in verdict.summary) == (part > 0)
    assert (verdict.status == "ok") == (n - part > 0 and ok == n - part)
    # partial packets never make a flow fail: taking them out changes nothing
    whole = [p for p in packets if p.verdict.status != "partial"]
    if whole:
        assert verdicts.flow_verdict(whole, fi, False)[0].status == verdict.status


@pytest.mark.parametrize("status", ["delivered", "dropped", "lost", "partial"])
def test_schema_and_statuses_know_every_status(status):
    import json
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[2] / "tracer/schema/flow.schema.json").read_text())
    assert status in schema["$defs"]["packet_verdict"]["properties"]["status"]["enum"]
    assert status in analysis.STATUSES


def _per_node_files(tmp_path, late_node2: bool):
    """The watched flow as two captures, one per node (node-1 with the fabric, node-2), each
    with its own observation window; node-2's started 25 ms late when late_node2."""
    from bench.analysis import FABRIC, N1
    from bench.analysis import meta as capture_meta
    from tracer import tracefile

    arr, _ = watched_flow(late_node2)
    start2 = BASE + 25_000_000 if late_node2 else BASE - 10_000_000
    out = []
    for name, nss, start in (("node-1", [N1, FABRIC, PODS[A][0]], BASE - 10_000_000), ("node-2", NODE2, start2)):
        part = arr[np.isin(arr["netns"], nss)]
        m = dict(capture_meta(), observer=name,
                 window=windows.Window({name: (start, BASE + 10_000_000_000)}).as_json())
        out.append(tracefile.save(tmp_path / f"{name}.parquet", record.to_frame(part), m))
    return out


def test_per_node_captures_started_apart_give_partial_not_lost(tmp_path):
    files = _per_node_files(tmp_path, late_node2=True)
    t = analysis.load([str(f) for f in files])
    s = t.summary()
    assert (s["packets"], s["delivered"], s["partial"], s["lost"]) == (6, 5, 1, 0), s
    assert t.meta["window"]["observers"]["node-2"]["ready_ns"] == BASE + 25_000_000
    part = t.packets[t.packets["status"] == "partial"].iloc[0]
    assert part["hint"] == ("Last seen on the fabric (n2); seen only while node-2 was not yet tracing: "
                            "a gap in the trace, not a loss.") and part["runbook"] == windows.RUNBOOK
    # a directory and a glob name the same two files
    assert analysis.load(str(tmp_path)).summary() == s
    assert analysis.load(str(tmp_path / "node-*.parquet")).summary() == s
    # read without their windows (files of before), the gap was a loss
    from tracer.analysis import merge

    events, meta = merge.load_many(files)
    meta.pop("window")
    assert analysis.analyse(events, meta, "capture").summary()["lost"] == 1


def test_per_node_captures_together_equal_one_capture(tmp_path):
    files = _per_node_files(tmp_path, late_node2=False)
    t = analysis.load([str(f) for f in files])
    arr, meta = watched_flow(late_node2=False)
    one = analysis.analyse(record.to_frame(arr), dict(meta, kind="capture"), "capture")
    assert t.summary()["delivered"] == one.summary()["delivered"] == 6
    assert list(t.packets["status"].astype(str)) == list(one.packets["status"].astype(str))
