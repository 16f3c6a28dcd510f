"""Agent processes on this machine, and those started early.

`flow` on the lab starts its agent processes as soon as it knows it will need them, before
it imports the flow machinery and resolves the endpoints: an agent imports what it traces
with while it waits for its request on stdin, so the two start-ups overlap (on a machine
that busy traffic saturates, more processes of ours also get more of its CPU). Light on
purpose: it runs before the heavy imports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def start(env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m tracer.cli agent`, its request still to come on stdin. Ctrl-C in the
    terminal reaches the whole process group: the coordinator alone decides what an interrupt
    means (it stops the probes, collects what the agents traced, then stops them). SIGTERM/
    SIGHUP and the end of stdin still stop an agent."""
    return subprocess.Popen([sys.executable, "-m", "tracer.cli", "agent"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=False, preexec_fn=_ignore_sigint)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Early:
    """Agent processes started before the flow is resolved, handed out in order. Those not
    taken are killed at the end: they were sent no request, so they hold nothing."""

    def __init__(self, n: int):
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(n):
                self.procs.append(start())
        except OSError:
            pass        # fewer early ones: the rest start when asked for

    def take(self) -> subprocess.Popen | None:
        return self.procs.pop(0) if self.procs else None

    def close(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> "Early":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
