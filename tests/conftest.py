"""Shared test policy: integration tests need root, BPF and namespaces.

Where the environment cannot trace they skip with the reason; with CI=true or
PODTRACE_REQUIRE_BPF=1 they fail instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import time

# Every flow a test starts, in process or as a command line, defaults to the single-process
# runner: on the lab every node shares this kernel, and a test about something else than the
# agents (hooks, capture, safety, runbooks, diagnosis) then pays one BCC compile, not one per
# node. The agents path, the product's default, is the subject of its own tests: the core flow
# and IPv6 end-to-end tests run the command line without this variable, as a user does, and
# the agent, clock, partial-view, exec, kill and scenario tests name `agents`.
# Whoever runs the suite may name a mode for everything with PODTRACE_FLOW_MODE.
os.environ.setdefault("PODTRACE_FLOW_MODE", "single")


def subprocess_env(**extra: str) -> dict:
    """The environment of a command the tests start: this process's (the flow mode included)
    with `extra` on top. A test that wants the product's default mode pops the variable."""
    env = dict(os.environ)
    env.update(extra)
    return env


def todays_share(items: list, parts: int) -> list:
    """One of `parts` interleaved shares of `items`, a different one each day, so that the
    suite keeps within its time while every case runs every few days. PODTRACE_SCENARIO_OFFSET
    picks the share (any integer); PODTRACE_ALL_SCENARIOS=1 runs them all."""
    if os.environ.get("PODTRACE_ALL_SCENARIOS") == "1":
        return list(items)
    offset = int(os.environ.get("PODTRACE_SCENARIO_OFFSET", time.gmtime().tm_yday))
    return list(items)[offset % parts::parts]


def must_run() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PODTRACE_REQUIRE_BPF") == "1"


def wait_until(pred, seconds: float, step: float = 0.05) -> bool:
    """Readiness instead of a fixed sleep: True as soon as `pred()` holds, False at the deadline."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def environment_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF at /sys/kernel/btf/vmlinux"
    return None


# The agent-image tests (tests/integration/test_image.py) download ~200 MB and take minutes:
# opt-in with PODTRACE_IMAGE_TEST=1. Without it they are deselected, which pytest counts in its
# summary line ("N deselected") and which the summary below names, rather than skipped.
IMAGE_OPT_IN = "PODTRACE_IMAGE_TEST"


def pytest_configure(config):
    config.addinivalue_line("markers", f"image: builds the agent image's rootfs (opt-in: {IMAGE_OPT_IN}=1)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get(IMAGE_OPT_IN) == "1":
        return
    image = [i for i in items if i.get_closest_marker("image")]
    if image:
        config.hook.pytest_deselected(items=image)
        items[:] = [i for i in items if not i.get_closest_marker("image")]
        config._podtrace_image_deselected = len(image)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_podtrace_image_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} agent-image test(s) deselected (opt-in, ~200 MB download): "
                                    f"run them with {IMAGE_OPT_IN}=1")
