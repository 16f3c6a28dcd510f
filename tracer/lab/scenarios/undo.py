"""Replays recorded undo steps (for `lab fix`, or a `lab break` that failed part-way)."""

from __future__ import annotations

from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios import conntrack
from tracer.lab.scenarios.labdoc import Lab
from tracer.lab.scenarios.record import BROKEN_FILE


def step(lab: Lab, op: dict) -> None:
    """Undo one recorded change; every step is checked to stay inside the lab."""
    kind = op["op"]
    if kind == "sysctl":
        C.check_ns(lab, op["ns"])
        for key, value in op["values"].items():
            if C.read_sysctl(op["ns"], key) != value:
                C.write_sysctl(op["ns"], key, value)
    elif kind == "cmd":
        C.check_argv(lab, op["argv"])
        C.run_cmd(op["argv"], input=op.get("input"), ok=op.get("ok") or [])
    elif kind == "ct-flush-mark":
        C.check_ns(lab, op["ns"])
        conntrack.flush_mark(op["ns"], int(op["mark"]))
    elif kind == "drop-empty-table":
        C.check_ns(lab, op["ns"])
        present = C.nft_tables(op["ns"])
        save = C.iptables_save(op["ns"], op["table"])
        builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
        if (present and op["table"] in present and "\n-A " not in save
                and C.chains(save) <= builtin):
            C.run_cmd(["ip", "netns", "exec", op["ns"], "nft", "delete", "table", "ip", op["table"]])
    elif kind == "file":
        path = Path(op["path"])
        if path.parent != lab.inventory.parent:
            raise EnvironmentProblem(f"refusing to write {path}: not a file of lab {lab.prefix}")
        C.write_file(path, op["content"])
    else:
        raise EnvironmentProblem(f"unknown undo step {kind!r} in {BROKEN_FILE}")


def rollback(lab: Lab, steps: list[dict]) -> list[str]:
    """Undo every step, last first, going on past failures; the errors, in order."""
    errors = []
    for op in reversed(steps):
        try:
            step(lab, op)
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest, report all
            errors.append(str(exc))
    return errors
