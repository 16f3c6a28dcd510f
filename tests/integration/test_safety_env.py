"""Environment faults: missing capabilities, no tracefs, no BCC, a program the verifier
rejects, a full ring buffer, a device or a pod deleted while tracing. Each is handled and
reported — one line and exit 1 when nothing can be traced; when the trace runs, the verdict
says which view is missing instead of guessing."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_safety_common import (
    SAFE_PREFIX, SCRATCH_PREFIX, _require_environment, alive, cli, cli_env, node, one_line_error, our_filters,
    pod, safe_lab, tc_snapshot, wait_until,  # noqa: F401  (fixture)
)
from tracer.node import netns
from tracer.runs import flow as trace
from tracer.config import FlowConfig
from tracer.lab import build
from tracer.lab import topology as T
from tracer.runs.node import NodeJob

FLOW = ["flow", "pod-1-1", "pod-2-1", "--count", "1", "--timeout", "0.5"]

# A sitecustomize that makes pt_rx call a helper tracepoint programs may not use, in both
# builds (raw and perf tracepoints): the real verifier rejects it when the program is loaded,
# the raw build first, then the perf build it falls back to. Active only with
# PT_TEST_VERIFIER=1, in the CLI process and the agents it starts (they inherit the environment).
VERIFIER_HOOK = '''
import os
if os.environ.get("PT_TEST_VERIFIER") == "1":
    from tracer.kernel import program as bpfprog
    _source = bpfprog.source
    def source(files=None):
        text = _source(files)
        for sig, arg in (("int pt_rx(struct tp_netif_receive_skb *args) {", "args"),
                         ("int pt_rx(struct bpf_raw_tracepoint_args *ctx) {", "ctx")):
            assert sig in text, "pt_rx changed: update the verifier test"
            text = text.replace(sig, sig + " { u32 v = 0; bpf_skb_load_bytes((void *)" + arg + ", 0, &v, 4);"
                                           " if (v == 7) return 1; }")
        return text
    bpfprog.source = source
'''


def _doctor_problems(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    rep = json.loads(res.stdout)
    assert rep["can_trace"] is False
    return [f"{p['problem']}; {p['fix']}" for p in rep["problems"]]


# What is taken away, and how: an argv prefix for the CLI's interpreter, and environment.
DROPS = {
    # dropped (setpriv --bounding-set): what the one line must name
    "sys_admin": "CAP_SYS_ADMIN",              # entering pod namespaces; BPF via CAP_BPF alone is not enough
    "net_admin": "CAP_NET_ADMIN",              # tc filters (was: an internal NetlinkError in the agent)
    "sys_admin,-net_admin,-bpf,-perfmon": "CAP_BPF",
    "net_raw": "CAP_NET_RAW",                  # ICMP probes' raw socket (was: exit 3 / an internal error)
}
UMOUNT_TRACEFS = ("umount -l /sys/kernel/debug/tracing 2>/dev/null; umount -l /sys/kernel/tracing; "
                  "umount -l /sys/kernel/debug 2>/dev/null; exec \"$@\"")


@pytest.fixture(scope="module")
def faults(safe_lab, tmp_path_factory) -> dict[str, dict[str, subprocess.CompletedProcess]]:
    """flow (agents), flow --single-process and doctor under every fault, run concurrently."""
    d = tmp_path_factory.mktemp("faults")
    (d / "nobcc" / "bcc").mkdir(parents=True)
    (d / "nobcc" / "bcc" / "__init__.py").write_text(
        'raise ImportError("No module named \'bcc\' (hidden by a test)")\n')
    (d / "verifier").mkdir()
    (d / "verifier" / "sitecustomize.py").write_text(VERIFIER_HOOK)
    path = cli_env(SAFE_PREFIX)["PYTHONPATH"]
    setups: dict[str, tuple[list[str] | None, dict]] = {
        **{f"caps-{drop}": (["setpriv", "--inh-caps=-all", f"--bounding-set=-{drop}", sys.executable], {})
           for drop in DROPS},
        # tracefs unmounted in a private mount namespace (never on the host)
        "tracefs": (["unshare", "--mount", "--propagation", "private", "sh", "-c", UMOUNT_TRACEFS, "sh",
                     sys.executable], {}),
        "bcc": (None, {"PYTHONPATH": os.pathsep.join([str(d / "nobcc"), path])}),
        "verifier": (None, {"PT_TEST_VERIFIER": "1", "PYTHONPATH": os.pathsep.join([str(d / "verifier"), path])}),
    }
    runs = {"flow": FLOW, "single": FLOW + ["--single-process"], "doctor": ["doctor", "-o", "json"]}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futs = {(fault, run): pool.submit(cli, *args, argv0=argv0, timeout=120, **env)
                for fault, (argv0, env) in setups.items() for run, args in runs.items()}
        out: dict[str, dict[str, subprocess.CompletedProcess]] = {}
        for (fault, run), fut in futs.items():
            out.setdefault(fault, {})[run] = fut.result()
    return out


@pytest.mark.parametrize("drop", sorted(DROPS))
def test_missing_capabilities(faults, drop):
    runs = faults[f"caps-{drop}"]
    for k in ("flow", "single"):
        line = one_line_error(runs[k], 1)
        assert DROPS[drop] in line and "capabilit" in line, line
    assert any(DROPS[drop] in p for p in _doctor_problems(runs["doctor"]))


def test_tracefs_not_mounted(faults):
    runs = faults["tracefs"]
    for k in ("flow", "single"):
        assert "tracefs is not mounted" in one_line_error(runs[k], 1)
    assert any("tracefs is not mounted" in p and "mount -t tracefs" in p for p in _doctor_problems(runs["doctor"]))
    assert " tracefs " in Path("/proc/self/mounts").read_text(), "the host's tracefs must stay mounted"


def test_bcc_missing(faults):
    runs = faults["bcc"]
    for k in ("flow", "single"):
        line = one_line_error(runs[k], 1)
        assert "BCC is not importable" in line and "python3-bpfcc" in line, line
    assert any("BCC is not importable" in p for p in _doctor_problems(runs["doctor"]))


def test_verifier_rejects_a_program(faults):
    runs = faults["verifier"]
    for k in ("flow", "single"):
        line = one_line_error(runs[k], 1)
        assert "verifier rejected" in line and "pt_rx" in line, line
        assert "mount tracefs" not in line, f"a verifier rejection is not a tracefs problem: {line}"
    assert any("verifier rejected pt_rx" in p for p in _doctor_problems(runs["doctor"]))


# ---------------------------------------------------------------------------------------
# A full ring buffer

def test_ring_buffer_overflow_is_reported(safe_lab, monkeypatch):
    """A one-page ring buffer and a burst of datagrams: the kernel side counts what it could
    not hand over, and the result says so (counters, summary, note, verdict problem)."""
    monkeypatch.setattr(trace, "NodeJob", functools.partial(NodeJob, ringbuf_pages=1))
    src, dst = pod(safe_lab, "pod-1-1"), pod(safe_lab, "pod-2-1")
    tracing = threading.Event()

    def burst():
        if not tracing.wait(30):
            return
        s = netns.socket_in(src["netns"], socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(300):
                try:
                    s.sendto(b"burst", (dst["ip"], 8080))
                except OSError:
                    pass
        finally:
            s.close()

    t = threading.Thread(target=burst, daemon=True)
    t.start()
    r = trace.run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=SAFE_PREFIX, probe=False,
                                  duration=1.0, mode="single"),
                       progress=lambda msg: msg.startswith("tracing") and tracing.set())
    t.join(5)
    lost = r.counters["lost"]
    assert lost > 0, r.counters
    assert r.summary["events_lost"] == lost
    assert r.counters["emitted"] == len(r.events), "every event handed over must be in the result"
    assert any(f"{lost} events were lost" in n for n in r.notes), r.notes
    if any(p.verdict.status == "lost" for p in r.packets):
        assert any("gap in the trace" in pr for pr in r.verdict.problems), r.verdict
    assert f"events lost {lost}" in _render(r) or str(lost) in _render(r)


def _render(r) -> str:
    import io

    from rich.console import Console

    from tracer import render

    buf = io.StringIO()
    render.flow_table(r, Console(file=buf, width=200))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The lab changing under a trace

def _flow_paused_while(lab: dict, d: Path, act, args=("pod-1-1", "pod-2-1"), mode: str = "agents") -> dict:
    """Run a flow of 3 probes; after the first probe (paused there), do `act`."""
    marks = d / "marks"
    marks.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "flow", *args, "--count", "3", "--timeout", "0.5",
                             "-o", "json"], env=cli_env(lab["prefix"], PODTRACE_TEST_PAUSE="probing",
                                                        PODTRACE_TEST_PAUSE_DIR=str(marks), PODTRACE_TEST_PAUSE_S="1.5",
                                                        PODTRACE_FLOW_MODE=mode),
                            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(marks.iterdir()) or proc.poll() is not None, 60)
        if proc.poll() is not None:
            return {"early": proc.communicate()}
        act()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    snap = tc_snapshot(lab)
    return {"rc": proc.returncode, "doc": json.loads(out) if out.strip() else {}, "err": err,
            "filters_left": our_filters(snap), "qdiscs_left": [k for k, v in snap.items() if "clsact" in v]}


def _delete_pod(p: dict) -> None:
    os.kill(p["responder_pid"], signal.SIGKILL)
    wait_until(lambda: not alive(p["responder_pid"]), 5)     # a zombie holds no namespace
    subprocess.run(["ip", "netns", "del", p["netns"]], check=True)


def _delete_overlay(lab: dict) -> None:
    n2 = node(lab, "node-2")
    subprocess.run(["ip", "-n", n2["netns"], "link", "del", n2["overlay"]], check=True)


# The source pod's deletion is run by the single-process runner (the probes are sent from the
# flow's own process there), the others through the agents.
MODES = {"src-pod": "single"}
CHANGES = {
    "device": _delete_overlay,
    "dst-pod": lambda lab: _delete_pod(pod(lab, "pod-2-1")),
    "src-pod": lambda lab: _delete_pod(pod(lab, "pod-1-1")),
}


@pytest.fixture(scope="module")
def changed(tmp_path_factory) -> dict[str, dict]:
    """Each change on a lab of its own (pttestsafed1..3), the three at once."""
    _require_environment()
    prefixes = {k: f"{SCRATCH_PREFIX}{i + 1}" for i, k in enumerate(CHANGES)}
    root = tmp_path_factory.mktemp("changes")
    try:
        labs = {}
        for k, prefix in prefixes.items():
            build.down(prefix)
            labs[k] = build.up(T.LabConfig(prefix=prefix))[0]
        with ThreadPoolExecutor(max_workers=len(CHANGES)) as pool:
            futs = {k: pool.submit(_flow_paused_while, labs[k], root / k, functools.partial(fn, labs[k]),
                                   mode=MODES.get(k, "agents"))
                    for k, fn in CHANGES.items()}
            yield {k: f.result() for k, f in futs.items()}
    finally:
        for prefix in prefixes.values():
            build.down(prefix)


def _common(rec: dict) -> dict:
    assert "early" not in rec, f"the flow ended before its first probe: {rec.get('early')}"
    assert "Traceback" not in rec["err"] and "internal error" not in rec["err"], rec["err"]
    assert rec["rc"] == 3, (rec["rc"], rec["err"], rec["doc"].get("verdict"))
    assert not rec["filters_left"] and not rec["qdiscs_left"], (rec["filters_left"], rec["qdiscs_left"])
    return rec["doc"]


def test_device_deleted_while_tracing(changed):
    """node-2's flannel.1 deleted after the first probe: the later requests are seen up to
    node-2 and dropped there (no VXLAN socket any more), never called delivered."""
    doc = _common(changed["device"])
    probes_ = {p["seq"]: p for p in doc["probes"]}
    assert probes_[1]["outcome"] == "answered" and all(probes_[s]["outcome"] != "answered" for s in (2, 3))
    later = [p for p in doc["packets"] if p["direction"] == "request" and p["seq"] in (2, 3)]
    assert later, doc["packets"]
    for p in later:
        assert p["verdict"]["status"] in ("dropped", "lost") and p["verdict"]["node"] == "node-2", p["verdict"]


def test_destination_pod_deleted_while_tracing(changed):
    doc = _common(changed["dst-pod"])
    problems = doc["verdict"]["problems"]
    assert problems[0].startswith("default/pod-2-1 was deleted during the trace"), problems
    assert {p["seq"]: p["outcome"] for p in doc["probes"]}[1] == "answered"


def test_source_pod_deleted_while_tracing(changed):
    doc = _common(changed["src-pod"])
    problems = doc["verdict"]["problems"]
    assert any(p.startswith("default/pod-1-1 was deleted during the trace") for p in problems), problems
    assert any("pod-1-1" in p and "does not exist" in p for p in problems), problems


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
