"""The record of what `lab break` changed: LAB_DIR/broken.json.

The file is the lab's private bookkeeping, deliberately undocumented: the tracer's diagnosis
must never read it and must decide from evidence. It holds, per broken scenario, the node,
the time, one human line per change and the undo steps `fix` replays in reverse order.
`lab down` removes it with the rest of the lab.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab import topology as T
from tracer.lab.model import prefix_flag
from tracer.lab.scenarios import changes as C

BROKEN_FILE = "broken.json"
_FORMAT = 1


def location(prefix: str | None, state_dir: Path | str | None) -> Path:
    """Where the record of the lab with this prefix lives."""
    return T.lab_dir(prefix, state_dir) / BROKEN_FILE


def broken(prefix: str | None = None, state_dir: Path | str | None = None) -> dict:
    """{scenario: {"node", "since", "changes"}} of what is broken in this lab now."""
    try:
        doc = json.loads(location(prefix, state_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot read {location(prefix, state_dir)}: {exc}",
                                 f"run: podtrace lab down{prefix_flag(prefix)} && podtrace lab up{prefix_flag(prefix)}") from exc
    return {name: {k: rec.get(k) for k in ("node", "since", "changes")}
            for name, rec in doc.get("scenarios", {}).items()}


def load(path: Path) -> dict:
    """The whole record, for `break` and `fix` (an empty one when nothing is broken)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": _FORMAT, "scenarios": {}}
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot read {path}: {exc}",
                                 "run: podtrace lab down && podtrace lab up") from exc
    doc.setdefault("scenarios", {})
    return doc


def save(path: Path, doc: dict) -> None:
    """Write the record, or remove the file once nothing is broken."""
    if doc["scenarios"]:
        C.write_file(path, json.dumps(doc, indent=2) + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
