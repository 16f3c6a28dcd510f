"""Agents that get ready at different times, and per-node captures started at different
times: what only some observers saw is `partial`, never `lost`, and the flow verdict and its
summary give the same figures. Steady background traffic runs from inside a pod namespace;
node-2's agent attaches late (PODTRACE_TEST_AGENT_READY_DELAY, tracer/testhooks.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pandas as pd
import pytest

from tests.integration.lab_fixture import lab, ping, pod, service, tcp_ask, wait_until  # noqa: F401
from tests.integration.test_flow import ROOT, SCHEMA, wait_no_programs
from tracer import analysis
from tracer.analysis import merge
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow
from tests.conftest import subprocess_env, todays_share

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


@pytest.mark.parametrize("dst", todays_share(["pod-2-1", "svc/default/web"], 2))   # one a day
def test_late_agent_gives_partial_not_lost(lab, monkeypatch, tmp_path, dst):
    monkeypatch.setenv("PODTRACE_TEST_AGENT_READY_DELAY", f"node-2={LATE_S}")
    saved = tmp_path / "flow.parquet"
    with Traffic(lab):
        r = run_flow(FlowConfig(src="pod-1-1", dst=dst, probe=False, duration=3, mode="agents",
                                lab_prefix=lab["prefix"], save=str(saved)))
    statuses = Counter(p.verdict.status for p in r.packets)
    assert r.ok, (r.verdict, statuses)
    assert set(statuses) <= {"delivered", "partial"} and statuses["partial"] > 0, statuses
    # each names who was not tracing: node-2 (late) or every agent not up yet at the start,
    # the agents already stopping at the end
    hints = [p.verdict.hint for p in r.packets if p.verdict.status == "partial"]
    assert all(re.search(r"seen only while [^:]* (not yet|no longer) tracing", h) for h in hints), r.verdict
    assert any(re.search(r"seen only while [^:]*node-2[^:]* not yet tracing", h) for h in hints), r.verdict
    # the summary and the verdict give the same figures
    s = r.summary
    assert (s["packets"], s["delivered"], s["partial"]) == (len(r.packets), statuses["delivered"], statuses["partial"])
    assert r.verdict.summary.startswith(f"{s['delivered']}/{s['packets']} packets delivered ({s['partial']} partial: ")
    assert r.meta["window"]["observers"]["node-2"]["ready_ns"] == r.meta["window"]["start_ns"]
    jsonschema.validate(json.loads(json.dumps(r.as_json(), default=str)), SCHEMA)
    # offline, the saved flow gives the same verdicts
    t = analysis.load(str(saved))
    assert Counter(t.packets["status"].astype(str)) == statuses
    # dated by the reference agent's clock: the wall clock of now, not of the agent's boot
    assert abs(t.hops["time"].max() - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(minutes=2)
    wait_no_programs()


def _capture(lab, node, seconds, out):
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"])
    return subprocess.Popen([sys.executable, "-m", "tracer.cli", "capture", "--on-node", node, "-d", str(seconds),
                             "-w", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_per_node_captures_started_apart_analyze_without_false_loss(lab, tmp_path):
    a, b = tmp_path / "node-1.parquet", tmp_path / "node-2.parquet"
    with Traffic(lab):
        pa = _capture(lab, "node-1", 6, a)
        try:
            assert wait_until(lambda: Path(str(a) + ".part").exists() or pa.poll() is not None, 30)
            time.sleep(1)                     # node-1 records alone for a while
            pb = _capture(lab, "node-2", 3, b)
            out_b = pb.communicate(timeout=60)
        finally:
            out_a = pa.communicate(timeout=60)
    assert pa.returncode == 0 and pb.returncode == 0, (out_a, out_b)
    t = analysis.load([str(a), str(b)])
    s = t.summary()
    assert s["lost"] == 0 and s["dropped"] == 0 and s["partial"] > 0 and s["delivered"] > 0, s
    w = t.meta["window"]["observers"]
    assert w["node-2"]["ready_ns"] > w["node-1"]["ready_ns"] and w["node-2"]["stop_ns"] < w["node-1"]["stop_ns"]
    # the same files read without their windows: the gaps were losses
    events, meta = merge.load_many([a, b])
    meta.pop("window")
    assert analysis.analyse(events, meta, "capture").summary()["lost"] > 0
    res = subprocess.run([sys.executable, "-m", "tracer.cli", "analyze", str(a), str(b), "-o", "json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["summary"] == json.loads(json.dumps(s))
    wait_no_programs()
