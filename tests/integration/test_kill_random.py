"""SIGKILL at random moments: `flow` (agents mode) and `capture --tc`, killed in their first
seconds while both CPUs are kept busy, leave nothing of ours once the documented path has
run (agents see their coordinator go and clean up themselves; what a SIGKILLed process
itself held is removed by `podtrace cleanup`): no tc filter or clsact qdisc we added, no
BPF program of ours, no agent process, no state record.

The moments are random but replayable: the seed is printed (PODTRACE_TEST_KILL_SEED=N runs
the same moments again). A kill lands either at a random delay after the start, or at a
random delay after the run's first BPF object appears in its process tree (a readiness
signal, so some kills land while attaching and some while tracing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.lab_fixture import private_lab
from tracer.kernel import tc
from tracer.node import ownership
from tests.integration.test_safety_common import (
    alive, bpf_objects_held_by, cli, descendants, our_filters, popen, tc_snapshot, wait_until,
)

PREFIX = "pttestkr"
ROUNDS = 3             # each round kills one flow and one capture: 6 kills


def _tc_records() -> list[dict]:
    try:
        return json.loads(tc.STATE_FILE.read_text())
    except (OSError, ValueError):
        return []


def _progs() -> dict[int, str]:
    res = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    return {p["id"]: p.get("name", "") for p in json.loads(res.stdout or "[]")}


def _held_anywhere() -> set[int]:
    pids = {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()}
    return {i for kind, i in bpf_objects_held_by(pids) if kind == "prog"}


def _orphans(before: dict[int, str]) -> dict[int, str]:
    """Programs that appeared during the test and that no process holds open: only an
    attachment (a tc filter) can keep those alive, i.e. something a dead run left."""
    new = {i: n for i, n in _progs().items() if i not in before}
    if not new:
        return {}
    held = _held_anywhere()
    return {i: n for i, n in new.items() if i not in held}


def _ours(marker: str) -> list[int]:
    """Processes of this test's runs (flow, capture, agents): they carry its marker variable."""
    mark = f"PTKILL_MARK={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if mark in (d / "environ").read_bytes().split(b"\0") and alive(int(d.name)):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _kill_at_random(proc: subprocess.Popen, rng: random.Random, group: bool) -> str:
    """Wait for this round's moment, then SIGKILL; says which moment it was."""
    if rng.random() < 0.5:
        delay = rng.uniform(0.0, 2.0)
        moment = f"{delay:.2f}s after the start"
    else:
        # readiness: the first BPF object in the run's process tree (compiled, attaching)
        ready = wait_until(lambda: proc.poll() is not None or bpf_objects_held_by(descendants(proc.pid)), 60, 0.02)
        assert ready and proc.poll() is None, f"the run ended before it traced: {proc.communicate()}"
        delay = rng.uniform(0.0, 1.0)
        moment = f"{delay:.2f}s after its first BPF object"
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0 and proc.poll() is None:
        time.sleep(min(left, 0.02))          # the random delay itself, not a synchronisation
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
        moment += ", whole process group"
    else:
        proc.kill()
    proc.wait(10)
    return moment


@pytest.fixture(scope="module")
def kill_lab():
    with private_lab(PREFIX) as lab:
        yield lab


def test_sigkill_at_random_moments_leaves_nothing(kill_lab, tmp_path):
    seed = int(os.environ.get("PODTRACE_TEST_KILL_SEED", str(time.time_ns() % 2**31)))
    print(f"kill test seed: {seed} (PODTRACE_TEST_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    marker = f"{os.getpid()}-{seed}"
    env = {"PTKILL_MARK": marker, "PODTRACE_FLOW_MODE": "agents"}
    progs_before = _progs()
    tc_before = tc_snapshot(kill_lab)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    kills: list[str] = []
    try:
        for i in range(ROUNDS):
            out = tmp_path / f"c{i}.parquet"
            env["PODTRACE_TC_ATTACH"] = ("tcx", "clsact")[i % 2]     # links, and filters `cleanup` removes
            flow = popen("flow", "pod-1-1", "pod-2-1", "--no-probe", "--duration", "20", prefix=PREFIX, **env)
            cap = popen("capture", "--tc", "--pod", "default/pod-1-1", "-d", "20", "-w", str(out), prefix=PREFIX, **env)
            for name, proc in (("flow", flow), ("capture", cap)):
                moment = _kill_at_random(proc, rng, group=name == "flow" and rng.random() < 0.3)
                kills.append(f"round {i}: {name} killed {moment}")
            # The agents of a killed coordinator see their stdin end and clean up themselves.
            assert wait_until(lambda: not _ours(marker), 60, 0.1), \
                f"processes left: {_ours(marker)}; seed {seed}; {kills[-2:]}"
            res = cli("cleanup", prefix=PREFIX, **env)
            assert res.returncode == 0, res.stderr
            snap = tc_snapshot(kill_lab)
            assert not our_filters(snap), f"tc filters left on {our_filters(snap)}; seed {seed}; {kills[-2:]}"
            changed = sorted(f"{ns}/{dev}" for ns, dev in snap if snap[(ns, dev)] != tc_before.get((ns, dev)))
            assert not changed, f"qdiscs left on {changed}; seed {seed}; {kills[-2:]}"
            records = [a for a in _tc_records() if not ownership.alive(a.get("pid"), a.get("start"))]
            writers = [w for w in ownership.registered_writers()
                       if w.get("damaged") or not ownership.alive(w["pid"], w.get("start"))]
            assert not records and not writers, f"state records left: {records} {writers}; seed {seed}; {kills[-2:]}"
        assert len(kills) >= 2 * ROUNDS
        assert wait_until(lambda: not _orphans(progs_before), 10, 0.2), \
            f"BPF programs left: {_orphans(progs_before)}; seed {seed}"
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print("\n".join(kills))


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
