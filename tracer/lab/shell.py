"""Runs the lab build's commands inside its namespaces: `ip`/`bridge` batches, sysctl writes.

Speed: one `ip -batch` per namespace, run in parallel per stage.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.node import netns


class BuildError(EnvironmentProblem):
    """A step of `lab up` failed; the half-built lab has been removed."""


def sysctls(ns: str, values: dict[str, str]) -> None:
    # setns() on this thread: /proc/sys/net resolves to the namespace of the caller.
    with netns.entered(ns):
        for key, value in values.items():
            try:
                Path("/proc/sys", key).write_text(value)
            except OSError as exc:
                raise BuildError(f"cannot set {key.replace('/', '.')}={value} in {ns}: "
                                 f"{exc.strerror}") from exc


def read_sysctl(ns: str, key: str) -> str:
    with netns.entered(ns):
        return Path("/proc/sys", key).read_text().strip()


def ip_batch(ns: str | None, lines: list[str], what: str) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    parallel([(argv, lines, what)])


def parallel(jobs: list[tuple[list[str], list[str] | str, str]]) -> None:
    """Run commands concurrently, each fed its batch on stdin; raise on the first failure."""
    running = []
    try:
        for argv, lines, what in jobs:
            text = lines if isinstance(lines, str) else "".join(line + "\n" for line in lines)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            running.append((proc, what))
            # Batches are far below a pipe's capacity: writing never blocks, so every
            # command is already working while the next one starts.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(text)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        failures = []
        for proc, what in running:
            err = proc.stderr.read()
            proc.wait(timeout=60)
            if proc.returncode != 0:
                failures.append(f"{what}: {first_error(err)}")
    finally:
        for proc, _ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    if failures:
        raise BuildError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))


def first_error(err: str) -> str:
    lines = [line.strip() for line in err.strip().splitlines() if line.strip()]
    return " / ".join(lines[:2]) if lines else "failed"
