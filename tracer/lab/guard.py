"""Guards lab changes: one at a time per machine, never cut short by a signal.

`lab up`, `lab down`, `lab break` and `lab fix` hold `locked(state_root)`; `up` and `break`
turn SIGTERM into KeyboardInterrupt so their rollback runs, and rollbacks run `shielded()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from pathlib import Path

from tracer.errors import PodtraceError


@contextlib.contextmanager
def locked(state_root: Path):
    """Serialise lab up/down/break/fix on this machine (flock on the state root directory)."""
    while True:
        state_root.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A concurrent `down` may have removed the directory while we waited.
            try:
                same = os.stat(state_root).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt():
    """During `up`, SIGTERM unwinds like Ctrl-C so the rollback runs."""
    if not _in_main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def shielded():
    """A second Ctrl-C or SIGTERM must not cut a cleanup short; the first one already
    asked to stop."""
    if not _in_main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def why(exc: BaseException) -> str:
    """What stopped a change, for the line that says it is being undone."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, PodtraceError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
