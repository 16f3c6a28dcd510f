"""How a command ends: its output flushed (a closed pipe answered as a killed command), and,
when podtrace is its own program, without the interpreter's teardown."""

from __future__ import annotations

import os
import sys

from tracer.errors import ExitStatus


def stdout_closed():
    """The reader of our output went away (`podtrace lab status | head -1`): say nothing more
    and exit 141 (128 + SIGPIPE, as a command killed by the closed pipe). Python's own flush at
    exit would fail again on the closed pipe: stdout goes to /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(ExitStatus.BROKEN_PIPE)


def flush_stdout():
    """What is still buffered for stdout, written now, while a closed pipe can be answered."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
    except (OSError, ValueError):
        pass


own_process = False    # podtrace runs as its own program (not invoked by a test runner)


def leave(code: int):
    """End a command that has said and written everything: exit `code` after flushing. As
    its own program it skips the interpreter's teardown of the trace's tables (0.1 s and
    more after a busy watch); everything it added to the kernel is removed by then."""
    flush_stdout()
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    if own_process:
        os._exit(int(code))
    sys.exit(code)
