"""A trace file to write: never over an existing file unless the user said --force."""

from __future__ import annotations

from pathlib import Path

from tracer.errors import BadInput


def refuse_existing(path: str | None, force: bool) -> None:
    """Checked before tracing starts: a trace must not cost the file someone kept."""
    if path and not force and (Path(path).exists() or Path(path).is_symlink()):
        raise BadInput(f"{path} exists", "use --force to overwrite")
