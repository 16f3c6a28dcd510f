"""Agent processes on this machine, and those started early.

`flow` on the lab starts its agent processes as soon as it knows it will need them, before
it imports the flow machinery and resolves the endpoints: an agent imports what it traces
with while it waits for its request on stdin, so the two start-ups overlap (on a machine
that busy traffic saturates, more processes of ours also get more of its CPU). Light on
purpose: it runs before the heavy imports.

Where it can (this process still has one thread), the early agents are forked from this one
once it has imported what an agent traces with, instead of each starting an interpreter and
importing the same modules: three agents then cost one import, not three (~0.2 s of CPU each,
which a machine that busy traffic saturates gives back at 2–3× in wall time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


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


class Forked:
    """An agent forked from this process, with what the coordinator uses of a Popen: its
    pipes, poll/wait (the exit status), terminate/kill."""

    def __init__(self, pid: int, stdin, stdout, stderr):
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:     # reaped elsewhere: gone, status unknown
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    self.returncode = -1
            return self.returncode
        end, delay = time.monotonic() + timeout, 0.0005
        while self.poll() is None:
            left = end - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"agent {self.pid}", timeout)
            time.sleep(min(delay, left, 0.05))
            delay *= 2
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def forkable() -> bool:
    """Whether agents can be forked from this process: Linux, and no thread but this one
    (a thread holding a lock at the fork would hold it in the child for ever)."""
    return hasattr(os, "fork") and threading.active_count() == 1


def preload() -> None:
    """What every agent imports and reads before its request, done once here to be shared by
    the agents forked after it (tracer/agents/agent.py `_ahead`)."""
    from tracer.agents import agent

    agent._ahead()
    try:   # a node's agent checks its devices for other tc programs with it (~0.15 s to import)
        import pyroute2  # noqa: F401
    except ImportError:
        pass


def fork() -> Forked:
    """`podtrace agent` as a child forked from this process (see `forkable`), its request
    still to come on stdin; it leaves with os._exit and never returns here."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    for f in (sys.stdout, sys.stderr):   # what the child would otherwise write again
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:
        _child(r_in, w_out, w_err)
    for fd in (r_in, w_out, w_err):
        os.close(fd)
    return Forked(pid, os.fdopen(w_in, "wb"), os.fdopen(r_out, "rb"), os.fdopen(r_err, "rb"))


def _child(r_in: int, w_out: int, w_err: int) -> None:
    """In the forked child: the agent on these pipes, as `python -m tracer.cli agent` would
    run it; never returns (os._exit, as the agent command does)."""
    rc = 70
    try:
        os.dup2(r_in, 0)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        # nothing of the parent's stays open here: not the other agents' pipes (an agent
        # would then never see the end of its siblings' stdin), nor any lock the parent holds
        os.closerange(3, 1 << 16)
        _ignore_sigint()
        old = (sys.stdin, sys.stdout, sys.stderr)   # kept: never flushed into the new pipes
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        from tracer.agents.agent import main

        rc = main()
        sys.stdout.flush()
        sys.stderr.flush()
        del old
    except BaseException:   # noqa: BLE001 (said on stderr, as an agent process's failure is)
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    os._exit(rc)


class Early:
    """Agent processes started before the flow is resolved, handed out in order: forked from
    this process once it has imported what they need (`forkable`), else each its own
    interpreter. Those not taken are killed at the end: they were sent no request, so they
    hold nothing."""

    def __init__(self, n: int):
        self.procs: list[subprocess.Popen | Forked] = []
        self.forked = n > 0 and forkable()
        try:
            if self.forked:
                preload()
            for _ in range(n):
                self.procs.append(fork() if self.forked else start())
        except OSError:
            pass        # fewer early ones: the rest start when asked for

    def take(self) -> subprocess.Popen | Forked | None:
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
