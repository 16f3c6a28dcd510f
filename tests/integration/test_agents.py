"""Traces through one agent per lab node: the same coordinator and merge as in a cluster."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import todays_share
from tests.integration.lab_fixture import cli_argv, cli_env, lab, session_processes  # noqa: F401
from tests.integration.test_flow import wait_no_programs
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow


def path(p):
    return [(h.node, h.pod, h.dev, h.point) for h in p.hops]


def paths(r):
    return {(p.direction, p.seq): path(p) for p in r.packets}


@pytest.mark.parametrize("dst,proto,port", [("pod-2-1", "icmp", None), ("svc/default/web", "tcp", 80)])
def test_agents_equal_single_process(lab, dst, proto, port):
    kw = dict(src="pod-1-1", dst=dst, proto=proto, port=port, lab_prefix=lab["prefix"])
    said: dict[str, list[str]] = {"single": [], "agents": []}
    single = run_flow(FlowConfig(mode="single", **kw), progress=said["single"].append)
    agents = run_flow(FlowConfig(mode="agents", **kw), progress=said["agents"].append)
    assert single.ok and agents.ok, (single.verdict, agents.verdict)
    for mode, msgs in said.items():   # the live counter, one probe at a time, either way
        counts = [m for m in msgs if m.startswith("probes ")]
        assert counts == [f"probes {i}/3 sent, {i} answered" for i in (1, 2, 3)], (mode, msgs)
    assert paths(agents) == paths(single)
    assert agents.clock["same_clock"], "lab agents share one kernel clock"
    assert not agents.clock["offsets"]
    wait_no_programs()


# node-2's clock 7 ms ahead (an estimate from the packets alone), or 3 days ahead (nodes booted
# at different times: far beyond the pause that starts a new packet, so the agents' realtime
# readings must bring the clocks together before packets are cut)
@pytest.mark.parametrize("skew", todays_share([pytest.param(7_000_000, id="7ms"),       # one a day
                                               pytest.param(3 * 86400 * 10**9, id="3days")], 2))
def test_clock_offset_estimated_and_order_kept(lab, monkeypatch, skew):
    reference = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=5, mode="agents"))
    monkeypatch.setenv("PODTRACE_TEST_AGENT_SKEW", f"node-2={skew}")
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=5, mode="agents"))
    assert r.ok, r.verdict
    est = r.clock["offsets"]["node-2"]["offset_ns"]
    assert abs(est - skew) < 50_000, r.clock
    assert paths(r) == paths(reference)
    for p in r.packets:
        ts = [h.t_ns for h in p.hops]
        assert ts == sorted(ts)
        assert p.hops[-1].t_ns < 5_000_000, "cross-node latency must be corrected"


def test_agent_that_dies_is_named(lab, monkeypatch):
    monkeypatch.setenv("PODTRACE_TEST_AGENT_DIE", "node-2")
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1, timeout=0.5,
                            mode="agents"))
    assert r.verdict.status == "failed"
    assert any("node-2's view is missing" in p for p in r.verdict.problems), r.verdict
    monkeypatch.delenv("PODTRACE_TEST_AGENT_DIE")
    # the dead agent's tc filters are removed by the next run
    r2 = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1, mode="agents"))
    assert r2.ok, r2.verdict
    wait_no_programs()


@pytest.mark.parametrize("dst", ["pod-1-2", "pod-2-1"])
def test_the_command_leaves_no_agent_behind(lab, dst):
    """`flow` starts the lab's agent processes before it resolves the flow (three: both ends'
    nodes and the fabric); a flow within one node takes one of them and the others go. The
    command's session holds no process once it has answered."""
    proc = subprocess.Popen(cli_argv("flow", "pod-1-1", dst, "--count", "1", "-o", "json"), env=cli_env(lab["prefix"], PODTRACE_FLOW_MODE="agents"),
                            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    agents = json.loads(out)["timings"]["agent_start_s"]
    assert set(agents) == ({"node-1"} if dst == "pod-1-2" else {"node-1", "node-2", "fabric"})
    assert session_processes(proc.pid) == set()
