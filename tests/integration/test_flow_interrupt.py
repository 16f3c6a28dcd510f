"""What a run keeps. Ctrl-C during `flow`, as `ping`: the packets traced so far and the
summary are shown, a --save file is written and marked incomplete, the exit status is 130,
and nothing of ours stays (agents, BPF objects, tc filters); a second Ctrl-C while it
finishes aborts at once. A saved failing flow gives `analyze` the live verdict, cause and
named rule. A capture's live drop counts are the ones `analyze` finds in its file.

The signal lands while probes are in flight: PODTRACE_TEST_PAUSE=probing makes the prober
drop a marker and wait after its first probe (tracer/testhooks.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import todays_share
from tests.integration.lab_fixture import private_lab
from tests.integration.test_safety_common import (
    alive, bpf_objects, bpf_objects_held_by, cli, descendants, our_filters, popen, tc_snapshot,
)
from tracer import analysis, tracefile
from tracer.node import netns, prober
from tracer.runs import capture

PREFIX = os.environ.get("PODTRACE_TEST_LAB_PREFIX", "pttest") + "ic"


@pytest.fixture(scope="module")
def ilab():
    with private_lab(PREFIX) as doc:
        yield {**doc, "prefix": PREFIX}


def _wait_mark(proc, marks: Path, stage: str, timeout: float = 60) -> None:
    """STAGE reached by any process of the run; `STAGE@` by the coordinator itself."""
    end = time.monotonic() + timeout
    want = f"{stage[:-1]}.{proc.pid}" if stage.endswith("@") else None
    while not any(p.name == want if want else p.name.startswith(stage + ".") for p in marks.iterdir()):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"flow ended (exit {proc.returncode}) before {stage}: {err or out[-2000:]}")
        assert time.monotonic() < end, f"flow never reached {stage}"
        time.sleep(0.02)


PROBES = ["--count", "20", "--timeout", "0.5"]


def _interrupted_run(lab, tmp_path, args, stages, signals, mode, probes=PROBES, pause_s="2", **env):
    """Start `flow`, send signals[i] (to the whole group, as a terminal's Ctrl-C) when it
    reaches stages[i]; the run's output and what it left."""
    marks, save = tmp_path / "marks", tmp_path / "trace.parquet"
    marks.mkdir()
    before = tc_snapshot(lab)
    proc = popen("flow", "pod-1-1", "pod-2-1", *probes, "--save", str(save), *args,
                 prefix=lab["prefix"], PODTRACE_FLOW_MODE=mode,
                 PODTRACE_TEST_PAUSE=",".join(s.rstrip("@") for s in stages),
                 PODTRACE_TEST_PAUSE_DIR=str(marks), PODTRACE_TEST_PAUSE_S=pause_s, **env)
    tree: list[int] = []
    held: set = set()
    try:
        for stage, sig in zip(stages, signals):
            _wait_mark(proc, marks, stage)
            tree = sorted(set(tree) | set(descendants(proc.pid)))
            held |= bpf_objects_held_by(tree)
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)      # `kill PID`: the coordinator alone
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    end = time.monotonic() + 20
    while (any(alive(p) for p in tree) or held & bpf_objects()) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [p for p in tree if alive(p)], "a process of the run is still alive"
    assert not held & bpf_objects(), "BPF objects of the run are left"
    after = tc_snapshot(lab)
    assert not our_filters(after) and after == before
    return proc.returncode, out, err, save


def test_ctrl_c_while_probing_shows_and_saves_what_was_traced(ilab, tmp_path):
    rc, out, err, save = _interrupted_run(ilab, tmp_path, [], ["probing"], [signal.SIGINT], "agents")
    lines = err.strip().splitlines()
    assert rc == 130, (rc, err, out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("podtrace: interrupted after 1 of 20 probes"), err
    assert f"saved to {save} (marked incomplete)" in lines[0]
    # the partial result, as a finished run shows it: the probe's packets, its verdict, the summary
    assert "interrupted after 1 of 20 probes" in out
    assert "OK: 1/1 delivered, 1/1 answered" in out, out[-2000:]   # the packets: the JSON test
    events, meta = tracefile.load(save)
    assert len(events) and meta["complete"] is False and meta["interrupted"] is True
    assert meta["interruption"]["probes_sent"] == 1 and meta["interruption"]["probes_asked"] == 20
    res = cli("analyze", str(save), prefix=ilab["prefix"])
    assert res.returncode == 0, res.stderr
    assert "incomplete (interrupted after 1 of 20 probes)" in res.stderr
    assert "flow OK: 1/1 delivered, 1/1 answered  (incomplete: interrupted after 1 of 20 probes)" in res.stdout


def test_ctrl_c_while_the_agents_compile_is_answered_at_once(ilab, tmp_path):
    """Compiling the BPF program is one long C call (seconds on a loaded node); Ctrl-C then
    must not wait for it: here each agent's compile is made to take 60 s."""
    t0 = time.monotonic()
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = popen("flow", "pod-1-1", "pod-2-1", "--count", "1", prefix=ilab["prefix"], PODTRACE_FLOW_MODE="agents",
                 PODTRACE_TEST_PAUSE="compiling", PODTRACE_TEST_PAUSE_DIR=str(marks), PODTRACE_TEST_PAUSE_S="60")
    tree: list[int] = []
    try:
        _wait_mark(proc, marks, "compiling")
        tree = descendants(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - t0
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1].startswith("podtrace: interrupted"), err
    assert took < 6, f"Ctrl-C took {took:.1f} s: it waited for the compile (or the 10 s stop grace)"
    assert tree and not [p for p in tree if alive(p)], "an agent is still alive"


def test_sigterm_while_probing_gives_the_json_so_far(ilab, tmp_path):
    """The single-process runner too, and SIGTERM to the coordinator alone: the same document
    as a finished run, with `interrupted`."""
    rc, out, err, save = _interrupted_run(ilab, tmp_path, ["-o", "json"], ["probing"], [signal.SIGTERM], "single")
    assert rc == 130, (rc, err)
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["interruption"]["after"] == "after 1 of 20 probes"
    assert [p["seq"] for p in doc["probes"]] == [1]
    assert {(p["direction"], p["seq"]) for p in doc["packets"]} == {("request", 1), ("reply", 1)}
    assert doc["verdict"]["status"] == "ok"
    assert tracefile.read_meta(save)["interrupted"] is True


def test_ctrl_c_ends_a_watch_early(ilab, tmp_path):
    """--no-probe watches until Ctrl-C as well as for --duration: what was seen is judged.
    The signal lands once the coordinator has every agent ready (its `tracing` marker)."""
    rc, out, err, save = _interrupted_run(ilab, tmp_path, ["-o", "json"], ["tracing@"], [signal.SIGINT], "agents",
                                          probes=["--no-probe", "--duration", "60"], pause_s="0")
    assert rc == 130, (rc, err)
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["interruption"]["duration_s"] == 60
    assert doc["interruption"]["traced_s"] < 30 and doc["interruption"]["after"].endswith("of 60 s")
    assert tracefile.read_meta(save)["complete"] is False


def test_second_ctrl_c_while_finishing_aborts(ilab, tmp_path):
    rc, out, err, save = _interrupted_run(ilab, tmp_path, [], ["probing", "reconstructing"],
                                          [signal.SIGINT, signal.SIGINT], "agents")
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1, err
    assert lines[0] == "podtrace: interrupted; everything podtrace added was removed", err
    assert not save.exists() and not list(tmp_path.glob("*.part*"))


@pytest.mark.parametrize("mode", todays_share(["single", "agents"], 2))   # one a day
def test_ctrl_c_while_judging_keeps_the_events(ilab, tmp_path, mode):
    """The first Ctrl-C after the watch, while the packets are judged, is answered at once
    with what was collected: the events, saved and marked incomplete, which `analyze`
    then judges. The pause point is the coordinator's (or the single process's) judging."""
    rc, out, err, save = _interrupted_run(ilab, tmp_path, ["-o", "json"], ["reconstructing@"], [signal.SIGINT], mode,
                                          probes=["--no-probe", "--duration", "1"], pause_s="5")
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1, err
    assert lines[0].startswith("podtrace: interrupted while judging the packets; the ") and \
        f"saved to {save} (marked incomplete); podtrace analyze {save} judges them" in lines[0], lines[0]
    meta = tracefile.read_meta(save)
    assert meta["complete"] is False and meta["interrupted"] is True and "flow_verdict" not in meta
    doc = json.loads(cli("analyze", str(save), "-o", "json", prefix=ilab["prefix"]).stdout)
    assert doc["incomplete"] == "interrupted while judging the packets"


def _broken(lab, scenario):
    res = cli("lab", "break", scenario, prefix=lab["prefix"])
    assert res.returncode == 0, res.stderr


def _fixed(lab, scenario):
    res = cli("lab", "fix", scenario, prefix=lab["prefix"])
    assert res.returncode == 0, res.stderr


def test_a_saved_flow_says_what_the_live_run_said(ilab, tmp_path):
    saved = tmp_path / "flow.parquet"
    _broken(ilab, "netpol-drop")
    try:
        res = cli("flow", "pod-1-1", "pod-2-1", "--timeout", "0.5", "-o", "json", "--save", str(saved),
                  prefix=ilab["prefix"], PODTRACE_FLOW_MODE="agents")
    finally:
        _fixed(ilab, "netpol-drop")
    assert res.returncode == 3, res.stderr
    live = json.loads(res.stdout)
    caused = [p for p in live["packets"] if p["verdict"].get("cause")]
    assert caused and caused[0]["verdict"]["cause"] == "netfilter-rule"
    assert "by rule `" in caused[0]["verdict"]["hint"]     # the named rule
    assert "+0x" in (caused[0]["verdict"]["location"] or ""), "the agent names where the kernel dropped it"
    doc = json.loads(cli("analyze", str(saved), "-o", "json", prefix=ilab["prefix"]).stdout)
    flow = doc["flow"]
    assert (flow["status"], flow["summary"], flow["problems"]) == \
        (live["verdict"]["status"], live["verdict"]["summary"], live["verdict"]["problems"])
    assert flow["complete"] and flow["interrupted"] is None
    offline = {(p["direction"], p["seq"]): p for p in flow["packets"]}
    for p in caused:
        v, got = p["verdict"], offline[(p["direction"], p["seq"])]
        assert (got["status"], got["verdict_node"], got["verdict_dev"], got["reason"], got["location"], got["cause"],
                got["hint"], got["runbook"]) == (v["status"], v["node"], v["dev"], v["reason"], v["location"],
                                                 v["cause"], v["hint"], v["runbook"])
    table = cli("analyze", str(saved), prefix=ilab["prefix"]).stdout
    assert f"flow FAILED: {live['verdict']['summary']}" in table
    assert caused[0]["verdict"]["hint"] in " ".join(table.split()), table


def test_capture_drops_live_equal_analyze_apart_from_socket_cleanup(ilab, tmp_path):
    """The live counts (drops of the traffic, and the stack's own socket cleanup apart) are
    the ones `analyze` finds in the file."""
    pods = {p["name"]: p for p in ilab["pods"]}
    src, dst = pods["pod-1-1"], pods["pod-2-1"]
    tracing = threading.Event()

    def traffic():
        if not tracing.wait(60):
            return
        prober.send(src["netns"], src["ip"], dst["ip"], "icmp", None, 4, 0.2, 0.05)
        prober.send(src["netns"], src["ip"], dst["ip"], "udp", 8080, 4, 0.2, 0.05)
        for _ in range(3):   # a client that sends and goes at once: the server side cleans up
            s = netns.socket_in(src["netns"], socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.settimeout(1)
                s.connect((pods["pod-2-2"]["ip"], 8080))
                s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 50)
                time.sleep(0.05)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            finally:
                s.close()
    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    _broken(ilab, "netpol-drop")
    try:
        cfg = capture.CaptureConfig(capture.Selection(), str(tmp_path / "cap.parquet"), duration=3.0,
                                    lab_prefix=ilab["prefix"])
        res = capture.run_capture(cfg, progress=lambda d: tracing.set())
    finally:
        tracing.set()
        th.join(timeout=60)
        _fixed(ilab, "netpol-drop")
    s = analysis.load(res.path).summary()
    assert res.drops >= 8 and (res.drops, res.stack_drops) == (s["dropped"], s["stack_drops"]), (res, s)
    # the clients' resets, freed by the server's TCP once it closed the connection: not drops
    assert res.stack_drops >= 3, res
    assert tracefile.read_meta(res.path)["counters"]["stack_drops_seen"] == res.stack_drops


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
