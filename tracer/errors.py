"""The few error types podtrace raises, and the one place they map to exit codes.

Contract exit codes: 0 ok, 1 the environment cannot trace, 2 bad input, 3 the trace found a
failure. Every user-facing error is one line: what was wrong, then what to do.
"""

from __future__ import annotations


class PodtraceError(Exception):
    """Base class: a one-line message for the user and the exit code it maps to."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def line(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class EnvironmentProblem(PodtraceError):
    """The machine cannot do what was asked (no root, no BPF, no tracefs, lab not up)."""

    exit_code = 1


class BadInput(PodtraceError):
    """The user asked for something that does not exist or does not parse."""

    exit_code = 2


class TraceFailed(PodtraceError):
    """The trace ran and found a failure (drop, loss, missing or wrong reply)."""

    exit_code = 3


def require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"{what} needs root (network namespaces, BPF and iptables)",
            "run it again with sudo",
        )
