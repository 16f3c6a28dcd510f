"""Names and options on the lab, as a user types them: `--prefix` wins over
PODTRACE_LAB_PREFIX, kubectl-style names (svc/NAME, node/NAME) with cross-kind suggestions,
`-w` writing the trace file, and `analyze` of a saved TCP Service flow showing the backend
on its own port (8080), not the Service's (80)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env
from tests.integration.lab_fixture import lab  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[2]
ELSEWHERE = "ptnolabhere"   # what the environment names: no lab of that name is up


def cli(*args, timeout=60) -> subprocess.CompletedProcess:
    env = subprocess_env(PODTRACE_LAB_PREFIX=ELSEWHERE)
    env.pop("PODTRACE_FLOW_MODE", None)      # the product's default mode
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_prefix_option_wins_over_the_environment(lab):
    res = cli("lab", "status", "--prefix", lab["prefix"], "-o", "json")
    assert res.returncode == 0, res.stderr
    assert {p["name"] for p in json.loads(res.stdout)["pods"]} >= {"pod-1-1", "pod-2-2"}
    res = cli("lab", "status")
    assert res.returncode == 1 and f"podtrace lab --prefix {ELSEWHERE} up" in res.stderr


def test_names_suggest_across_kinds_on_the_lab(lab):
    node = lab["pods"][-1]["node"]
    res = cli("flow", "pod-1-1", node, "--prefix", lab["prefix"])
    assert res.returncode == 2
    assert res.stderr == f"podtrace: no pod default/{node}; did you mean node/{node}?\n"
    res = cli("flow", "pod-1-1", "web", "--prefix", lab["prefix"])
    assert res.returncode == 2
    assert res.stderr == "podtrace: no pod default/web; did you mean svc/default/web?\n"


def test_svc_name_written_with_w_then_analyzed(lab, tmp_path):
    f = tmp_path / "svc.parquet"
    res = cli("flow", "pod-1-1", "svc/web", "--prefix", lab["prefix"], "-w", str(f),
              "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dst"]["service"] == "default/web" and doc["probe"]["port"] == 80
    assert f.is_file()
    res = cli("analyze", str(f), "-o", "json")
    assert res.returncode == 0, res.stderr
    flows = [x for x in json.loads(res.stdout)["flows"] if x["service"] == "default/web"]
    assert flows and all(x["dport"] == 80 and x["dst_pod_port"] == 8080 and x["dst_pod"] for x in flows)
    res = cli("analyze", str(f))
    rows = [r for r in res.stdout.splitlines() if "default/web" in r]
    assert rows and all(f"{flows[0]['dst_pod']}:8080" in r and "default/web:80" in r for r in rows), res.stdout
