"""`flow` against a Kubernetes API (a fake one speaking list/watch): names resolve through
the API, and the agents are looked up as DaemonSet pods on the nodes involved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fakeapi import FakeApi
from tests.integration.lab_fixture import lab  # noqa: F401
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def run(args, env):
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


def test_flow_resolves_through_the_api_and_needs_agent_pods(lab, tmp_path):
    with FakeApi.from_lab(lab["prefix"]) as api:
        kc = api.write_kubeconfig(tmp_path / "kubeconfig")
        env = subprocess_env(PODTRACE_LAB_PREFIX="pttest-none")   # no lab: the API is the only source
        # a name the API does not know: bad input, with close matches from the API
        res = run(["flow", "pod-1-1", "pod-2-9", "--kubeconfig", str(kc)], env)
        assert res.returncode == 2, res.stderr
        assert "pod-2-9" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        # known names: resolved by the API; tracing needs the agent DaemonSet, which this API lacks
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", str(kc)], env)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "no running podtrace agent on node node-1" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_bad_context_is_bad_input(lab, tmp_path):
    with FakeApi.from_lab(lab["prefix"]) as api:
        kc = api.write_kubeconfig(tmp_path / "kubeconfig")
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", str(kc), "--context", "nope"],
                  subprocess_env(PODTRACE_LAB_PREFIX="pttest-none"))
        assert res.returncode == 2, res.stderr
        assert "nope" in res.stderr
