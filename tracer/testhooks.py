"""Every switch tests use to steer a run, read here and nowhere else in the product.

Pause points (tests/integration/test_safety_kill.py): with PODTRACE_TEST_PAUSE=STAGE[,STAGE...]
a process reaching STAGE creates the file `$PODTRACE_TEST_PAUSE_DIR/STAGE.PID` and sleeps
PODTRACE_TEST_PAUSE_S seconds (default 3), interruptibly, so a signal lands exactly there
(once per stage and process). Stages: compiling (in the compile's worker thread, before BCC
is called: a compile that takes that long), loaded (BPF compiled, not attached), attaching (a tc
filter added), tracing (a node runner has every hook and tc filter attached; the coordinator
has every agent ready: with PODTRACE_TEST_PAUSE_S=0 a readiness marker), probing (a probe
sent), reconstructing, saving (a --save file half written), finishing. Unset, `pause()` is
one dictionary lookup.

Agent switches (tests of the coordinator): PODTRACE_TEST_AGENT_SKEW=NODE=NS[,...] and
PODTRACE_TEST_AGENT_DIE=NODE[,...] on the coordinator become, for those nodes' agents,
PODTRACE_AGENT_CLOCK_SKEW_NS (pretend this node's clock is off by NS) and
PODTRACE_AGENT_DIE_AFTER_READY (exit at once after "ready", like an agent that crashes).
PODTRACE_TEST_AGENT_READY_DELAY=NODE=SECONDS[,...] makes those nodes' agents attach and get
ready SECONDS late (PODTRACE_AGENT_START_DELAY_S), like an agent pod that starts slowly: the
other agents trace alone meanwhile.

Agent server: PODTRACE_TEST_FIRST_FRAME_S=SECONDS shortens the time a connection has to send
its request (tests of that deadline need not wait the real one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_paused: set[str] = set()


def pause(stage: str) -> None:
    want = os.environ.get("PODTRACE_TEST_PAUSE")
    if not want or stage not in want.split(",") or stage in _paused:
        return
    _paused.add(stage)
    where = os.environ.get("PODTRACE_TEST_PAUSE_DIR")
    if where:
        try:
            (Path(where) / f"{stage}.{os.getpid()}").touch()
        except OSError:
            pass
    time.sleep(float(os.environ.get("PODTRACE_TEST_PAUSE_S", "3")))


def agent_env() -> dict[str, dict[str, str]]:
    """Per node, the variables its agent gets from the coordinator's test switches."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, os.environ.get("PODTRACE_TEST_AGENT_SKEW", "").split(",")):
        node, ns_ = item.split("=")
        out.setdefault(node, {})["PODTRACE_AGENT_CLOCK_SKEW_NS"] = ns_
    for node in filter(None, os.environ.get("PODTRACE_TEST_AGENT_DIE", "").split(",")):
        out.setdefault(node, {})["PODTRACE_AGENT_DIE_AFTER_READY"] = "1"
    for item in filter(None, os.environ.get("PODTRACE_TEST_AGENT_READY_DELAY", "").split(",")):
        node, secs = item.split("=")
        out.setdefault(node, {})["PODTRACE_AGENT_START_DELAY_S"] = secs
    return out


def agent_start_delay() -> float:
    """How long this agent waits before attaching (0: not at all)."""
    return float(os.environ.get("PODTRACE_AGENT_START_DELAY_S", "0") or 0)


def clock_skew_ns() -> int:
    """How far this agent pretends its monotonic clock is off (0: not at all)."""
    return int(os.environ.get("PODTRACE_AGENT_CLOCK_SKEW_NS", "0"))


def die_after_ready() -> None:
    """An agent that crashes mid-trace: exit at once, no cleanup (like a SIGKILL)."""
    if os.environ.get("PODTRACE_AGENT_DIE_AFTER_READY"):
        os._exit(9)


def lab_pause_after() -> str | None:
    """PODTRACE_LAB_PAUSE_AFTER=STEP: `lab up` stops for an hour after that build step (tests
    interrupt it there and check that nothing is left)."""
    return os.environ.get("PODTRACE_LAB_PAUSE_AFTER")


def first_frame_s(default: float) -> float:
    """How long the agent server waits for a connection's request."""
    return float(os.environ.get("PODTRACE_TEST_FIRST_FRAME_S") or default)
