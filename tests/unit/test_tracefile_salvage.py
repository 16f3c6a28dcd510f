"""A trace file whose writer is killed (SIGKILL: no handler runs) is still readable up to its
last complete batch, and `podtrace cleanup` (tracefile.cleanup_writers) turns it into a
complete-but-marked-incomplete trace — but never touches the file of a writer that is still
running. Real writer processes, killed for real."""

from __future__ import annotations

import contextlib

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tracer import tracefile
from tracer.node import ownership

ROOT = Path(__file__).resolve().parents[2]

# A writer process: batches of 500 deterministic events (sport = event number), one
# 1000-event row group every other batch; it prints the events on disk after each batch.
WRITER = r"""
import sys, time
import numpy as np
from tracer.kernel import record as events
from tracer import testhooks, tracefile

def batch(i, n=500):
    arr = np.zeros(n, dtype=events.EVENT_DTYPE)
    k = np.arange(i, i + n)
    arr["ts_ns"] = k + 10**9
    arr["sport"] = k % 65536
    arr["dport"] = k // 65536
    arr["saddr"] = events.v4_field(0x0201F40A)
    arr["hook"] = 1
    arr["proto"] = 17
    arr["ifname"] = [b"eth0", b"cni0"] * (n // 2)
    return arr

w = tracefile.Writer(sys.argv[1], row_group_events=1000,
                     meta={"kind": "capture", "inventory": "none", "selection": {"asked": {"pod": ["a"]}}})
limit = int(sys.argv[2])
i = 0
while limit < 0 or i < limit:
    w.write_records(batch(i))
    i += 500
    print(w.rows, flush=True)
    time.sleep(0.002)
if sys.argv[3] == "close":
    w.close({"kind": "capture", "inventory": "none", "note": "closed"})
    print("closed", flush=True)
else:
    print("waiting", flush=True)
time.sleep(600)
"""


def _env(state: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTRACE_TEST_")}
    env.update(PODTRACE_STATE_DIR=str(state), PYTHONPATH=str(ROOT), **extra)
    return env


def _writer(path: Path, state: Path, limit: int = -1, then: str = "wait", **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(limit), then], cwd=ROOT,
                            env=_env(state, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen, pred, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer ended: {proc.stderr.read()}")
        if pred(line.strip()):
            return line.strip()
    raise AssertionError("writer too slow")


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()


@contextlib.contextmanager
def _waiting_writer(out: Path, state: Path, limit: int):
    """A writer that has written `limit` events and waits (alive) with its `.part` open;
    killed with SIGKILL when the block ends."""
    proc = _writer(out, state, limit=limit)
    try:
        _read_until(proc, lambda l: l == "waiting")
        yield proc, Path(str(out) + ".part")
    finally:
        _kill(proc)


def _python(state: Path, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS` in another process, as a user would run podtrace beside the writer."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(state), capture_output=True, text=True,
                          timeout=120)


def _is_prefix(df) -> None:
    k = df["dport"].to_numpy().astype(np.int64) * 65536 + df["sport"].to_numpy().astype(np.int64)
    assert (k == np.arange(len(df))).all(), "the salvaged events are not a prefix of those written"
    assert (df["ts_ns"].to_numpy() == np.arange(len(df)) + 10**9).all()
    assert (df["ifname"].astype(str).to_numpy() == np.array(["eth0", "cni0"] * (len(df) // 2))).all()


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(d))
    return d


def test_sigkill_mid_way_then_cleanup_salvages_a_prefix(tmp_path, state):
    out = tmp_path / "trace.parquet"
    proc = _writer(out, state)
    try:
        on_disk = int(_read_until(proc, lambda l: int(l) >= 20_000))
        regs = ownership.registered_writers()
        assert [r["pid"] for r in regs] == [proc.pid] and regs[0]["start"] == ownership.start_time(proc.pid)
        assert tracefile.cleanup_writers() == [], "the writer is running: its file is not to be touched"
    finally:
        _kill(proc)
    part = Path(str(out) + ".part")
    assert part.exists() and not out.exists()
    lines = tracefile.cleanup_writers()
    target = tmp_path / "trace.incomplete.parquet"
    assert len(lines) == 1 and lines[0].startswith(f"salvaged {target}: "), lines
    assert f"pid {proc.pid}" in lines[0]
    assert not part.exists() and not out.exists() and ownership.registered_writers() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "trace.incomplete.parquet"]
    df, meta = tracefile.load(target)
    assert len(df) >= on_disk and len(df) % 1000 == 0, (len(df), on_disk)
    _is_prefix(df)
    assert meta["incomplete"] is True and meta["events"] == len(df)
    assert f"pid {proc.pid}" in meta["incomplete_reason"] and f"{len(df)} events salvaged" in meta["incomplete_reason"]
    assert meta["selection"] == {"asked": {"pod": ["a"]}}, "the metadata known at the start is kept"
    assert meta["format_version"] == tracefile.FORMAT_VERSION and meta["kind"] == "capture"
    assert meta["row_groups"] == len(df) // 1000
    assert tracefile.read_meta(target)["incomplete"] is True
    assert tracefile.cleanup_writers() == []         # idempotent


def test_live_writers_part_is_left_alone_and_loads(tmp_path, state):
    with _waiting_writer(tmp_path / "live.parquet", state, 3000) as (proc, part):
        before = part.read_bytes()
        # a concurrent cleanup, in another process, as the user runs it
        res = _python(state, "-c", "from tracer import tracefile; print(tracefile.cleanup_writers())")
        assert res.returncode == 0 and res.stdout.strip() == "[]", res
        assert part.read_bytes() == before and len(ownership.registered_writers()) == 1
        # the raw stream of a running writer loads, marked incomplete
        df, meta = tracefile.load(part)
        assert len(df) == 3000 and meta["incomplete"] is True and "being written" in meta["incomplete_reason"]
        _is_prefix(df)
    assert tracefile.cleanup_writers()[0].startswith("salvaged ")
    assert tracefile.load(tmp_path / "live.incomplete.parquet")[1]["events"] == 3000


def test_killed_while_moving_the_complete_file_into_place(tmp_path, state):
    """Killed after the conversion, before the rename: cleanup finishes the writer's job."""
    out = tmp_path / "done.parquet"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _writer(out, state, limit=2500, then="close", PODTRACE_TEST_PAUSE="finishing",
                   PODTRACE_TEST_PAUSE_DIR=str(marks), PODTRACE_TEST_PAUSE_S="60")
    try:
        end = time.monotonic() + 60
        while not any(marks.iterdir()):
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read()
            time.sleep(0.02)
    finally:
        _kill(proc)
    assert Path(str(out) + ".part").exists() and Path(str(out) + ".part.tmp").exists() and not out.exists()
    lines = tracefile.cleanup_writers()
    assert lines == [f"finished {out} (the writer, pid {proc.pid}, was killed as it moved the complete file "
                     "into place)"], lines
    df, meta = tracefile.load(out)
    assert len(df) == 2500 and meta["note"] == "closed" and not meta.get("incomplete")
    _is_prefix(df)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.parquet", "marks", "state"]


def test_reused_pid_is_not_the_writer_and_names_never_overwrite(tmp_path, state):
    """A registration whose pid now belongs to another process (here: this one, with
    another start time) is a dead writer; salvaged files never replace an existing one."""
    out = tmp_path / "t.parquet"
    w = tracefile.Writer(out, row_group_events=1000)
    w.write_records(np.zeros(1000, dtype=tracefile.events.EVENT_DTYPE))
    (reg,) = state.glob("writing/*.json")
    doc = json.loads(reg.read_text())
    assert doc["pid"] == os.getpid()
    assert tracefile.cleanup_writers() == []          # this process: running
    doc["start"] -= 1                                 # the same pid, another process
    reg.write_text(json.dumps(doc))
    (tmp_path / "t.incomplete.parquet").write_text("someone's file")
    lines = tracefile.cleanup_writers()
    assert lines and lines[0].startswith(f"salvaged {tmp_path / 't.incomplete.2.parquet'}: 1000 events"), lines
    assert (tmp_path / "t.incomplete.parquet").read_text() == "someone's file"
    assert not w.tmp.exists() and not reg.exists()


def test_records_naming_other_paths_are_dropped_not_followed(tmp_path, state):
    """cleanup deletes only the `.part` and `.part.tmp` of the file a record names."""
    victim = tmp_path / "precious"
    victim.write_text("x")
    (state / "writing").mkdir(parents=True)
    (state / "writing" / "1-1.json").write_text(json.dumps(
        {"pid": 999_999_999, "start": 1, "path": str(tmp_path / "t.parquet"), "part": str(victim),
         "tmp": str(victim)}))
    lines = tracefile.cleanup_writers()
    assert lines == [f"removed the unreadable writer record {state / 'writing' / '1-1.json'}"]
    assert victim.read_text() == "x"


def test_writer_killed_before_its_first_batch(tmp_path, state):
    """Only the header on disk: salvaged as an empty, incomplete trace with its metadata."""
    with _waiting_writer(tmp_path / "early.parquet", state, 0):
        pass
    lines = tracefile.cleanup_writers()
    assert lines[0].startswith(f"salvaged {tmp_path / 'early.incomplete.parquet'}: 0 events"), lines
    df, meta = tracefile.load(tmp_path / "early.incomplete.parquet")
    assert len(df) == 0 and meta["incomplete"] is True and meta["selection"]["asked"] == {"pod": ["a"]}


def test_analyze_says_a_trace_is_incomplete(tmp_path, state):
    with _waiting_writer(tmp_path / "a.parquet", state, 2000) as (_, part):
        res = _python(state, "-m", "tracer.cli", "analyze", str(part), "-o", "json")
    assert res.returncode == 0, res.stderr
    warn = res.stderr.strip().splitlines()
    assert len(warn) == 1 and warn[0].startswith(f"podtrace: warning: {part} is an incomplete trace"), warn
    doc = json.loads(res.stdout)
    assert doc["incomplete"] and doc["summary"]
    tracefile.cleanup_writers()
    res = _python(state, "-m", "tracer.cli", "analyze", str(tmp_path / "a.incomplete.parquet"))
    assert res.returncode == 0 and "incomplete trace" in res.stderr and "was killed" in res.stderr, res.stderr


def test_complete_file_loads_as_before(tmp_path, state):
    out = tmp_path / "c.parquet"
    w = tracefile.Writer(out, row_group_events=1000, meta={"kind": "capture", "selection": {"x": 1}})
    w.write_records(np.zeros(2500, dtype=tracefile.events.EVENT_DTYPE))
    assert len(ownership.registered_writers()) == 1
    w.close({"note": "done"})
    df, meta = tracefile.load(out)
    assert len(df) == 2500 and "incomplete" not in meta and "incomplete_reason" not in meta
    assert meta["selection"] == {"x": 1} and meta["note"] == "done" and meta["row_groups"] == 3
    assert ownership.registered_writers() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "state"]
