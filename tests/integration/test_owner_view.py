"""A bare IP's owner node on a real lab: traced when it can be, and, when its agent dies, a
`partial` verdict saying there is no view beyond the last node (never `lost` there).

The lab has its own prefix; `pod-ip-gone` is broken once for the module and always fixed."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.lab_fixture import pod, private_lab
from tests.integration.test_diagnose_scenarios import live_verdicts, offline_verdicts
from tests.unit.test_engine import _paths as paths
from tracer import analysis
from tracer.lab import scenarios
from tests.conftest import subprocess_env

pytestmark = pytest.mark.integration

PREFIX = os.environ.get("PODTRACE_TEST_LAB_PREFIX", "pttest") + "ow"


@pytest.fixture(scope="module")
def gone():
    with private_lab(PREFIX) as doc:
        scenarios.break_scenario("pod-ip-gone", prefix=PREFIX)
        try:
            yield doc, pod(doc, "pod-2-2")["ip"]
        finally:
            scenarios.fix_scenario("pod-ip-gone", prefix=PREFIX)


def _cli(*args, **env):
    from tests.integration.test_diagnose_scenarios import ROOT
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(PODTRACE_LAB_PREFIX=PREFIX, **env), timeout=120, cwd=ROOT)


@pytest.mark.parametrize("mode", ["agents", "single"])
def test_a_bare_ip_is_traced_on_its_owner_node(gone, mode):
    _, ip = gone
    res = _cli("flow", "pod-1-1", ip, "--count", "2", "--timeout", "0.6", "-o", "json",
               PODTRACE_FLOW_MODE=mode)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr
    doc = json.loads(res.stdout)
    assert doc["dst"]["pod"] is None and doc["dst"]["owner"] == "node-2"
    reqs = [p["verdict"] for p in doc["packets"] if p["direction"] == "request"]
    assert reqs and all(v["node"] == "node-2" and v["status"] in ("lost", "dropped") for v in reqs), reqs
    assert all(v.get("cause") == "neighbour-missing" or v.get("reason") == "NEIGH_FAILED" for v in reqs), reqs


def test_an_owner_whose_agent_died_gives_no_view_beyond_node_1(gone, tmp_path):
    _, ip = gone
    saved = tmp_path / "flow.parquet"
    res = _cli("flow", "pod-1-1", ip, "--count", "2", "--timeout", "0.6", "-o", "json", "--save", str(saved),
               PODTRACE_FLOW_MODE="agents", PODTRACE_TEST_AGENT_DIE="node-2")
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr
    doc = json.loads(res.stdout)
    reqs = [p["verdict"] for p in doc["packets"] if p["direction"] == "request"]
    assert len(reqs) == 2, reqs
    for v in reqs:
        assert (v["status"], v["node"], v["dev"], v.get("cause")) == ("partial", "node-1", "eth0", None), v
        assert v["hint"].startswith("No view beyond node-1: the packet left towards 172.30.0.12 (node-2, "
                                    "not traced: its agent "), v
        assert v["evidence"]["view"]["towards_node"] == "node-2"
    problems = doc["verdict"]["problems"]
    assert "probe 1: request left node-1 towards 172.30.0.12 (node-2): not traced" in problems[0]
    assert any(p.startswith("probe 1: no view beyond node-1") for p in problems), problems
    assert not any(" lost at node-1" in p or "partial at" in p for p in problems), problems
    # offline: the saved flow and the engine's fast path say the same
    assert offline_verdicts(saved) == live_verdicts(doc)
    per_packet = paths(analysis.load(saved))
    assert per_packet and paths(analysis.load(saved, mode="capture"), set(per_packet)) == per_packet
