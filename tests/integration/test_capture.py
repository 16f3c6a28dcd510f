"""`podtrace capture` on the lab: real BPF, real traffic between several pod pairs, a fault
injected, ring-buffer overflow, Ctrl-C; the trace files analysed, and the notebooks executed
headless on them (a failing cell fails the test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.lab_fixture import lab  # noqa: F401  (session fixture)
from tests.integration.lab_fixture import ping, tcp_ask, traced_addrs, udp_ask, wait_until
from tracer import analysis
from tracer.runs import capture
from tracer.kernel import record
from tracer.node import netns
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow
from tests.conftest import subprocess_env
from tests.notebook_run import execute_notebook

ROOT = Path(__file__).resolve().parents[2]


def pod(lab, name):
    return next(p for p in lab["pods"] if p["name"] == name)


def node(lab, name):
    return next(n for n in lab["nodes"] if n["name"] == name)


def bpf_fds(pid: int | str = "self") -> list[str]:
    """The BPF objects (programs, maps, links) a process holds: per process, so other runs
    of podtrace on the machine do not disturb the check."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else []:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("anon_inode:bpf"):
            out.append(target)
    return out


def quietly(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except OSError:   # a faulted pair times out: that is the point
        return None


PAIRS = [("pod-1-1", "pod-2-1"), ("pod-1-2", "pod-2-2"), ("pod-2-1", "pod-1-2"), ("pod-1-1", "pod-1-2")]


def traffic(lab, rounds=3, pairs=PAIRS, service=True):
    """TCP, UDP and ICMP between several pod pairs (and to the web Service), from inside the
    lab's pod namespaces only."""
    web = next(s for s in lab["services"] if s["name"] == "web")
    for i in range(rounds):
        for a, b in pairs:
            ns, ip = pod(lab, a)["netns"], pod(lab, b)["ip"]
            quietly(tcp_ask, ns, ip, 8080, timeout=0.3)
            quietly(udp_ask, ns, ip, 8080, timeout=0.3)
            quietly(ping, ns, ip, timeout=0.3, seq=i + 1)
        if service:
            quietly(tcp_ask, pod(lab, "pod-1-2")["netns"], web["cluster_ip"], 80, timeout=0.3)


def run_capture_with(lab, tmp_path, name, sel=None, duration=3.0, during=None, **kw):
    """Capture for `duration` seconds of tracing; the traffic starts once tracing has (the
    first progress report comes after the programs are attached)."""
    cfg = capture.CaptureConfig(sel or capture.Selection(), str(tmp_path / name), duration=duration,
                                lab_prefix=lab["prefix"], **kw)
    tracing = threading.Event()

    def send():
        if tracing.wait(60):
            (during or (lambda: traffic(lab)))()
    th = threading.Thread(target=send, daemon=True)
    th.start()
    try:
        res = capture.run_capture(cfg, progress=lambda d: tracing.set())
    finally:
        tracing.set()
        th.join(timeout=60)
    return res


@pytest.fixture(scope="module")
def faulted_capture(lab, tmp_path_factory):
    """All pod traffic for a few seconds while node-2 drops everything pod-1-1 sends."""
    tmp = tmp_path_factory.mktemp("cap")
    src = pod(lab, "pod-1-1")
    rule = ["FORWARD", "-s", src["ip"], "-j", "DROP"]
    n2 = node(lab, "node-2")["netns"]
    netns.run(n2, "iptables", "-I", *rule)
    try:
        res = run_capture_with(lab, tmp, "faulted.parquet", duration=4.0)
    finally:
        netns.run(n2, "iptables", "-D", *rule)
    return res, analysis.load(res.path)


def test_capture_shows_the_injected_drops(lab, faulted_capture):
    res, t = faulted_capture
    assert res.stopped_by == "duration" and res.events > 0 and res.drops > 0
    assert t.meta["kind"] == "capture" and t.meta["counters"]["lost"] == 0
    assert t.meta["hooks"] and t.meta["kernel"]["release"] == os.uname().release
    assert {n["name"] for n in t.meta["nodes"]} == {n["name"] for n in lab["nodes"]}
    d = t.drops
    hit = d[(d["reason"] == "NETFILTER_DROP") & (d["node"] == "node-2")]
    assert len(hit) == 1 and hit["count"].iloc[0] >= 3, d
    assert hit["location"].iloc[0] and hit["dev"].iloc[0]
    fl = t.flows
    faulted = fl[(fl["src_pod"] == "default/pod-1-1") & (fl["dst_pod"] == "default/pod-2-1")]
    assert len(faulted) >= 3 and (faulted["dropped"] > 0).all() and (faulted["delivered"] == 0).all()
    healthy = fl[(fl["src_pod"] != "default/pod-1-1") | (fl["dst_pod"] == "default/pod-1-2")]
    healthy = healthy[healthy["src_pod"].notna()]
    assert len(healthy) >= 6
    assert (healthy["dropped"] == 0).all() and (healthy["lost"] == 0).all(), healthy
    svc = fl[fl["service"] == "default/web"]
    assert len(svc) and (svc["dst_pod"] == "default/" + next(
        s for s in lab["services"] if s["name"] == "web")["backends"][0].split("/")[1]).all()
    # nothing outside this lab's namespaces (other labs share the addresses)
    scope = set(t.meta["scope"]["netns"]) | {0}
    assert set(t.events["netns"].unique()) <= scope
    assert bpf_fds() == []     # the capture released every program and map


def test_analyze_prints_the_drops(faulted_capture):
    from click.testing import CliRunner

    res, _ = faulted_capture
    from tracer.cli.analyze import analyze

    out = CliRunner().invoke(analyze, [str(res.path)])
    assert out.exit_code == 0 and "NETFILTER_DROP" in out.output and "node-2" in out.output


def test_trace_analysis_notebook_runs_on_the_capture(faulted_capture, tmp_path):
    res, _ = faulted_capture
    execute_notebook("trace_analysis.ipynb", {"PODTRACE_TRACE": str(res.path)}, tmp_path)


def matched(ev):
    """Hop events the filter itself let through (not followed skbs, not the frees of
    followed skbs, which are reported whatever their addresses)."""
    hop = ev["hook"].isin([record.HOOK_IDS["rx"], record.HOOK_IDS["tx"]])
    return ev[hop & ((ev["flags"] & record.FLAG_FOLLOWED) == 0)]


def test_selection_is_applied_in_the_kernel(lab, tmp_path):
    a = pod(lab, "pod-1-2")
    res = run_capture_with(lab, tmp_path, "sel.parquet", capture.Selection(pods=["pod-1-2"], ports=[8080]),
                           duration=2.5, during=lambda: traffic(lab, rounds=2))
    t = analysis.load(res.path)
    ev = matched(t.events)
    assert len(ev)
    assert ((ev["saddr_str"] == a["ip"]) | (ev["daddr_str"] == a["ip"])).all()
    assert ((ev["sport"] == 8080) | (ev["dport"] == 8080)).all() and (ev["proto"] != 1).all()
    b = pod(lab, "pod-2-2")
    res = run_capture_with(lab, tmp_path, "cidr.parquet", capture.Selection(cidrs=[b["ip"] + "/32"]),
                           duration=2.5, during=lambda: traffic(lab, rounds=1))
    t = analysis.load(res.path)
    ev = matched(t.events)
    assert len(ev) and ((ev["saddr_str"] == b["ip"]) | (ev["daddr_str"] == b["ip"])).all()
    assert set(t.flows["src_pod"].dropna()) | set(t.flows["dst_pod"].dropna()) >= {"default/pod-2-2"}


def udp_burst(lab, n=3000):
    s = netns.socket_in(pod(lab, "pod-1-2")["netns"], socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((pod(lab, "pod-2-2")["ip"], 8080))
        for i in range(n):
            try:
                s.send(b"burst %d" % i)
            except OSError:
                pass
    finally:
        s.close()


def test_ring_buffer_overflow_is_counted_in_the_file(lab, tmp_path):
    res = run_capture_with(lab, tmp_path, "loss.parquet", capture.Selection(pods=["pod-1-2"]), duration=2.5,
                           during=lambda: udp_burst(lab), ringbuf_pages=8)
    assert res.counters["lost"] > 0
    t = analysis.load(res.path)
    assert t.events_lost == res.counters["lost"] and t.summary()["events_lost"] > 0
    assert t.meta["counters"]["events_written"] == len(t.events)
    rows = t.meta["loss_timeline"]["rows"]
    assert rows[-1][2] == res.counters["lost"]
    assert any("events were lost" in n for n in t.meta["notes"])


def test_ctrl_c_finishes_the_file(lab, tmp_path):
    f = tmp_path / "int.parquet"
    code = ("import sys; from tracer.cli import main; from tracer.cli.capture import capture\n"
            "if 'capture' not in main.commands: main.add_command(capture)\n"
            "main()")
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"])
    proc = subprocess.Popen([sys.executable, "-c", code, "capture", "--pod", "pod-1-1", "-w", str(f)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any("bpf-prog" in t for t in bpf_fds(proc.pid)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "capture never started"
            time.sleep(0.05)
        # the selection reaches the kernel once the programs are loaded and attached
        assert wait_until(lambda: pod(lab, "pod-1-1")["ip"] in traced_addrs(proc.pid), 30), "capture never attached"
        traffic(lab, rounds=1, pairs=[("pod-1-1", "pod-2-2")], service=False)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "captured" in err and str(f) in err
    assert f.exists() and not Path(str(f) + ".part").exists()
    t = analysis.load(f)
    assert t.meta["stopped_by"] == "interrupt" and len(t.packets) > 0
    assert (t.packets["status"] == "delivered").all()


def test_sigkill_then_cleanup_salvages_the_capture(lab, tmp_path):
    """A capture killed with SIGKILL (nothing of it runs afterwards) leaves `FILE.part`;
    `podtrace cleanup` turns what reached the disk — events older than FLUSH_S are always
    there — into FILE.incomplete.parquet, which analyses like any capture and says it is
    incomplete. The state directory is the test's own (the lab's state linked into it)."""
    f = tmp_path / "killed.parquet"
    state = tmp_path / "state"
    state.mkdir()
    (state / lab["prefix"]).symlink_to(lab["state_dir"])
    code = ("import sys; from tracer.cli import main; from tracer.cli.capture import capture\n"
            "if 'capture' not in main.commands: main.add_command(capture)\n"
            "main()")
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"], PODTRACE_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-c", code, "capture", "--pod", "pod-1-1", "-w", str(f)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any("bpf-prog" in t for t in bpf_fds(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "capture never started"
            time.sleep(0.05)
        # the selection reaches the kernel once the programs are loaded and attached
        assert wait_until(lambda: pod(lab, "pod-1-1")["ip"] in traced_addrs(proc.pid), 30), "capture never attached"
        traffic(lab, rounds=1, pairs=[("pod-1-1", "pod-2-2")], service=False)
        time.sleep(capture.FLUSH_S + 1.5)     # the promise under test: events wait at most FLUSH_S (+1 s) in memory
        assert proc.poll() is None
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    part = Path(str(f) + ".part")
    assert part.exists() and not f.exists()
    res = subprocess.run([sys.executable, "-m", "tracer.cli", "cleanup"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    salvaged = tmp_path / "killed.incomplete.parquet"
    lines = [l for l in res.stdout.splitlines() if "salvaged" in l]
    assert len(lines) == 1 and lines[0].startswith(f"salvaged {salvaged}: "), res.stdout
    assert f"(the writer, pid {proc.pid}, was killed)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.incomplete.parquet", "state"]
    assert list((state / "writing").glob("*.json")) == []
    t = analysis.load(salvaged)
    assert t.meta["incomplete"] is True and f"(pid {proc.pid}) was killed" in t.meta["incomplete_reason"]
    assert t.meta["kind"] == "capture" and t.meta["selection"]["asked"] == {"pods": ["pod-1-1"]}
    assert t.meta["events"] == len(t.events) > 0 and len(t.packets) > 0
    assert (t.packets["status"] == "delivered").all()


def test_flow_save_round_trip_and_incident_notebook(lab, tmp_path):
    f = tmp_path / "flow.parquet"
    src = pod(lab, "pod-1-1")
    n2 = node(lab, "node-2")["netns"]
    rule = ["FORWARD", "-s", src["ip"], "-j", "DROP"]
    netns.run(n2, "iptables", "-I", *rule)
    try:
        r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=2,
                                timeout=0.5, save=str(f)))
    finally:
        netns.run(n2, "iptables", "-D", *rule)
    assert not r.ok
    t = analysis.load(f)
    assert t.mode == "flow" and len(t.events) == len(r.events)
    assert abs(t.hops["time"].max() - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(minutes=2)
    assert t.packets["status"].tolist() == [p.verdict.status for p in r.packets]
    assert t.packets["direction"].tolist() == [p.direction for p in r.packets]
    assert t.packets["reason"].tolist() == [p.verdict.reason for p in r.packets]
    assert t.packets["verdict_node"].tolist() == [p.verdict.node for p in r.packets]
    assert t.hops.groupby("packet").size().tolist() == [len(p.hops) for p in r.packets]
    assert "NETFILTER_DROP" in set(t.drops["reason"])
    execute_notebook("incident_flow.ipynb", {"PODTRACE_FLOW_TRACE": str(f)}, tmp_path)
    # a healthy flow round-trips too
    g = tmp_path / "ok.parquet"
    r = run_flow(FlowConfig(src="pod-1-1", dst="svc/default/web", proto="tcp", port=80,
                            lab_prefix=lab["prefix"], save=str(g)))
    t = analysis.load(g)
    assert r.ok and set(t.packets["status"]) == {"delivered"}
    assert t.packets["status"].tolist() == [p.verdict.status for p in r.packets]
    assert set(t.flows["service"].dropna()) == {"default/web"}
