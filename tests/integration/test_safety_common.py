"""Shared pieces of the safety tests (test_safety_*.py); holds no tests itself.

Labs: only prefixes starting with `pttestsafe` are used. `safe_lab` (session) is a default lab
the tests only read and send traffic through: PODTRACE_TEST_LAB_PREFIX when that starts with
`pttestsafe`, else `pttestsafe`. Tests that break a lab (deleted pods and devices) or need
several at once build their own: `pttestsafed1..3` (test_safety_env.py), `pttestsafek1..3`
(test_safety_kill.py). Nothing outside these labs' namespaces receives traffic.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import must_run, subprocess_env
from tests.integration.lab_fixture import LAB_PREFIX, REPO_ROOT, wait_until  # noqa: F401  (shared)
from tests.integration.lab_fixture import require_environment as _require_environment
from tracer.node import netns
from tracer.lab import build
from tracer.lab import topology as T

SAFE_PREFIX = LAB_PREFIX if LAB_PREFIX.startswith("pttestsafe") else "pttestsafe"
SCRATCH_PREFIX = "pttestsafed"


@pytest.fixture(scope="session")
def safe_lab():
    _require_environment()
    build.down(SAFE_PREFIX)
    try:
        doc, _ = build.up(T.LabConfig(prefix=SAFE_PREFIX))
        yield doc
    finally:
        build.down(SAFE_PREFIX)


def pod(doc: dict, name: str) -> dict:
    return next(p for p in doc["pods"] if p["name"] == name)


def node(doc: dict, name: str) -> dict:
    return next(n for n in doc["nodes"] if n["name"] == name)


# ---------------------------------------------------------------------------------------
# Running the CLI

def cli_env(prefix: str, **extra: str) -> dict:
    """The environment of a CLI run against lab `prefix`: no kubeconfig of this machine or
    test hook of an outer run leaks in."""
    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith(("PODTRACE_TEST_", "PODTRACE_AGENT_", "KUBERNETES_"))
           and k not in ("KUBECONFIG", "PODTRACE_DEBUG", "PODTRACE_DEBUG_BPF", "PODTRACE_LAB_PAUSE_AFTER")}
    env["PODTRACE_LAB_PREFIX"] = prefix
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli(*args: str, prefix: str = SAFE_PREFIX, timeout: float = 90, argv0: list[str] | None = None,
        input: str | None = None, **env: str) -> subprocess.CompletedProcess:
    argv = (argv0 or [sys.executable]) + ["-m", "tracer.cli", *args]
    return subprocess.run(argv, env=cli_env(prefix, **env), cwd="/", capture_output=True, text=True,
                          timeout=timeout, input=input)


def popen(*args: str, prefix: str = SAFE_PREFIX, **env: str) -> subprocess.Popen:
    """A CLI run in its own process group (so a test can signal it and its agents at once)."""
    return subprocess.Popen([sys.executable, "-m", "tracer.cli", *args], env=cli_env(prefix, **env), cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def one_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    """The contract for a refused run: exit `code`, exactly one line on stderr, no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, f"exit {res.returncode}, want {code}: {res.stderr or res.stdout}"
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{res.stderr}"
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert lines[0].startswith("podtrace: "), lines[0]
    return lines[0]


_NOBODY: list[str] | None = None


def nobody_python() -> tuple[list[str], dict]:
    """argv prefix and environment to run this Python's code as user nobody. The venv's own
    interpreter may live where nobody cannot reach it (e.g. under /root/.pyenv); then the
    system interpreter of the same version is used with the venv's site-packages."""
    global _NOBODY
    drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if _NOBODY is None:
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        for exe in (sys.executable, f"/usr/bin/python{ver}", "/usr/bin/python3"):
            if subprocess.run([*drop, exe, "-c", "pass"], capture_output=True).returncode == 0:
                _NOBODY = [exe]
                break
        else:
            # scripts/dev.sh setup installs Debian's python3, which nobody may run
            problem = "no Python interpreter that user nobody may execute (scripts/dev.sh setup installs one)"
            if must_run():
                pytest.fail(problem)
            pytest.skip(problem)
    extra = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *site.getsitepackages()]), "HOME": "/nonexistent"}
    return [*drop, *_NOBODY], extra


# ---------------------------------------------------------------------------------------
# What podtrace may leave behind

def lab_namespaces(doc: dict) -> list[str]:
    return [doc["fabric_netns"], *(n["netns"] for n in doc["nodes"]), *(p["netns"] for p in doc["pods"])]


def tc_snapshot(doc: dict) -> dict[tuple[str, str], str]:
    """Every qdisc and tc filter on every device of the lab's namespaces, as `tc` prints them."""
    out = {}
    for ns in lab_namespaces(doc):
        if not netns.exists(ns):
            continue
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
        qdiscs = subprocess.run(["tc", "-n", ns, "qdisc", "show"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            dev = line.split(": ")[1].split("@")[0]
            text = [q for q in qdiscs.splitlines() if f" dev {dev} " in q]
            if any("clsact" in q for q in text):
                for d in ("ingress", "egress"):
                    text.append(subprocess.run(["tc", "-n", ns, "filter", "show", "dev", dev, d],
                                               capture_output=True, text=True).stdout)
            text += tcx_lines(ns, dev)
            out[(ns, dev)] = "\n".join(text)
    return out


def tcx_lines(ns: str, dev: str) -> list[str]:
    """`tcx ingress: NAME NAME` (and egress) for the programs on the device's tcx hooks."""
    from pyroute2 import IPRoute

    from tracer.kernel import tcx

    if not tcx.supported():
        return []
    with netns.entered(ns):
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=dev)
        if not found:
            return []
        return [f"tcx {d}: {' '.join(names)}" for d in ("ingress", "egress")
                if (names := tcx.programs(found[0], d))]


def our_filters(snapshot: dict) -> list[str]:
    """Devices where a podtrace tc filter or tcx program is attached."""
    return [f"{ns}/{dev}" for (ns, dev), text in snapshot.items()
            if "podtrace:" in text or any(line.startswith("tcx ") and " pt_tc" in line for line in text.splitlines())]


def bpf_objects() -> set[tuple[str, int]]:
    """("prog", id) and ("map", id) of every BPF program and map in the kernel, less the
    orphaned tail-call arrays (orphan_prog_arrays)."""
    out = set()
    found = {}
    for kind in ("prog", "map"):
        res = subprocess.run(["bpftool", kind, "show", "--json"], capture_output=True, text=True)
        found[kind] = json.loads(res.stdout or "[]")
        out |= {(kind, o["id"]) for o in found[kind]}
    return out - orphan_prog_arrays(found["map"], found["prog"])


def orphan_prog_arrays(maps: list[dict], progs: list[dict]) -> set[tuple[str, int]]:
    """Empty prog_array maps that no program uses and no process holds. On this machine's
    kernel (6.18) a run's tail-call array stays like that when another process opens it by
    ID while the run releases it: the suite's own `bpftool` snapshots, taken while other runs
    end (program.unlink_common makes it rare, not impossible). It holds nothing (320 bytes)
    and nothing of podtrace can reach it any more. It is counted apart so that every other
    leftover still fails."""
    used = {m for p in progs for m in p.get("map_ids", [])}
    cands = [m for m in maps if m.get("type") == "prog_array" and m["id"] not in used]
    if not cands:
        return set()
    held = bpf_objects_held_by({int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()})
    out = set()
    for m in cands:
        if ("map", m["id"]) in held:
            continue
        dump = subprocess.run(["bpftool", "map", "dump", "id", str(m["id"]), "--json"], capture_output=True, text=True)
        try:
            empty = dump.returncode == 0 and not json.loads(dump.stdout or "[]")
        except ValueError:
            empty = False
        if empty:
            out.add(("map", m["id"]))
    return out


def bpf_objects_held_by(pids: set[int]) -> set[tuple[str, int]]:
    """("prog", id) and ("map", id) of the BPF objects open in these processes (/proc/PID/fdinfo)."""
    found = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fdinfo").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                text = fd.read_text()
            except OSError:
                continue
            for kind in ("prog", "map"):
                m = re.search(rf"^{kind}_id:\s*(\d+)", text, re.M)
                if m:
                    found.add((kind, int(m.group(1))))
    return found


def descendants(pid: int) -> set[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
