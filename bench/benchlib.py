"""What the lab benchmarks share: the bench lab (prefix `ptbench` unless
PODTRACE_LAB_PREFIX says otherwise, brought up when missing), iperf3 servers and clients
inside pod namespaces, RSS sampling, and medians with their spread.

Every figure these benchmarks print is measured on a machine other work may share: rounds
of the variants are interleaved (A B C A B C …) and reported as median, min and max.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tracer.node import netns  # noqa: E402
from tracer.lab import build  # noqa: E402
from tracer.lab import topology as T  # noqa: E402

PREFIX = os.environ.get("PODTRACE_LAB_PREFIX", "ptbench")
PODTRACE = [sys.executable, "-m", "tracer.cli"]


def lab(prefix: str = PREFIX) -> tuple[dict, bool]:
    """(status document, created): the bench lab, brought up when it is not."""
    if not prefix.startswith("ptbench"):
        raise SystemExit(f"benchmarks only use labs named ptbench*, not {prefix!r}")
    doc = build.status(prefix)
    if doc and not build.missing_parts(doc):
        return doc, False
    build.down(prefix)
    doc, _ = build.up(T.LabConfig(prefix=prefix))
    return doc, True


def pod(doc: dict, name: str) -> dict:
    return next(p for p in doc["pods"] if p["name"] == name)


def lab_inodes(doc: dict) -> list[int]:
    """Namespace inodes of the lab: a session limited to these ignores other labs on this
    machine that reuse the same pod addresses."""
    names = [doc["fabric_netns"]] + [n["netns"] for n in doc["nodes"]] + [p["netns"] for p in doc["pods"]]
    return [netns.inode(n) for n in names if netns.exists(n)]


@contextlib.contextmanager
def environ(**values: str):
    """os.environ with `values` set for the block, then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lab_env(prefix: str = PREFIX) -> dict:
    env = dict(os.environ)
    env.pop("PODTRACE_FLOW_MODE", None)   # a benchmark names its mode (--single-process) or measures the default
    env["PODTRACE_LAB_PREFIX"] = prefix
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def mode_env(prefix: str, mode: str) -> dict:
    """lab_env for a run of `mode` (agents, single, agents_tcall, single_tcall): `_tcall`
    puts the tc observers on every device of the path (PODTRACE_TC_OBSERVERS=all); the
    others measure the default."""
    env = lab_env(prefix)
    env.pop("PODTRACE_TC_OBSERVERS", None)
    if mode.endswith("_tcall"):
        env["PODTRACE_TC_OBSERVERS"] = "all"
    return env


# ---------------------------------------------------------------------------------------
# iperf3

class IperfServer:
    """`iperf3 -s -D` in a pod's namespace; killed (by its pid file) on exit."""

    def __init__(self, ns: str, port: int = 5201):
        self.ns, self.port = ns, port
        self.dir = tempfile.mkdtemp(prefix="ptbench-iperf-")
        self.pidfile = Path(self.dir) / "pid"

    def __enter__(self):
        subprocess.run(["ip", "netns", "exec", self.ns, "iperf3", "-s", "-D", "-p", str(self.port),
                        "-I", str(self.pidfile), "--logfile", str(Path(self.dir) / "log")], check=True)
        for _ in range(100):
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                break
            time.sleep(0.02)
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip().rstrip("\0"))
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.02)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            for f in Path(self.dir).iterdir():
                f.unlink()
            os.rmdir(self.dir)
        return False


def iperf_client(ns: str, ip: str, port: int, seconds: float, udp: bool = False, rate: str = "0",
                 length: int = 64) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", ns, "iperf3", "-c", ip, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if udp:
        argv += ["-u", "-l", str(length), "-b", rate]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def iperf_result(p: subprocess.Popen, udp: bool) -> dict:
    out, err = p.communicate()
    try:
        doc = json.loads(out)
    except ValueError:
        raise RuntimeError(f"iperf3 printed no JSON: {err.strip() or out[:200]}") from None
    if doc.get("error"):
        raise RuntimeError(f"iperf3: {doc['error']}")
    end = doc["end"]
    # The sender's CPU (user + system, iperf3's own accounting): in the lab the whole path
    # to the other pod runs as softirq inline in the sender's system calls, so this is the
    # CPU a packet costs, which other load on the machine disturbs far less than a rate.
    cpu = end.get("cpu_utilization_percent", {}).get("host_total", 0) / 100
    if udp:
        s = end["sum"]
        secs = s["seconds"] or 1e-9
        return {"sent_pps": s["packets"] / secs, "recv_pps": (s["packets"] - s["lost_packets"]) / secs,
                "lost_pct": s["lost_percent"], "packets": s["packets"],
                "sender_cpu_us_per_pkt": cpu * secs / s["packets"] * 1e6 if s["packets"] else None}
    r = end["sum_received"]
    return {"gbps": r["bits_per_second"] / 1e9, "retransmits": end.get("sum_sent", {}).get("retransmits"),
            "sender_cpu_s_per_gb": cpu * r["seconds"] / (r["bytes"] / 1e9) if r.get("bytes") else None}


# ---------------------------------------------------------------------------------------
# Figures

def spread(values: list[float], digits: int = 3) -> dict:
    """median with min/max and the number of rounds."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {"median": r(statistics.median(vals)), "min": r(min(vals)), "max": r(max(vals)), "n": len(vals)}


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class BpfStats:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) while held: the kernel then counts run time and
    runs of every BPF program (machine-wide, a few ns per run; off again when the fd is
    closed). Read per program from /proc/self/fdinfo of its fd."""

    def __enter__(self):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(16)          # union bpf_attr { u32 type; } = 0
        self.fd = libc.syscall(321, 32, attr, 16)        # __NR_bpf (x86-64), BPF_ENABLE_STATS
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False

    @staticmethod
    def read(prog_fd: int) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of a program."""
        info = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{prog_fd}").read_text().splitlines()
                    if ":" in line)
        return int(info.get("run_time_ns", "0").strip()), int(info.get("run_cnt", "0").strip())


def other_tracers() -> int:
    """BPF programs of other podtrace sessions loaded right now (this machine is shared: a
    test suite tracing its own lab also runs on our packets, untraced rounds included)."""
    try:
        out = subprocess.run(["bpftool", "prog", "list", "-j"], capture_output=True, text=True, timeout=10).stdout
        return sum(1 for p in json.loads(out or "[]") if p.get("name") in ("pt_rx", "rpt_rx"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return -1


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "kernel": os.uname().release}


def emit(doc: dict) -> None:
    print(json.dumps(doc))
