"""Pause points for tests that interrupt a run at a known stage (tests/integration/test_safety_kill.py).

With PODTRACE_TEST_PAUSE=STAGE[,STAGE...] a process reaching STAGE creates the file
`$PODTRACE_TEST_PAUSE_DIR/STAGE.PID` and sleeps PODTRACE_TEST_PAUSE_S seconds (default 3),
interruptibly, so a signal lands exactly there (once per stage and process). Stages: loaded (BPF compiled, not attached),
attaching (a tc filter added), probing (a probe sent), reconstructing, saving (a --save file
half written). Unset, `pause()` is one dictionary lookup.
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
