"""The runbook a verdict names is printed as a path that opens from any directory (the JSON
keeps the contract's repository-relative name)."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from tracer import render, runbooks
from tracer.reconstruct.model import Verdict

ROOT = Path(__file__).resolve().parents[2]


def test_every_runbook_opens_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    books = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
    assert books
    for book in books:
        rel = f"docs/runbooks/{book.name}"
        p = runbooks.where(rel)
        assert os.path.isabs(p) and Path(p).read_text() == book.read_text(), rel


def test_unknown_runbook_stays_as_named():
    assert runbooks.where("docs/runbooks/no-such-book.md") == "docs/runbooks/no-such-book.md"


def test_the_verdict_line_prints_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v = Verdict("dropped", "node-2", "eth0", "drop", reason="NETFILTER_DROP", runbook="docs/runbooks/netfilter-drop.md")
    console = Console(width=300, record=True)
    console.print(render.verdict_line(v))
    line = next(x for x in console.export_text().splitlines() if "runbook:" in x)
    path = line.split("runbook:", 1)[1].strip()
    assert path == str(ROOT / "docs" / "runbooks" / "netfilter-drop.md") and Path(path).is_file()
    assert v.as_json()["runbook"] == "docs/runbooks/netfilter-drop.md"     # the contract's value
