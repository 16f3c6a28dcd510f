"""Agents that get ready at different times, and per-node captures started at different
times: what only some observers saw is `partial`, never `lost`, and the flow verdict and its
summary give the same figures. Steady background traffic runs from inside a pod namespace;
node-2's agent attaches late (PODTRACE_TEST_AGENT_READY_DELAY, tracer/testhooks.py)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import pytest

from tests.integration.lab_fixture import lab, ping, pod, service, tcp_ask  # noqa: F401
from tests.integration.test_flow import wait_no_programs
from tracer import analysis
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow

LATE_S = 2


class Traffic:
    """ICMP pod-1-1 → pod-2-1 and TCP pod-1-1 → the web Service, every 50 ms, until stopped."""

    def __init__(self, lab):
        self.src = pod(lab, "pod-1-1")["netns"]
        self.peer = pod(lab, "pod-2-1")["ip"]
        self.vip = service(lab, "web")["cluster_ip"]
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            ping(self.src, self.peer, timeout=0.3, seq=i & 0xFFFF)
            try:
                tcp_ask(self.src, self.vip, 80, timeout=0.3)
            except OSError:
                pass
            self.stop.wait(0.05)

    def __enter__(self):
        self.th.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join(5)
        return False


@pytest.mark.parametrize("dst", ["pod-2-1", "svc/default/web"])
def test_late_agent_gives_partial_not_lost(lab, monkeypatch, tmp_path, dst):
    monkeypatch.setenv("PODTRACE_TEST_AGENT_READY_DELAY", f"node-2={LATE_S}")
    saved = tmp_path / "flow.parquet"
    with Traffic(lab):
        r = run_flow(FlowConfig(src="pod-1-1", dst=dst, probe=False, duration=3, mode="agents",
                                lab_prefix=lab["prefix"], save=str(saved)))
    statuses = Counter(p.verdict.status for p in r.packets)
    assert r.ok, (r.verdict, statuses)
    assert set(statuses) <= {"delivered", "partial"} and statuses["partial"] > 0, statuses
    # each names who was not tracing yet: node-2 (late), or every agent that was not up yet
    assert all(re.search(r"seen only while [^:]*node-2[^:]* not yet tracing", p.verdict.hint)
               for p in r.packets if p.verdict.status == "partial"), r.verdict
    # the summary and the verdict give the same figures
    s = r.summary
    assert (s["packets"], s["delivered"], s["partial"]) == (len(r.packets), statuses["delivered"], statuses["partial"])
    assert r.verdict.summary.startswith(f"{s['delivered']}/{s['packets']} packets delivered ({s['partial']} partial: ")
    assert r.meta["window"]["observers"]["node-2"]["ready_ns"] == r.meta["window"]["start_ns"]
    # offline, the saved flow gives the same verdicts
    t = analysis.load(str(saved))
    assert Counter(t.packets["status"].astype(str)) == statuses
    wait_no_programs()
