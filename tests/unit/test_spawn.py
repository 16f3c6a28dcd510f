"""Agent processes started early (before `flow` resolves): the transport hands them out in
order, those not taken are killed once every agent has started, and an agent whose
coordinator goes away before sending a request leaves quietly. Real processes."""

from __future__ import annotations

import os

from tracer.agents import coordinator, spawn
from tracer.cluster import sources, topology


def test_early_agents_are_taken_in_order_and_the_rest_killed():
    early = spawn.Early(2)
    first, second = early.procs
    transport = coordinator.LocalTransport(early=early)
    try:
        got = transport.start(coordinator.AgentPlan("node-1", {}))
        assert got is first
        transport.started()
        assert second.wait(timeout=30) != 0 and early.procs == []     # killed: it was sent nothing
        got.stdin.close()                                                 # the coordinator goes away
        assert got.wait(timeout=60) == 0
        assert got.stdout.read() == b"" and got.stderr.read() == b"", "an agent never asked leaves quietly"
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()


def test_a_node_with_its_own_variables_gets_its_own_process():
    early = spawn.Early(1)
    transport = coordinator.LocalTransport({"node-2": {"PODTRACE_AGENT_START_DELAY_S": "0"}}, early)
    proc = transport.start(coordinator.AgentPlan("node-2", {}))
    try:
        assert proc not in early.procs and len(early.procs) == 1
    finally:
        early.close()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def test_the_lab_is_told_ahead_only_when_load_would_take_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert not sources.lab_ahead(None, None, None, "ptspawn"), "no lab up"
    path = topology.path_for("ptspawn")
    os.makedirs(path.parent)
    path.write_text("{}")
    assert sources.lab_ahead(None, None, None, "ptspawn")
    assert not sources.lab_ahead("c.json", None, None, "ptspawn")
    assert not sources.lab_ahead(None, "kc", None, "ptspawn")
    assert not sources.lab_ahead(None, None, None, "Bad Prefix!"), "load says what is wrong"
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("")
    assert not sources.lab_ahead(None, None, None, "ptspawn"), "a kubeconfig: the cluster's agents"
