"""Breaks or fixes one scenario in an up lab, under the lab lock, keeping broken.json current.

`break` injects the fault and records how to undo each change (undoing what it did if it
fails part-way); `fix` undoes exactly what `break` changed, from that record.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

from tracer.errors import EnvironmentProblem, require_root
from tracer.lab import build, guard
from tracer.lab import topology as T
from tracer.lab.scenarios import record, registry, undo
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab


@dataclass
class Outcome:
    """What `lab break` or `lab fix` did, for the command to print."""

    scenario: str
    node: str | None
    changed: bool
    message: str
    changes: list[str] = field(default_factory=list)
    show: str | None = None


def _lab_up(prefix: str | None, state_dir: Path | str | None) -> Lab:
    doc = build.status(prefix, state_dir)
    if doc is None:
        name = T.validate_prefix(prefix or T.default_prefix())
        hint = "podtrace lab up" if name == T.DEFAULT_PREFIX else f"podtrace lab --prefix {name} up"
        raise EnvironmentProblem(f"no lab {name} is up", f"run: {hint}")
    return Lab(doc)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def break_scenario(name: str, node: str | None = None, prefix: str | None = None,
                   state_dir: Path | str | None = None) -> Outcome:
    """Inject the fault. Breaking what is already broken changes nothing."""
    sc = registry.get(name)
    require_root("podtrace lab break")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with guard.locked(root):
        lab = _lab_up(prefix, state_dir)
        node = registry.resolve_node(sc, lab, node)
        path = record.location(lab.prefix, state_dir)
        state = record.load(path)
        rec = state["scenarios"].get(name)
        if rec is not None:
            where = f" on {rec['node']}" if rec.get("node") else ""
            return Outcome(name, rec.get("node"), False,
                           f"{name} is already broken{where} (since {rec.get('since')}); "
                           f"nothing changed. Undo it with: podtrace lab fix {name}",
                           rec.get("changes", []), registry.flow_command(sc, lab, rec.get("node")))
        ch = Changes(lab)
        with guard.interrupts_as_keyboard_interrupt():
            try:
                sc.inject(ch, lab, node)
            except BaseException as exc:
                with guard.shielded():
                    errors = undo.rollback(lab, ch.undo)
                if errors and isinstance(exc, Exception):
                    raise EnvironmentProblem(
                        f"breaking {name} failed ({guard.why(exc)}) and undoing it failed too: "
                        f"{errors[0]}", "run: podtrace lab down && podtrace lab up") from exc
                raise
            state["scenarios"][name] = {"node": node, "since": _now(), "changes": ch.lines,
                                        "undo": ch.undo}
            with guard.shielded():
                record.save(path, state)
    where = f" on {node}" if node else " on every node"
    return Outcome(name, node, True, f"broke {name}{where}", ch.lines,
                   registry.flow_command(sc, lab, node))


def fix_scenario(name: str, prefix: str | None = None,
                 state_dir: Path | str | None = None) -> Outcome:
    """Undo exactly what `break` changed. Fixing what is not broken changes nothing."""
    sc = registry.get(name)
    require_root("podtrace lab fix")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with guard.locked(root):
        lab = _lab_up(prefix, state_dir)
        path = record.location(lab.prefix, state_dir)
        state = record.load(path)
        rec = state["scenarios"].get(name)
        if rec is None:
            return Outcome(name, None, False, f"{name} is not broken; nothing to do")
        steps = list(rec["undo"])
        with guard.shielded():
            try:
                while steps:
                    undo.step(lab, steps[-1])
                    steps.pop()
            finally:
                # What is left (after a failure) stays recorded, so `fix` can be retried.
                if steps:
                    rec["undo"] = steps
                else:
                    del state["scenarios"][name]
                record.save(path, state)
    where = f" on {rec['node']}" if rec.get("node") else " on every node"
    return Outcome(name, rec.get("node"), True, f"fixed {name}{where}",
                   rec.get("changes", []), registry.flow_command(sc, lab, rec.get("node")))
