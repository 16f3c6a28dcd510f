"""Every benchmark in bench/ runs in its --quick mode and prints one JSON object with the
keys its documentation (docs/performance.md) reads. The numbers are not judged here: on a
shared 2-vCPU machine they say nothing about pass or fail.

The lab benchmarks use their own lab (`ptbench-smoke`), brought up by the first of them
and removed at the end; one of them runs each day, in turn (tests/conftest.py todays_share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.lab import build
from tests.conftest import subprocess_env, todays_share

REPO = Path(__file__).resolve().parents[2]
PREFIX = "ptbench-smoke"


@pytest.fixture(scope="module")
def bench_lab():
    build.down(PREFIX)
    try:
        yield PREFIX
    finally:
        build.down(PREFIX)


def run_bench(name: str, *args: str, prefix: str | None = None, timeout: float = 240) -> dict:
    env = subprocess_env(PYTHONPATH=str(REPO))
    if prefix:
        env["PODTRACE_LAB_PREFIX"] = prefix
    p = subprocess.run([sys.executable, str(REPO / "bench" / name), "--quick", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{name} failed:\n{p.stderr[-3000:]}"
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name} should print one JSON line, printed:\n{p.stdout[-2000:]}"
    return json.loads(lines[0])


def _spread(d: dict) -> None:
    assert set(d) == {"median", "min", "max", "n"}


def test_reconstruct_quick():
    doc = run_bench("reconstruct.py")
    assert doc["benchmark"] == "reconstruct"
    assert len(doc["sizes"]) == 2 and doc["growth"]
    for row in doc["sizes"]:
        for key in ("events", "decode_s", "assign_s", "vectorised_s", "analyse_s", "packets", "events_per_s"):
            assert key in row
    assert {"assign_plus_vectorised_s", "decode_plus_analyse_s"} <= set(doc["largest"])


def test_multinode_quick():
    doc = run_bench("multinode.py")
    assert doc["benchmark"] == "multi-node analysis.load(DIR)"
    assert doc["files"] == 4 and doc["partitions"] > 1
    for key in ("events", "packets", "flows", "load_s", "peak_rss_mib", "write_s", "files_mib"):
        assert key in doc
    assert doc["delivered"] + doc["dropped"] + doc["lost"] == doc["packets"]


def test_datapath_quick(bench_lab):
    doc = run_bench("datapath.py", prefix=bench_lab)
    assert doc["benchmark"] == "datapath"
    assert set(doc["variants"]) == {"untraced", "nomatch", "match"}
    for v in doc["variants"].values():
        _spread(v["tcp_gbps"])
        _spread(v["udp_recv_pps"])
    for v in ("nomatch", "match"):
        _spread(doc["variants"][v]["tcp_ratio"])
        assert "udp_events_lost" in doc["variants"][v]
    assert doc["variants"]["match"]["udp_events"] > 0      # the matching filter saw the flow
    assert doc["variants"]["nomatch"]["udp_events"] == 0   # the other one did not
    assert set(doc["verdict"]) == {"nomatch_tcp_ratio", "nomatch_udp_pps_ratio", "match_udp_pps_ratio",
                                   "match_events_lost"}


def test_pipeline_quick(bench_lab):
    doc = run_bench("pipeline.py", prefix=bench_lab)
    assert doc["benchmark"] == "pipeline"
    assert set(doc["drain"]) == {"sink", "callback", "ctypes"}
    for d in doc["drain"].values():
        _spread(d["events_per_s"])
        assert d["mismatches"] == []      # every emitted event reached the DataFrame
    for lv in doc["live"].values():
        assert lv["steps"] and "max_zero_loss_events_per_s" in lv
    assert {"sink_drain_events_per_s", "sink_vs_ctypes", "callback_drain_events_per_s",
            "sink_vs_callback"} <= set(doc["verdict"])


def test_startup_quick(bench_lab):
    doc = run_bench("startup.py", prefix=bench_lab)
    assert doc["benchmark"] == "startup"
    for m in ("agents", "single"):
        mode = doc["modes"][m]
        assert mode["errors"] == []
        _spread(mode["ready_s"])
        _spread(mode["flow_s"])
        assert "startup_s" in mode["breakdown_median_s"]
    assert "compile_s" in doc["modes"]["single"]["breakdown_median_s"]
    assert {"import_bcc_s", "btf_offsets_fresh_process_s", "tc_attach_s"} <= set(doc["components"])


def test_memory_quick(bench_lab):
    doc = run_bench("memory.py", prefix=bench_lab)
    assert doc["benchmark"] == "memory"
    for m in ("agents", "single"):
        assert doc["flow"][m]["coordinator_peak_mib"] > 0
    assert doc["flow"]["agents"]["agents"] >= 2
    cap = doc["capture"]
    assert cap["exit"] == 0 and cap["events"] > 0
    assert "rss_samples_mib" in cap and "rss_slope_mib_per_min_all" in cap


def test_resolve_small():
    """The resolve figures, among them the close-match time the unit tests leave to bench/."""
    p = subprocess.run([sys.executable, str(REPO / "bench" / "resolve.py"), "--pods", "500", "--services", "50",
                        "--nodes", "10", "--samples", "20"], cwd=REPO, env=subprocess_env(PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["inventory"]["pods"] == 500
    assert doc["unknown_name_with_suggestions_ms"] > 0
    assert set(doc["resolve"]) >= {"ns/pod", "svc/ns/name", "pod ip", "unknown ip"}


# Today's share of the lab benchmarks; the others are not collected (as the scenario rotations).
for _name in {"datapath", "pipeline", "startup", "memory"} - set(todays_share(["datapath", "pipeline", "startup",
                                                                                "memory"], 4)):
    del globals()[f"test_{_name}_quick"]
