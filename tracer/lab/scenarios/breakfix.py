"""Breaks or fixes one scenario in an up lab, under the lab lock, keeping broken.json current.

`break` injects the fault and records how to undo each change (undoing what it did if it
fails part-way); `fix` undoes exactly what `break` changed, from that record, and says for each change whether
it restored it or found it already restored (fixed by hand).
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


def _lab_up(prefix: str | None, state_dir: Path | str | None, family: int | None = None) -> Lab:
    doc = build.status(prefix, state_dir)
    if doc is None:
        name = T.validate_prefix(prefix or T.default_prefix())
        hint = "podtrace lab up" if name == T.DEFAULT_PREFIX else f"podtrace lab --prefix {name} up"
        raise EnvironmentProblem(f"no lab {name} is up", f"run: {hint}")
    lab = Lab(doc)
    if family is not None and family not in lab.families:
        return lab   # registry.check_family says what is wrong
    return Lab(doc, family)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def break_scenario(name: str, node: str | None = None, prefix: str | None = None,
                   state_dir: Path | str | None = None, family: int | None = None) -> Outcome:
    """Inject the fault, against targets of `family` (4 or 6; default the lab's first).
    Breaking what is already broken changes nothing."""
    sc = registry.get(name)
    require_root("podtrace lab break")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with guard.locked(root):
        lab = _lab_up(prefix, state_dir, family)
        registry.check_family(sc, lab, family)
        node = registry.resolve_node(sc, lab, node)
        path = record.location(lab.prefix, state_dir)
        state = record.load(path)
        rec = state["scenarios"].get(name)
        if rec is not None:
            where = f" on {rec['node']}" if rec.get("node") else ""
            was = Lab(lab.doc, rec.get("family"))
            return Outcome(name, rec.get("node"), False,
                           f"{name} is already broken{where} (since {rec.get('since')}); "
                           f"nothing changed. Undo it with: podtrace lab fix {name}",
                           rec.get("changes", []), registry.flow_command(sc, was, rec.get("node")))
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
                                        "undo": ch.undo, "family": lab.family}
            with guard.shielded():
                record.save(path, state)
    where = f" on {node}" if node else " on every node"
    return Outcome(name, node, True, f"broke {name}{where}", ch.lines,
                   registry.flow_command(sc, lab, node))


def fix_scenario(name: str, prefix: str | None = None,
                 state_dir: Path | str | None = None) -> Outcome:
    """Undo exactly what `break` changed, skipping what was already put back by hand.
    Fixing what is not broken changes nothing."""
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
        lab = Lab(lab.doc, rec.get("family"))
        steps = list(rec["undo"])
        lines: list[str] = []
        failed: list[tuple[dict, str]] = []
        with guard.shielded():
            try:
                # Last change first; a step that fails does not stop the others (the fault
                # may have been fixed partly by hand), and stays recorded for a retry.
                for op in reversed(steps):
                    try:
                        line = undo.step(lab, op)
                    except Exception as exc:  # noqa: BLE001 - undo the rest, report it
                        failed.append((op, guard.why(exc)))
                        continue
                    if line:
                        lines.append(line)
            finally:
                if failed:
                    rec["undo"] = [op for op in steps if any(op is f for f, _ in failed)]
                else:
                    del state["scenarios"][name]
                record.save(path, state)
    if failed:
        raise EnvironmentProblem(
            f"fixing {name}: {len(failed)} of {len(steps)} steps failed, first: {failed[0][1]}",
            f"retry: podtrace lab fix {name}; or rebuild: podtrace lab down && podtrace lab up")
    where = f" on {rec['node']}" if rec.get("node") else " on every node"
    return Outcome(name, rec.get("node"), True, f"fixed {name}{where}", lines,
                   registry.flow_command(sc, lab, rec.get("node")))
