"""Agent processes started early (before `flow` resolves): the transport hands them out in
order, those not taken are killed once every agent has started, and an agent whose
coordinator goes away before sending a request leaves quietly. Real processes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tracer.agents import coordinator, spawn
from tracer.cluster import sources, topology

REPO = pathlib.Path(__file__).resolve().parents[2]


def _alone(case: str) -> None:
    """Run `case` of this module in a fresh interpreter: one thread, as `flow` has when it
    starts its agents (a test run may have left threads of its own here)."""
    res = subprocess.run([sys.executable, "-c", f"import tests.unit.test_spawn as t; t.{case}()"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]


def test_early_agents_are_taken_in_order_and_the_rest_killed():
    _alone("_taken_in_order")


def _taken_in_order():
    early = spawn.Early(2)
    assert early.forked, "one thread here: the agents are forked from this process"
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


def test_with_another_thread_running_each_early_agent_is_its_own_interpreter():
    """A fork beside a running thread could copy a lock it holds: then agents are started."""
    import threading

    done = threading.Event()
    t = threading.Thread(target=done.wait)
    t.start()
    try:
        early = spawn.Early(1)
    finally:
        done.set()
        t.join()
    try:
        assert not early.forked and len(early.procs) == 1
        proc = early.take()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0 and proc.stdout.read() == b""
    finally:
        early.close()


def test_a_forked_agent_serves_a_request_and_ends_with_its_status():
    """A forked agent reads its request on its own stdin, answers on its own stdout, and the
    coordinator gets its exit status (here: a bad request, exit 2, one error frame)."""
    _alone("_serves")


def _serves():
    from tracer.agents import wire

    early = spawn.Early(2)
    assert early.forked
    a, b = early.take(), early.take()
    try:
        # the end of b's stdin reaches b while a lives: a holds no pipe of its sibling's
        b.stdin.close()
        assert b.wait(timeout=60) == 0 and a.poll() is None
        a.stdin.write(b'{"version": 0}\n')
        a.stdin.close()
        frames = list(wire.read(a.stdout))
        assert [f.kind for f in frames] == ["error"] and "unsupported request" in frames[0].json()["message"]
        assert a.wait(timeout=60) == 2
    finally:
        for p in (a, b):
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
