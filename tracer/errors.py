"""The error types podtrace raises, each carrying the exit code the contract gives it.

Every user-facing error is one line: what was wrong, then what to do. The command group
(tracer/cli/main.py) is the one place that turns them into that line and the exit status.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """The contract's exit codes."""

    OK = 0
    CANNOT_TRACE = 1     # the environment cannot trace (no privileges, no eBPF, ...), or a bug
    BAD_INPUT = 2        # unknown pod, bad address, bad flag
    TRACE_FAILED = 3     # the trace found a failure (drop, loss, missing or wrong reply)
    INTERRUPTED = 130    # Ctrl-C or SIGTERM; everything podtrace added was removed
    BROKEN_PIPE = 141    # the reader of stdout went away (`| head -1`): nothing more is printed


class PodtraceError(Exception):
    """Base class: a one-line message for the user and the exit code it maps to."""

    exit_code = ExitStatus.CANNOT_TRACE

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def line(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class EnvironmentProblem(PodtraceError):
    """The machine cannot do what was asked (no root, no BPF, no tracefs, lab not up)."""

    exit_code = ExitStatus.CANNOT_TRACE


class BadInput(PodtraceError):
    """The user asked for something that does not exist or does not parse."""

    exit_code = ExitStatus.BAD_INPUT


def require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"{what} needs root (network namespaces, BPF and iptables)",
            "run it again with sudo",
        )


# Capabilities tracing uses (bit numbers of linux/capability.h). CAP_SYS_ADMIN covers
# CAP_BPF and CAP_PERFMON (and older kernels know only it).
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def missing_capabilities(need: tuple[str, ...] = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN")
                         ) -> list[str]:
    """The capabilities of `need` this process lacks in its effective set (root whose
    capabilities were dropped: capsh --drop, a container's securityContext). [] when
    /proc/self/status cannot be read: the kernel will say no itself then."""
    try:
        with open("/proc/self/status") as f:
            eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return []
    have = {name for name, bit in CAPABILITIES.items() if eff >> bit & 1}
    if "CAP_SYS_ADMIN" in have:
        have |= {"CAP_BPF", "CAP_PERFMON"}
    return [c for c in need if c not in have]


def require_capabilities(what: str, need: tuple[str, ...] = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN",
                                                             "CAP_SYS_ADMIN")) -> None:
    missing = missing_capabilities(need)
    if missing:
        raise EnvironmentProblem(
            f"{what} needs {', '.join(missing)}, which this process lacks (its capabilities were dropped)",
            "run it as root with full capabilities (not under capsh --drop or a restricted securityContext); "
            "see SECURITY.md for what each is used for")
