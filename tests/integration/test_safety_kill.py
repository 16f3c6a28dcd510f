"""`flow` interrupted at every stage by SIGINT (Ctrl-C: the whole process group), SIGTERM
(`kill PID`: the coordinator only) and SIGKILL (the whole group, then `podtrace cleanup`):
afterwards nothing of ours remains — BPF programs, tc filters, the clsact qdiscs we added,
agent processes, `*.part` files of --save — and a --save file is complete or absent.

The stages are reached with tracer/testhooks.py: PODTRACE_TEST_PAUSE=STAGE makes the process
that reaches STAGE drop a marker file and sleep there, so the signal lands exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.test_safety_common import (
    alive, bpf_objects, bpf_objects_held_by, cli, descendants, one_line_error, our_filters, popen,
    safe_lab, tc_snapshot, wait_until,  # noqa: F401  (fixture)
)
from tracer import tracefile

STAGES = ["loaded", "attaching", "probing", "reconstructing", "saving"]
KERNEL_STAGES = {"loaded", "attaching", "probing"}     # BPF objects exist at these


def _start(tmp_path, stage: str, pause_s: float = 3.0):
    marks = tmp_path / "marks"
    marks.mkdir()
    save = tmp_path / "trace.parquet"
    proc = popen("flow", "pod-1-1", "pod-2-1", "--count", "2", "--timeout", "0.5", "--save", str(save),
                 PODTRACE_TEST_PAUSE=stage, PODTRACE_TEST_PAUSE_DIR=str(marks), PODTRACE_TEST_PAUSE_S=str(pause_s))
    deadline = time.monotonic() + 45
    while not any(marks.iterdir()):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"flow ended (exit {proc.returncode}) before reaching {stage}: {err or out}")
        assert time.monotonic() < deadline, f"flow never reached {stage}"
        time.sleep(0.02)
    return proc, save


def _signal(proc: subprocess.Popen, sig: str) -> None:
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)       # Ctrl-C: the terminal signals the whole group
    elif sig == "SIGTERM":
        proc.send_signal(signal.SIGTERM)         # `kill PID`: the coordinator alone
    else:
        os.killpg(proc.pid, signal.SIGKILL)      # everything at once: nobody can clean up


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_flow_leaves_nothing(safe_lab, tmp_path, stage, sig):
    before = tc_snapshot(safe_lab)
    assert not our_filters(before), f"filters of ours before the test: {our_filters(before)}"
    proc, save = _start(tmp_path, stage)
    try:
        tree = descendants(proc.pid)
        held = bpf_objects_held_by(tree)
        if stage in KERNEL_STAGES:
            assert held, f"no BPF object open at stage {stage}: the test would prove nothing"
        _signal(proc, sig)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Every process of the run ends: coordinator and agents (and the probes live in them).
    assert wait_until(lambda: not any(alive(p) for p in tree), 20), \
        f"still running after {sig}: {[p for p in tree if alive(p)]}"
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        res = cli("cleanup")
        assert res.returncode == 0, res.stderr
    else:
        assert "Traceback" not in err, err
        if proc.returncode != 0:     # it may also have finished just before the signal
            assert proc.returncode in (3, 130, 1), (proc.returncode, err)
            assert len(err.strip().splitlines()) <= 1, err
    # Nothing of ours in the kernel: the programs it held are freed, no filter or qdisc stays.
    assert wait_until(lambda: not (held & bpf_objects()), 10), f"BPF objects left: {held & bpf_objects()}"
    after = tc_snapshot(safe_lab)
    assert not our_filters(after), f"tc filters left: {our_filters(after)}"
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    # The trace file: complete, or absent; a half-written one is only ever a `.part`.
    if save.exists():
        df, meta = tracefile.load(save)
        assert meta["events"] == len(df)
    parts = list(tmp_path.glob("*.part"))
    if sig != "SIGKILL":
        assert parts == [], parts
    for part in parts:       # SIGKILL while saving: see test_sigkill_while_saving_leaves_no_part
        with pytest.raises(tracefile.TraceFileError):
            tracefile.load(part)


@pytest.mark.xfail(strict=True, reason="a SIGKILL while --save writes leaves FILE.part next to FILE; "
                   "`podtrace cleanup` does not know where it is (the path is not recorded under /run/podtrace)")
def test_sigkill_while_saving_leaves_no_part(safe_lab, tmp_path):
    proc, save = _start(tmp_path, "saving")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
    assert cli("cleanup").returncode == 0
    assert not save.exists()
    assert list(tmp_path.glob("*.part")) == []


def test_interrupt_message_is_one_line(safe_lab, tmp_path):
    """Ctrl-C says what happened in one line and exits 130."""
    proc, _ = _start(tmp_path, "probing")
    _signal(proc, "SIGINT")
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 130, err
    line = one_line_error(subprocess.CompletedProcess([], 130, out, err), 130)
    assert "interrupted" in line
