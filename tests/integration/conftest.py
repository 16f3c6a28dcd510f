"""Integration tests: real namespaces, real iptables, real BPF. Skip or fail per policy."""

from __future__ import annotations

import pytest

from tests.conftest import environment_problem, must_run


@pytest.fixture(autouse=True)
def _needs_privileges():
    problem = environment_problem()
    if problem:
        if must_run():
            pytest.fail(f"cannot run: {problem} (CI=true or PODTRACE_REQUIRE_BPF=1 forbids skipping)")
        pytest.skip(problem)
