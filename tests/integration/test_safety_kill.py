"""`flow` interrupted at every stage by SIGINT (Ctrl-C: the whole process group), SIGTERM
(`kill PID`: the coordinator only) and SIGKILL (the whole group, then `podtrace cleanup`):
afterwards nothing of ours remains — BPF programs and maps, tc filters, the clsact qdiscs we
added, agent processes (they send the probes), `*.part` files of --save — and a --save file is
complete or absent, or (SIGKILL while it is written) salvaged by `cleanup` as
`FILE.incomplete.parquet`, which loads and is marked incomplete.

The stages are reached with tracer/testhooks.py: PODTRACE_TEST_PAUSE=STAGE makes the process
that reaches STAGE drop a marker file and sleep there, so the signal lands exactly there.
The 15 runs are independent: they go through three labs of their own at once, and each test
checks one run's record.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_safety_common import (
    _require_environment, alive, bpf_objects, bpf_objects_held_by, cli, descendants, our_filters, popen,
    tc_snapshot,
)
from tracer import tracefile
from tracer.lab import build
from tracer.lab import topology as T

STAGES = ["loaded", "attaching", "probing", "reconstructing", "saving"]
SIGNALS = ["SIGINT", "SIGTERM", "SIGKILL"]
KERNEL_STAGES = {"loaded", "attaching", "probing"}     # BPF objects exist at these
LANES = ["pttestsafek1", "pttestsafek2", "pttestsafek3"]


def _signal(proc: subprocess.Popen, sig: str) -> None:
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)       # Ctrl-C: the terminal signals the whole group
    elif sig == "SIGTERM":
        proc.send_signal(signal.SIGTERM)         # `kill PID`: the coordinator alone
    else:
        os.killpg(proc.pid, signal.SIGKILL)      # everything at once: nobody can clean up


def _scenario(lab: dict, d: Path, stage: str, sig: str) -> dict:
    """Run one interrupted flow on `lab` and record what is left afterwards."""
    rec: dict = {"before": tc_snapshot(lab)}
    marks, save = d / "marks", d / "trace.parquet"
    marks.mkdir(parents=True)
    proc = popen("flow", "pod-1-1", "pod-2-1", "--count", "1", "--timeout", "0.5", "--save", str(save),
                 prefix=lab["prefix"], PODTRACE_TEST_PAUSE=stage, PODTRACE_TEST_PAUSE_DIR=str(marks),
                 PODTRACE_TEST_PAUSE_S="1.5", PODTRACE_FLOW_MODE="agents")
    try:
        deadline = time.monotonic() + 60
        while not any(marks.iterdir()):
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "timeout")
                rec["never_reached"] = f"exit {proc.returncode}: {err or out}"
                return rec
            time.sleep(0.02)
        tree = descendants(proc.pid)
        rec["held"] = bpf_objects_held_by(tree)
        _signal(proc, sig)
        rec["out"], rec["err"] = proc.communicate(timeout=60)
        rec["rc"] = proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    end = time.monotonic() + 20
    while any(alive(p) for p in tree) and time.monotonic() < end:
        time.sleep(0.05)
    rec["alive"] = [p for p in tree if alive(p)]
    if sig == "SIGKILL":
        res = cli("cleanup", prefix=lab["prefix"])
        rec["cleanup"] = (res.returncode, res.stderr)
    end = time.monotonic() + 10
    while rec["held"] & bpf_objects() and time.monotonic() < end:
        time.sleep(0.1)
    rec["objects_left"] = rec["held"] & bpf_objects()
    rec["left_detail"] = [_describe(kind, i) for kind, i in sorted(rec["objects_left"])]
    rec["after"] = tc_snapshot(lab)
    rec["save"] = None
    if save.exists():
        try:
            df, meta = tracefile.load(save)
            rec["save"] = "complete" if meta["events"] == len(df) else "inconsistent"
        except tracefile.TraceFileError as exc:
            rec["save"] = f"unreadable: {exc}"
    rec["parts"] = sorted(p.name for p in d.glob("*.part*"))      # FILE.part, FILE.part.tmp
    rec["incomplete"] = {}
    for p in d.glob("*.incomplete*.parquet"):
        try:
            df, meta = tracefile.load(p)
            rec["incomplete"][p.name] = (meta.get("incomplete"), meta.get("events") == len(df), len(df),
                                         meta.get("incomplete_reason"))
        except tracefile.TraceFileError as exc:
            rec["incomplete"][p.name] = f"unreadable: {exc}"
    return rec


def _describe(kind: str, ident: int) -> str:
    """What a leftover BPF object is, and which processes still hold it."""
    info = subprocess.run(["bpftool", kind, "show", "id", str(ident)], capture_output=True, text=True).stdout
    holders = []
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            if f"{kind}_id:\t{ident}\n" in fdinfo.read_text():
                holders.append(f"{fdinfo.parts[2]} {Path(f'/proc/{fdinfo.parts[2]}/cmdline').read_bytes()[:120]!r}")
        except OSError:
            pass
    return f"{info.strip()} held by {holders or 'no process'}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], dict]:
    _require_environment()
    labs: queue.Queue = queue.Queue()
    try:
        for prefix in LANES:
            build.down(prefix)
            labs.put(build.up(T.LabConfig(prefix=prefix))[0])
        root = tmp_path_factory.mktemp("kill")

        def one(stage: str, sig: str) -> dict:
            lab = labs.get()
            try:
                return _scenario(lab, root / f"{stage}-{sig}", stage, sig)
            finally:
                labs.put(lab)
        with ThreadPoolExecutor(max_workers=len(LANES)) as pool:
            futs = {(stage, sig): pool.submit(one, stage, sig) for sig in SIGNALS for stage in STAGES}
            yield {k: f.result() for k, f in futs.items()}
    finally:
        for prefix in LANES:
            build.down(prefix)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sig", SIGNALS)
def test_interrupted_flow_leaves_nothing(runs, stage, sig):
    rec = runs[(stage, sig)]
    assert "never_reached" not in rec, f"flow never reached {stage}: {rec.get('never_reached')}"
    assert not our_filters(rec["before"]), f"filters of ours before the run: {our_filters(rec['before'])}"
    if stage in KERNEL_STAGES:
        assert rec["held"], f"no BPF object open at stage {stage}: the run would prove nothing"
    # Every process of the run ends: coordinator and agents (the probes live in them).
    assert not rec["alive"], f"still running after {sig}: {rec['alive']}"
    if sig == "SIGKILL":
        assert rec["rc"] == -signal.SIGKILL
        assert rec["cleanup"][0] == 0, rec["cleanup"]
    elif rec["rc"] != 0:       # interrupted: one line, exit 130 (0: it finished just before)
        lines = rec["err"].strip().splitlines()
        assert rec["rc"] == 130 and len(lines) == 1 and "interrupted" in lines[0], (rec["rc"], rec["err"])
        assert "Traceback" not in rec["err"]
    # Nothing of ours in the kernel: the programs and maps it held are freed, no filter stays,
    # no qdisc we added stays, nothing else on the lab's devices changed.
    assert not rec["objects_left"], f"BPF objects left: {rec['left_detail']}"
    assert not our_filters(rec["after"]), f"tc filters left: {our_filters(rec['after'])}"
    assert rec["after"] == rec["before"], {k: (rec["before"].get(k), v) for k, v in rec["after"].items()
                                           if rec["before"].get(k) != v}
    # The trace file: complete, or absent — or, when a SIGKILL caught it half-written, what
    # was written is salvaged by `cleanup` as FILE.incomplete.parquet, which loads and says it
    # is incomplete. No unfinished file (`FILE.part`, `FILE.part.tmp`) remains.
    assert rec["save"] in (None, "complete"), rec["save"]
    assert not rec["parts"], rec["parts"]
    if sig == "SIGKILL" and stage == "saving":
        assert rec["save"] == "complete" or rec["incomplete"], "the half-written trace vanished"
        for name, got in rec["incomplete"].items():
            assert name == "trace.incomplete.parquet" and not isinstance(got, str), (name, got)
            incomplete, consistent, events, reason = got
            assert incomplete is True and consistent and events > 0 and "was killed" in reason, got
    else:
        assert not rec["incomplete"], rec["incomplete"]


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
