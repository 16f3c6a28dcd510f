"""A real lab for integration tests, plus helpers to talk to it and to check for leaks.

Use it from any integration test module:

    from tests.integration.lab_fixture import lab  # noqa: F401  (pytest fixture)

    def test_something(lab):
        src = next(p for p in lab["pods"] if p["name"] == "pod-1-1")
        assert tcp_ask(src["netns"], "10.96.0.10", 80) == "pod-2-2"

`lab` is session-scoped: the first test that asks for it brings up a default lab
(2 nodes x 2 pods, flannel) with prefix `pttest` — never the user's `ptlab` — and the
session downs it at the end, also when tests fail or are interrupted. It yields the status
document (`podtrace lab status -o json`). It skips (or fails under CI=true /
PODTRACE_REQUIRE_BPF=1) where the machine cannot run it, like every integration test.

Helpers (all traffic is sent from inside a lab namespace):
- `ping(netns, ip)` -> source address of the ICMP echo reply, or None
- `tcp_ask(netns, ip, port)` / `udp_ask(netns, ip, port)` -> the responder's answer, e.g. "pod-2-1"
- `machine_snapshot(prefix=None)` -> (netns names, root-namespace link names, responder pids)
  for before/after leak checks; with `prefix`, namespaces and responders are limited to that
  lab's, so other labs coming and going on the machine do not disturb the comparison.
- `run_cli(*args, prefix=..., user_nobody=False)` -> CompletedProcess of `python -m tracer.cli`.

Readiness, never a fixed sleep:
- `wait_until(pred, seconds)` -> True as soon as `pred()` holds, False at the deadline.
- `session_processes(sid)` -> pids (zombies too) of a run started with `start_new_session=True`
  and of everything it spawned: empty once all of them are gone and reaped.
- `drain_all(session)` -> drains a TraceSession until its sink holds every event the kernel emitted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import environment_problem, must_run, subprocess_env, wait_until
from tracer.node import netns
from tracer.node import prober
from tracer.lab import build
from tracer.lab import topology as T

LAB_PREFIX = os.environ.get("PODTRACE_TEST_LAB_PREFIX", "pttest")
REPO_ROOT = Path(__file__).resolve().parents[2]


def require_environment() -> None:
    """Skip (or fail under CI=true / PODTRACE_REQUIRE_BPF=1) where the machine cannot run a
    lab. Session and module fixtures run before the per-test autouse check: they call this."""
    problem = environment_problem()
    if problem:
        if must_run():
            pytest.fail(f"cannot run: {problem} (CI=true or PODTRACE_REQUIRE_BPF=1 forbids skipping)")
        pytest.skip(problem)


@contextlib.contextmanager
def private_lab(prefix: str, **config):
    """A lab of its own for tests that break things; always taken down, even on failure."""
    require_environment()
    build.down(prefix)  # leftovers of a run that was killed
    try:
        doc, _ = build.up(T.LabConfig(prefix=prefix, **config))
        yield doc
    finally:
        build.down(prefix)


@pytest.fixture(scope="session")
def lab():
    with private_lab(LAB_PREFIX) as doc:
        yield doc


def pod(doc: dict, name: str) -> dict:
    return next(p for p in doc["pods"] if p["name"] == name)


def node(doc: dict, name: str) -> dict:
    return next(n for n in doc["nodes"] if n["name"] == name)


def service(doc: dict, name: str) -> dict:
    return next(s for s in doc["services"] if s["name"] == name)


# ---------------------------------------------------------------------------------------
# Traffic from inside a namespace

_checksum = prober._checksum   # one implementation of the Internet checksum


def ping(ns: str, ip: str, timeout: float = 2.0, seq: int = 1) -> str | None:
    """One ICMP echo from inside `ns` (this machine has no `ping`): the reply's source
    address, or None when no reply came."""
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(timeout)
    ident = (os.getpid() + seq) & 0xFFFF
    payload = b"podtrace-lab-test"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
    try:
        sock.sendto(packet, (ip, 0))
        while True:
            data, addr = sock.recvfrom(4096)
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == 0 and rid == ident and rseq == seq:
                return addr[0]
    except (socket.timeout, TimeoutError):
        return None
    finally:
        sock.close()


def tcp_ask(ns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
        data = b""
        while chunk := sock.recv(256):
            data += chunk
        return data.decode().strip()
    finally:
        sock.close()


def udp_ask(ns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(b"who are you?", (ip, port))
        data, _ = sock.recvfrom(256)
        return data.decode().strip()
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------
# Leak checks

def _root_links() -> set[str]:
    return {Path(p).name for p in Path("/sys/class/net").iterdir()}


def _responder_pids(prefix: str | None) -> set[int]:
    pids = set()
    tag = f"{build.OWNER_ENV}={prefix}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"tracer.lab.responder" not in (entry / "cmdline").read_bytes():
                continue
            if prefix is not None and tag not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        pids.add(int(entry.name))
    return pids


def machine_snapshot(prefix: str | None = None) -> tuple[set[str], set[str], set[int]]:
    """(netns names, root-namespace link names, pids of responder processes)."""
    names = set(netns.list_names())
    if prefix is not None:
        names = {n for n in names if n.startswith(prefix + "-")}
    return names, _root_links(), _responder_pids(prefix)


# ---------------------------------------------------------------------------------------
# The command line

def cli_env(prefix: str, **extra: str) -> dict:
    env = subprocess_env()
    env["PODTRACE_LAB_PREFIX"] = prefix
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("PODTRACE_LAB_PAUSE_AFTER", None)
    env.update(extra)
    return env


def cli_argv(*args: str, user_nobody: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "tracer.cli", *args]
    if user_nobody:
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
    return argv


def run_cli(*args: str, prefix: str, user_nobody: bool = False, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args, user_nobody=user_nobody), env=cli_env(prefix, **env),
                          cwd="/", capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Readiness

def session_processes(sid: int) -> set[int]:
    """Processes in session `sid`, zombies included: a killed owner that is not yet reaped
    still counts as alive for `podtrace cleanup`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.add(int(entry.name))
    return pids


def drain_all(session, seconds: float = 5) -> None:
    """Drain until the sink holds as many events as the kernel emitted (the frees that follow
    the last packet included); fails at the deadline, which also catches a record read twice."""
    def complete():
        session.drain()
        return session.sink.count() == session.counters()["emitted"]
    assert wait_until(complete, seconds, step=0.01), (session.sink.count(), session.counters())


def traced_addrs(pid: int) -> set[str]:
    """The addresses in the `addrs` map of the BPF programs process `pid` holds: what its
    kernel side selects right now."""
    import ipaddress
    import json
    import re

    out: set[str] = set()
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            m = re.search(r"^map_id:\s*(\d+)", info.read_text(), re.M)
        except OSError:
            continue
        if not m:
            continue
        show = subprocess.run(["bpftool", "map", "show", "id", m.group(1), "-j"], capture_output=True, text=True)
        if show.returncode or json.loads(show.stdout).get("name") not in ("addrs", "addrs6"):
            continue
        dump = subprocess.run(["bpftool", "map", "dump", "id", m.group(1), "-j"], capture_output=True, text=True)
        for entry in json.loads(dump.stdout or "[]"):
            key = entry.get("key")
            if isinstance(key, list) and len(key) in (4, 16):   # addrs (IPv4) / addrs6 (IPv6)
                out.add(str(ipaddress.ip_address(bytes(int(b, 16) for b in key))))
    return out
