"""A flow run cuts the events into packets once and builds the packets once, in both modes."""

from __future__ import annotations

import pytest

from tests.integration.lab_fixture import lab  # noqa: F401  (session fixture)
from tracer.config import FlowConfig
from tracer.reconstruct import packets
from tracer.runs import flow, outcome
from tracer.runs.flow import run_flow


@pytest.fixture
def calls(monkeypatch):
    """How often the reconstruction's two stages ran (wrapping the real functions in every
    module that calls them, since they are imported by name)."""
    n = {"assign_packets": 0, "build_packets": 0}
    for name in n:
        real = getattr(packets, name)

        def counted(*a, _real=real, _name=name, **kw):
            n[_name] += 1
            return _real(*a, **kw)
        for module in (packets, flow, outcome):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted)
    return n


@pytest.mark.parametrize("mode", ["single", "agents"])
def test_packets_assigned_and_built_once(lab, calls, mode):
    # The coordinator runs in this process even when the agents are processes of their own.
    r = run_flow(FlowConfig(src="pod-1-1", dst="svc/default/web", proto="tcp", port=80, count=2,
                            lab_prefix=lab["prefix"], mode=mode))
    assert r.ok, r.verdict
    assert {p.direction for p in r.packets} == {"request", "reply"}
    assert calls == {"assign_packets": 1, "build_packets": 1}
