"""Shared test policy: integration tests need root, BPF and namespaces.

Where the environment cannot trace they skip with the reason; with CI=true or
PODTRACE_REQUIRE_BPF=1 they fail instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os

# Flows in tests run in one process unless a test is about the agents (those pass
# mode="agents" or set PODTRACE_FLOW_MODE=agents): three BCC compiles per flow on a 2-CPU
# machine would otherwise dominate the suite's time. Both are product paths.
os.environ.setdefault("PODTRACE_FLOW_MODE", "single")


def must_run() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PODTRACE_REQUIRE_BPF") == "1"


def environment_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF at /sys/kernel/btf/vmlinux"
    return None
