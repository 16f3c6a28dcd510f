"""Who owns what a podtrace run leaves on the machine while it runs, so `podtrace cleanup`
removes what killed runs left and never what a running one still uses.

A process is named by its pid *and* its start time (field 22 of /proc/PID/stat, clock ticks
since boot): a pid the kernel has since given to another process is not the owner. Records
live in the state directory (PODTRACE_STATE_DIR, default /run/podtrace): tc attachments
(tracer/tcattach.py) and the trace files being written (`writing/<pid>-<n>.json`, here).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
from pathlib import Path

from tracer import settings

WRITING = "writing"
_seq = itertools.count(1)


def state_dir() -> Path:
    return settings.state_dir()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (when the process started, in clock ticks since boot);
    None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        # the command name (field 2) is in parentheses and may hold spaces or ")"
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def me() -> tuple[int, int | None]:
    pid = os.getpid()
    return pid, start_time(pid)


def alive(pid: int, start: int | None = None) -> bool:
    """`pid` is running (a zombie, killed but not yet reaped, is not) and, when `start` is
    given, is the same process that had that start time."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    if not fields or fields[0] == "Z":
        return False
    if start is None:
        return True
    try:
        return int(fields[19]) == int(start)
    except (IndexError, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------
# Trace files being written

def writing_dir() -> Path:
    return state_dir() / WRITING


def register_writer(part: Path, path: Path, tmp: Path) -> Path | None:
    """Record that this process writes `part` (to become `path`, through `tmp`). None when
    the state directory is not writable: the file is still written, only `cleanup` will not
    find it after a SIGKILL."""
    pid, start = me()
    reg = writing_dir() / f"{pid}-{next(_seq)}.json"
    doc = {"pid": pid, "start": start, "part": str(Path(part).absolute()),
           "path": str(Path(path).absolute()), "tmp": str(Path(tmp).absolute())}
    try:
        reg.parent.mkdir(parents=True, exist_ok=True)
        staging = reg.with_name(reg.name + ".new")
        staging.write_text(json.dumps(doc))
        staging.replace(reg)          # a reader sees the whole record or none
    except OSError:
        return None
    return reg


def unregister(reg: Path | None) -> None:
    if reg is not None:
        with contextlib.suppress(OSError):
            reg.unlink()


def registered_writers() -> list[dict]:
    """Every registration (with its own path under `registration`), oldest first; a record
    that cannot be read is returned with `damaged` set."""
    out = []
    try:
        regs = sorted(writing_dir().glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    except OSError:
        return []
    for reg in regs:
        try:
            doc = json.loads(reg.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int) or not isinstance(doc.get("path"), str):
                raise ValueError("not a writer record")
            # cleanup deletes these paths: only ever the two a Writer derives from its file
            if doc.get("part") != doc["path"] + ".part" or doc.get("tmp") != doc["path"] + ".part.tmp":
                raise ValueError("paths that are not a writer's")
        except (OSError, ValueError):
            doc = {"damaged": True}
        doc["registration"] = str(reg)
        out.append(doc)
    return out


@contextlib.contextmanager
def writers_locked():
    """One `cleanup` at a time salvages the files of dead writers."""
    d = writing_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def writer_running(w: dict) -> bool:
    return not w.get("damaged") and alive(w["pid"], w.get("start"))
