"""Makes changes inside the lab's namespaces, recording how to undo each.

Every change goes through `ip -n NS`, `bridge -n NS`, `ip netns exec NS …`, a netlink socket
opened inside NS, or a write to /proc/sys while this thread is inside NS; NS is always one of
the lab's namespaces (checked here), never the root namespace, and no global sysctl is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab import topology as T
from tracer.lab.scenarios.labdoc import Lab
from tracer.node import netns


class Changes:
    """Performs changes in lab namespaces and records, for each, the operation that undoes
    it (JSON, replayed in reverse order by `fix`) and one human line."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.undo: list[dict] = []
        self.lines: list[str] = []

    def did(self, line: str, undo: dict, restored: str | None = None) -> None:
        """Record a change: its line, and the undo step (which keeps the line, and the line
        `fix` prints in the restoring direction when one is given)."""
        undo = dict(undo, what=line)
        if restored:
            undo["restored"] = restored
        self.undo.append(undo)
        self.lines.append(line)

    def sysctl(self, ns: str, key: str, value: str, node: str, also: list[str] = ()) -> None:
        """Set key=value in ns; `also` are keys the kernel changes as a side effect, whose
        values are recorded so `fix` puts them back too."""
        check_ns(self.lab, ns)
        before = {k: read_sysctl(ns, k) for k in [key, *also]}
        write_sysctl(ns, key, value)
        self.did(f"{node}: sysctl {dotted(key)} {before[key]} -> {value}",
                 {"op": "sysctl", "ns": ns, "values": before})

    def run(self, argv: list[str], line: str, undo_argv: list[str], *, input: str | None = None,
            undo_input: str | None = None, undo_ok: list[str] = (),
            restored: str | None = None) -> None:
        check_argv(self.lab, argv)
        run_cmd(argv, input=input)
        self.did(line, {"op": "cmd", "argv": undo_argv, "input": undo_input, "ok": list(undo_ok)},
                 restored)

    def iptables_restore(self, ns: str, doc: str, undo_doc: str, line: str, family: int = 4) -> None:
        """iptables-restore (ip6tables-restore for family 6) of `doc`, undone by `undo_doc`."""
        # With the nf_tables backend a table exists only once used: one this change creates
        # is removed again by `fix` (when nothing else has put rules in it meanwhile).
        present = nft_tables(ns, family)
        if present is not None:
            for table in [t[1:].strip() for t in doc.splitlines() if t.startswith("*")]:
                if table not in present:
                    self.undo.append({"op": "drop-empty-table", "ns": ns, "table": table,
                                      **({"family": 6} if family == 6 else {})})
        argv = ["ip", "netns", "exec", ns, restore_tool(family), "-w", "5", "--noflush"]
        self.run(argv, line, argv, input=doc, undo_input=undo_doc)


def dotted(key: str) -> str:
    # /proc/sys path → sysctl name; a dot in a device name is written as '/' by sysctl(8).
    parts = key.split("/")
    return ".".join(p.replace(".", "/") for p in parts)


def read_sysctl(ns: str, key: str) -> str:
    with netns.entered(ns):
        return Path("/proc/sys", key).read_text().strip()


def write_sysctl(ns: str, key: str, value: str) -> None:
    # setns() on this thread: /proc/sys/net resolves to the namespace of the caller.
    with netns.entered(ns):
        try:
            Path("/proc/sys", key).write_text(value)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot set {dotted(key)}={value} in {ns}: {exc.strerror}") from exc


def lab_namespaces(lab: Lab) -> set[str]:
    return {lab.fabric_netns, *(n.netns for n in lab.nodes), *(p.netns for p in lab.pods)}


def check_ns(lab: Lab, ns: str) -> None:
    # Never act outside the lab, whatever a (possibly hand-edited) record says.
    if ns not in lab_namespaces(lab) or not T.namespace_pattern(lab.prefix).match(ns):
        raise EnvironmentProblem(f"refusing to touch {ns!r}: not a namespace of lab {lab.prefix}")


def check_argv(lab: Lab, argv: list[str]) -> None:
    if argv[:3] == ["ip", "netns", "exec"] and len(argv) > 3:
        check_ns(lab, argv[3])
    elif argv[0] in ("ip", "bridge") and len(argv) > 2 and argv[1] == "-n":
        check_ns(lab, argv[2])
    else:
        raise EnvironmentProblem(f"refusing to run {' '.join(argv[:4])}: not inside a lab namespace")


def run_cmd(argv: list[str], input: str | None = None, ok: list[str] = ()) -> str:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"`{argv[0]}` is not installed") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        if any(text in err for text in ok):
            return proc.stdout
        raise EnvironmentProblem(f"`{' '.join(argv)}` failed: {' / '.join(err.splitlines()[:2]) or proc.returncode}")
    return proc.stdout


def ip_json(ns: str, *args: str):
    return json.loads(run_cmd(["ip", "-n", ns, "-j", *args]) or "[]")


def iptables_tool(family: int = 4) -> str:
    return "iptables" if family == 4 else "ip6tables"


def restore_tool(family: int = 4) -> str:
    return iptables_tool(family) + "-restore"


def iptables_save(ns: str, table: str, family: int = 4) -> str:
    return run_cmd(["ip", "netns", "exec", ns, iptables_tool(family) + "-save", "-t", table])


def nft_tables(ns: str, family: int = 4) -> set[str] | None:
    """The `ip` (`ip6` for family 6) nf_tables tables of ns, or None when iptables is not the
    nft flavour."""
    if "nf_tables" not in run_cmd(["ip", "netns", "exec", ns, "iptables", "-V"]):
        return None
    out = run_cmd(["ip", "netns", "exec", ns, "nft", "list", "tables"])
    nft_family = "ip" if family == 4 else "ip6"
    return {words[2] for words in (line.split() for line in out.splitlines())
            if len(words) == 3 and words[:2] == ["table", nft_family]}


def chains(save: str) -> set[str]:
    return {line[1:].split()[0] for line in save.splitlines() if line.startswith(":")}


def write_file(path: Path, content: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(content)
    tmp.chmod(0o644)
    os.replace(tmp, path)
