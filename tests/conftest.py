"""Shared test policy: integration tests need root, BPF and namespaces.

Where the environment cannot trace they skip with the reason; with CI=true or
PODTRACE_REQUIRE_BPF=1 they fail instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os

# In-process `run_flow` calls default to the single-process runner: a test about something
# else than the flow (hooks, capture, safety) then pays one BCC compile, not one per node.
# The core flow tests (tests/integration/test_flow.py) pass mode="agents", the product's
# default, and the command line, run as a user runs it, drops this variable.
os.environ.setdefault("PODTRACE_FLOW_MODE", "single")


def must_run() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PODTRACE_REQUIRE_BPF") == "1"


def environment_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF at /sys/kernel/btf/vmlinux"
    return None
