"""Entering named network namespaces (`ip netns`) from Python.

A socket keeps the network namespace it was created in, so probes are sent by creating
their sockets inside the pod's namespace and switching back at once. setns() changes only
the calling thread, which is why every switch is wrapped in a context manager that always
restores the original namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from pathlib import Path

from tracer.errors import BadInput, EnvironmentProblem

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise EnvironmentProblem(f"setns failed: {os.strerror(err)}", "run as root")


def netns_path(name: str) -> Path:
    """A named namespace (`ip netns`), or an absolute path such as /proc/PID/ns/net."""
    return Path(name) if name.startswith("/") else NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def inode(name: str) -> int:
    """Inode of a named namespace: what BPF sees as net->ns.inum."""
    return os.stat(netns_path(name)).st_ino


def list_names() -> list[str]:
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir())


@contextlib.contextmanager
def entered(name: str):
    """Run the body with this thread inside network namespace `name`."""
    path = netns_path(name)
    if not path.exists():
        raise BadInput(f"network namespace {name!r} does not exist", "check `ip netns list`")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(name: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket that lives in network namespace `name`."""
    with entered(name):
        return socket.socket(family, type_, proto)


def run(name: str | None, *argv: str, check: bool = True, input: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command inside namespace `name` (or the current one when None)."""
    cmd = list(argv) if name is None else ["ip", "netns", "exec", name, *argv]
    return subprocess.run(cmd, check=check, input=input, capture_output=True, text=True,
                          timeout=timeout)
