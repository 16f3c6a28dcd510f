"""The lab's responder processes, one per pod (`tracer.lab.responder`): start, find, stop.

A responder runs in its pod's namespace and carries `PODTRACE_LAB_OWNER=PREFIX` in its
environment, so `lab down` finds it even when its namespace name is already gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from tracer.errors import EnvironmentProblem
from tracer.lab.model import APP_PORT, LabPlan
from tracer.lab.shell import BuildError
from tracer.node import netns

OWNER_ENV = "PODTRACE_LAB_OWNER"
RESPONDER_MODULE = "tracer.lab.responder"
_READY_TIMEOUT = 10.0

# Popen objects of responders this process started, kept so they can be reaped (no zombies,
# no ResourceWarning) when the same process later runs `down`.
_spawned: dict[int, subprocess.Popen] = {}


def start(topo: LabPlan) -> dict[str, int]:
    """Start every pod's responder and wait until each listens; {pod key: pid}."""
    env = dict(os.environ)
    env[OWNER_ENV] = topo.prefix
    # The responder must import this very package even when it is not installed.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    procs: dict[str, subprocess.Popen] = {}
    v6 = 6 in topo.families
    for p in topo.pods:
        log = open(topo.lab_dir / f"responder-{p.name}.log", "ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", p.netns, sys.executable, "-m", RESPONDER_MODULE,
                 "--name", p.name, "--port", str(APP_PORT), *(["--ipv6"] if v6 else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, env=env, cwd="/",
            )
        finally:
            log.close()
        _spawned[proc.pid] = proc
        procs[p.key] = proc
    inodes = {p.key: netns.inode(p.netns) for p in topo.pods}
    waiting = dict(procs)
    deadline = time.monotonic() + _READY_TIMEOUT
    while waiting:
        for key, proc in list(waiting.items()):
            if proc.poll() is not None:
                name = key.split("/", 1)[1]
                log = (topo.lab_dir / f"responder-{name}.log").read_text(errors="replace")
                last = log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}"
                raise BuildError(f"the responder of {name} died: {last}")
            if _listening(proc.pid, inodes[key], APP_PORT, v6):
                del waiting[key]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise BuildError(f"responders not listening after {_READY_TIMEOUT:.0f} s: "
                             + ", ".join(sorted(waiting)))
        time.sleep(0.01)
    return {key: proc.pid for key, proc in procs.items()}


def _listening(pid: int, ns_inode: int, port: int, v6: bool = False) -> bool:
    """True once `pid` is inside the pod namespace with TCP LISTEN and UDP sockets on `port`
    (IPv6 ones too with `v6`). /proc/PID/net shows the namespace of PID, so this needs no
    traffic."""
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino != ns_inode:
            return False
        tcp = Path(f"/proc/{pid}/net/tcp").read_text()
        udp = Path(f"/proc/{pid}/net/udp").read_text()
        tcp6 = Path(f"/proc/{pid}/net/tcp6").read_text() if v6 else None
        udp6 = Path(f"/proc/{pid}/net/udp6").read_text() if v6 else None
    except OSError:
        return False
    hexport = f":{port:04X}"

    def bound(table: str, state: str | None) -> bool:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(hexport) and (state is None or fields[3] == state):
                return True
        return False

    return (bound(tcp, "0A") and bound(udp, None)
            and (not v6 or (bound(tcp6, "0A") and bound(udp6, None))))


def owned_pids(prefix: str, names: Iterable[str]) -> set[int]:
    """Processes that belong to the lab: inside one of its namespaces, or tagged with its
    prefix in their environment (a responder whose namespace name is already gone)."""
    inodes = set()
    for ns in names:
        with contextlib.suppress(OSError):
            inodes.add(netns.inode(ns))
    me = os.getpid()
    tag = f"{OWNER_ENV}={prefix}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            if inodes and os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                found.add(pid)
                continue
            if RESPONDER_MODULE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    return found


def is_responder(pid: int, prefix: str | None) -> bool:
    """A responder process; of the lab with this prefix unless prefix is None."""
    try:
        if RESPONDER_MODULE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        if prefix is None:
            return True
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        return True  # not root: the command line is all we can check
    except OSError:
        return False
    return f"{OWNER_ENV}={prefix}".encode() in environ.split(b"\0")


def kill(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL, waiting for each to take effect."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while True:
            pids = {pid for pid in pids if _alive(pid)}
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not pids:
            return
    raise EnvironmentProblem(f"processes survived SIGKILL: {sorted(pids)}", "check `ps`")


def _alive(pid: int) -> bool:
    """Reaps our own children; a zombie counts as gone."""
    proc = _spawned.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _spawned[pid]
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def reap() -> None:
    """Forget (and reap) the responders this process started that have exited."""
    for pid, proc in list(_spawned.items()):
        if proc.poll() is not None:
            del _spawned[pid]
