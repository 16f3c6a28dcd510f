"""Replays recorded undo steps (for `lab fix`, or a `lab break` that failed part-way).

Each step says what it restored, in the restoring direction ("node-1: restored
net.ipv4.ip_forward 0 → 1"), or that it found the change already gone: someone may have fixed
the fault by hand, following the runbook, before running `lab fix`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios import conntrack
from tracer.lab.scenarios.labdoc import Lab
from tracer.lab.scenarios.record import BROKEN_FILE

RESTORED = "restored"
ALREADY = "already restored"
# What an undo command says when what it removes (or adds back) is already gone (or there).
_ALREADY_DONE = ("No such process", "No such file or directory", "Cannot find device",
                 "does not exist", "Bad rule", "No chain/target/match by that name",
                 "0 flow entries", "File exists", "Cannot assign requested address")


def _where(lab: Lab, ns: str) -> str:
    names = {lab.fabric_netns: "fabric", **{n.netns: n.name for n in lab.nodes},
             **{p.netns: p.name for p in lab.pods}}
    return names.get(ns, ns)


def step(lab: Lab, op: dict) -> str | None:
    """Undo one recorded change; every step is checked to stay inside the lab. Returns one
    line, "restored: …", "undone: …" or "already restored: …" (None for bookkeeping steps)."""
    kind = op["op"]
    what = op.get("restored") or op.get("what") or " ".join(op.get("argv") or []) or kind
    # A break line ("chain X drops ...") is reported as undone; a restoring line as restored.
    did = RESTORED if op.get("restored") else "undone"
    if kind == "sysctl":
        return _sysctl(lab, op)
    if kind == "cmd":
        C.check_argv(lab, op["argv"])
        if "iptables-restore" in op["argv"] or "ip6tables-restore" in op["argv"]:
            return _iptables(lab, op, what)
        try:
            C.run_cmd(op["argv"], input=op.get("input"))
        except EnvironmentProblem as exc:
            if not any(text in str(exc) for text in [*_ALREADY_DONE, *(op.get("ok") or [])]):
                raise
            return f"{ALREADY}: {what}"
        return f"{did}: {what}"
    if kind == "ct-flush-mark":
        C.check_ns(lab, op["ns"])
        before = int(C.read_sysctl(op["ns"], "net/netfilter/nf_conntrack_count"))
        conntrack.flush_mark(op["ns"], int(op["mark"]))
        after = int(C.read_sysctl(op["ns"], "net/netfilter/nf_conntrack_count"))
        where = _where(lab, op["ns"])
        if after >= before:
            return f"{ALREADY}: {where}: no filler conntrack entries left (mark {int(op['mark']):#x})"
        return (f"{RESTORED}: {where}: conntrack entries {before} → {after} (the filler entries, "
                f"mark {int(op['mark']):#x}, flushed)")
    if kind == "ct-timeouts":
        C.check_ns(lab, op["ns"])
        if op["entries"]:
            conntrack.unpin(op["ns"], op["entries"])
            return (f"{RESTORED}: {_where(lab, op['ns'])}: {len(op['entries'])} conntrack entries of "
                    "earlier traffic have their own timeouts again")
        return None
    if kind == "drop-empty-table":
        C.check_ns(lab, op["ns"])
        family = int(op.get("family", 4))
        present = C.nft_tables(op["ns"], family)
        save = C.iptables_save(op["ns"], op["table"], family)
        builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
        if (present and op["table"] in present and "\n-A " not in save
                and C.chains(save) <= builtin):
            C.run_cmd(["ip", "netns", "exec", op["ns"], "nft", "delete", "table",
                       "ip" if family == 4 else "ip6", op["table"]])
        return None
    if kind == "file":
        path = Path(op["path"])
        if path.parent != lab.inventory.parent:
            raise EnvironmentProblem(f"refusing to write {path}: not a file of lab {lab.prefix}")
        if path.exists() and path.read_text() == op["content"]:
            return f"{ALREADY}: {what}"
        C.write_file(path, op["content"])
        return f"undone: {what}"
    raise EnvironmentProblem(f"unknown undo step {kind!r} in {BROKEN_FILE}")


def _sysctl(lab: Lab, op: dict) -> str:
    """The first key is the one the break set; the others changed with it (kernel side
    effects) and are put back silently."""
    C.check_ns(lab, op["ns"])
    where = _where(lab, op["ns"])
    lines = []
    for i, (key, value) in enumerate(op["values"].items()):
        now = C.read_sysctl(op["ns"], key)
        if now != value:
            C.write_sysctl(op["ns"], key, value)
            if i == 0:
                lines.append(f"{where}: {RESTORED} {C.dotted(key)} {now} → {value}")
        elif i == 0:
            lines.append(f"{where}: {ALREADY}: {C.dotted(key)} is {value}")
    return lines[0] if lines else f"{where}: {ALREADY}"


def _iptables(lab: Lab, op: dict, what: str) -> str:
    """An iptables-restore undo: atomically when it applies as a whole; otherwise (a rule or
    chain already removed by hand) line by line, skipping what is already as it should be."""
    try:
        C.run_cmd(op["argv"], input=op.get("input"))
        return f"undone: {what}"
    except EnvironmentProblem:
        pass
    ns = op["argv"][3]
    family = 6 if op["argv"][4] == "ip6tables-restore" else 4
    done = skipped = 0
    table = "filter"
    for line in (op.get("input") or "").splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line or line == "COMMIT" or line.startswith("#"):
            continue
        if _iptables_line(ns, table, line, family):
            done += 1
        else:
            skipped += 1
    if not done:
        return f"{ALREADY}: {what}"
    return f"undone: {what} ({skipped} of {done + skipped} parts were already undone)"


def _iptables_line(ns: str, table: str, line: str, family: int = 4) -> bool:
    """Apply one iptables-save line unless it is already in effect; True when it changed."""
    base = ["ip", "netns", "exec", ns, C.iptables_tool(family), "-w", "5", "-t", table]
    exists = C.chains(C.iptables_save(ns, table, family))
    if line.startswith(":"):
        chain = line[1:].split()[0]
        if chain in exists:
            return False
        C.run_cmd([*base, "-N", chain])
        return True
    words = shlex.split(line)
    op, chain, rest = words[0], words[1], words[2:]
    if op in ("-F", "-X"):
        if chain not in exists:
            return False
        C.run_cmd([*base, op, chain])
        return True
    spec = rest[1:] if op == "-I" and rest and rest[0].isdigit() else rest
    present = chain in exists and _rule_present(base, chain, spec)
    if (op == "-D") != present:
        return False
    C.run_cmd([*base, op, chain, *rest])
    return True


def _rule_present(base: list[str], chain: str, spec: list[str]) -> bool:
    try:
        C.run_cmd([*base, "-C", chain, *spec])
        return True
    except EnvironmentProblem:
        return False


def rollback(lab: Lab, steps: list[dict]) -> list[str]:
    """Undo every step, last first, going on past failures; the errors, in order."""
    errors = []
    for op in reversed(steps):
        try:
            step(lab, op)
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest, report all
            errors.append(str(exc))
    return errors
