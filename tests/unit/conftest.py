"""Unit tests keep their state to themselves: the trace files they write register under a
temporary PODTRACE_STATE_DIR, never in the machine's /run/podtrace (where a real `podtrace
cleanup` would act on them)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path_factory.getbasetemp() / "podtrace-state"))


@pytest.fixture
def inv(tmp_path):
    """The default lab's inventory, read back through the v1 List loader."""
    import json

    from tracer.cluster import inventory
    from tracer.lab import topology as T

    f = tmp_path / "inv.json"
    f.write_text(json.dumps(T.inventory(T.plan(T.LabConfig(prefix="ptunit")))))
    return inventory.load_list(f)
