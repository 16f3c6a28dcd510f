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
