"""The README and docs/ stand alone in the repository: every relative link opens inside it, no
path of the machine they were written on, no notes written for the team instead of users."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_relative_links_open_inside_the_repository():
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            p = (doc.parent / target).resolve()
            if not p.is_relative_to(ROOT) or not p.exists():
                bad.append(f"{doc.relative_to(ROOT)}: ({target})")
        bad += [f"{doc.relative_to(ROOT)}: {m}" for m in re.findall(r"(?<![\w.])\.\./[\w./-]+", text)
                if not (doc.parent / m).resolve().is_relative_to(ROOT)]
    assert not bad, "\n".join(bad)


def test_no_machine_paths_or_team_notes():
    pattern = re.compile(r"/work/|\bissue \d+|\bNot done yet\b", re.I)
    bad = [f"{doc.relative_to(ROOT)}:{i}: {line.strip()}" for doc in DOCS
           for i, line in enumerate(doc.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, "\n".join(bad)
