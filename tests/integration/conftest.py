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


@pytest.fixture(scope="module")
def tc_observers_everywhere():
    """PODTRACE_TC_OBSERVERS=all for a module's runs (the CLI's children inherit it): the
    flannel lab runs no tc program of its own, so by default a flow puts no tc observer on
    its devices. Modules that follow the observers' attachment and removal ask for them on
    every device of the path."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PODTRACE_TC_OBSERVERS", "all")
    yield
    mp.undo()
