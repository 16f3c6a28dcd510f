"""The probe catalog on this kernel: kprobe programs verified, tc observers merged with the
tracepoints, `doctor`, and nothing of ours left behind — also after a SIGKILL — while a
filter someone else placed stays untouched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.lab_fixture import lab, session_processes, wait_until  # noqa: F401
from tests.integration.test_flow import wait_no_programs
from tests.integration.test_safety_common import tcx_lines
from tracer.kernel import contract
from tracer.kernel import program
from tracer.node import ownership
from tracer.kernel.hooks import CATALOG, DEFAULT_HOOKS, kernel_config
from tracer.kernel import tc
from tracer.config import FlowConfig
from tracer.runs.flow import run_flow
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def cli(lab, *args, timeout=60, **extra):
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"], **extra)
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def tc_state(netns: str, dev: str) -> str:
    """Every filter and qdisc on a device, as `tc` prints them (ids and tags included)."""
    out = []
    for what in (["qdisc", "show", "dev", dev], ["filter", "show", "dev", dev, "ingress"],
                 ["filter", "show", "dev", dev, "egress"]):
        out.append(subprocess.run(["tc", "-n", netns, *what], capture_output=True, text=True).stdout)
    return "\n".join(out + tcx_lines(netns, dev))


def node_devices(lab):
    """(node namespace, device) for every device of the lab's nodes."""
    for n in lab["nodes"]:
        links = subprocess.run(["ip", "-n", n["netns"], "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            yield n["netns"], line.split(": ")[1].split("@")[0]


def lab_tc_state(lab) -> dict:
    return {(ns, dev): tc_state(ns, dev) for ns, dev in node_devices(lab)}


def test_every_kprobe_program_passes_the_verifier():
    loaded = program.load(attach=False, hooks=CATALOG)
    try:
        for h in CATALOG:
            kind = loaded.prog_type(h.kind)
            for fn in filter(None, (h.fn, h.ret_fn)):
                assert loaded.bpf.load_func(fn.encode(), kind).fd > 0, fn
    finally:
        loaded.close()
    wait_no_programs()


def test_the_compiled_program_has_the_contracts_numbers():
    """The map sizes the compiler saw (read back from the compiled program through BCC) are
    the ones tracer/kernel/contract.py declares: the C names them and spells none of them."""
    loaded = program.load(attach=False, hooks=CATALOG)
    try:
        sizes = {name: loaded.bpf[name].max_entries
                 for name in ("addrs", "tracked", "counters", "addr_bits", "tracked_cnt", "config", "cidrs",
                              "ports", "netns_allow", "netns_cfg", "guard", "tc_devs", "stashed")}
    finally:
        loaded.close()
    assert sizes == {"addrs": contract.MAX_ADDRS, "tracked": contract.MAX_TRACKED,
                     "counters": len(contract.COUNTER_NAMES), "addr_bits": contract.ADDR_BITS_WORDS,
                     "tracked_cnt": contract.TRACKED_SLOTS, "config": contract.CONFIG_SLOTS,
                     "cidrs": contract.MAX_CIDRS, "ports": contract.MAX_PORTS, "netns_allow": contract.MAX_NETNS,
                     "netns_cfg": contract.NETNS_CFG_SLOTS, "guard": contract.GUARD_SLOTS,
                     "tc_devs": contract.TC_SLOTS, "stashed": contract.MAX_STASHED}
    wait_no_programs()


def test_raw_and_perf_tracepoints_see_the_same_events(lab, monkeypatch):
    """The default raw tracepoints and the perf tracepoints they replace, loaded side by side
    on the same traffic (echoes across the nodes, and a datagram the destination drops for
    want of a socket): the same events, field by field (the time aside)."""
    import socket

    from tests.integration.lab_fixture import drain_all, ping, pod
    from tracer.kernel import hooks
    from tracer.kernel.session import SessionConfig, TraceSession
    from tracer.node import netns

    src, dst = pod(lab, "pod-1-1"), pod(lab, "pod-2-1")
    inodes = [netns.inode(x["netns"]) for x in lab["nodes"] + lab["pods"]]
    sessions = {}
    try:
        for mode in ("raw", "perf"):
            monkeypatch.setenv("PODTRACE_TRACEPOINTS", mode)
            s = sessions[mode] = TraceSession(SessionConfig(
                addrs=[src["ip"], dst["ip"]], budget=0, netns=inodes,
                hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS]))
            s.start()
            assert s.loaded.raw_tp is (mode == "raw"), s.loaded.tracepoints
        for seq in range(1, 4):
            assert ping(src["netns"], dst["ip"], seq=seq) == dst["ip"]
        sock = netns.socket_in(src["netns"], socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(b"nobody listens", (dst["ip"], 9))     # dropped at dst: no socket
        finally:
            sock.close()
        frames = {}
        for mode, s in sessions.items():
            drain_all(s)
            f = s.frame()
            frames[mode] = f.drop(columns=[c for c in f.columns if c.startswith("ts")]) \
                .astype(str).sort_values(list(f.columns.drop([c for c in f.columns if c.startswith("ts")]))) \
                .reset_index(drop=True)
    finally:
        for s in sessions.values():
            s.close()
    raw, perf = frames["raw"], frames["perf"]
    assert len(raw) >= 3 * 2 * 10, len(raw)           # every hop of three echoes and replies
    assert (raw["reason"] != "0").any(), "the datagram's drop (kfree_skb with a reason) was not seen"
    assert raw.equals(perf), (raw.compare(perf) if raw.shape == perf.shape else (raw.shape, perf.shape))


@pytest.mark.parametrize("mode", ["raw", "perf"])
def test_the_tail_call_array_is_emptied_before_anything_is_closed(lab, monkeypatch, mode):
    """A process that opens BPF maps by ID (`bpftool map show`, a monitoring agent) while a
    run releases its tail-call array made this kernel keep the array, empty and held by
    nothing: 31 of 120 sessions closed beside traffic and a `bpftool` loop, 0 of 120 with the
    array emptied first (bench/closeleak.py; the kernel's release then has no programs to
    patch). The order is what this checks: empty when the first hook is detached and when
    BCC closes."""
    from tests.integration.lab_fixture import ping, pod
    from tracer.kernel import hooks
    from tracer.kernel.session import SessionConfig, TraceSession

    monkeypatch.setenv("PODTRACE_TRACEPOINTS", mode)
    src, dst = pod(lab, "pod-1-1"), pod(lab, "pod-2-1")
    s = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], budget=0,
                                   hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS]))
    entries: dict[str, int] = {}
    try:
        s.start()
        bpf = s.loaded.bpf
        table = bpf.get_table("pt_next")
        assert len(table.items()) == 1, "pt_common is not linked"
        assert ping(src["netns"], dst["ip"], seq=1) == dst["ip"]     # the programs tail-call
        for name in ("detach_raw_tracepoint", "detach_tracepoint", "cleanup"):
            def spy(*a, _name=name, _fn=getattr(bpf, name), **k):
                entries.setdefault(_name, len(table.items()))
                return _fn(*a, **k)
            setattr(bpf, name, spy)
    finally:
        s.close()
    detached = "detach_raw_tracepoint" if mode == "raw" else "detach_tracepoint"
    assert entries.get(detached) == 0 and entries.get("cleanup") == 0, entries


def test_perf_tracepoints_where_the_kernel_lacks_an_argument(monkeypatch):
    """A kernel whose tracepoint lacks an argument the raw build reads (older kernels: the
    drop reason, the consume location) gets the perf build, and says why."""
    monkeypatch.setattr(program, "RAW_ARGS", {"kfree_skb": ("location", "no_such_argument")})
    loaded = program.load()
    try:
        assert not loaded.raw_tp
        assert loaded.tracepoints == "perf tracepoints (kfree_skb has no no_such_argument argument on this kernel)"
        assert {k for k, _ in loaded.attached} == {"tracepoint"}
    finally:
        loaded.close()
    wait_no_programs()


def test_a_raw_build_the_verifier_refuses_falls_back_to_perf(monkeypatch):
    """The kernel's verifier refuses the raw pt_rx (a helper raw tracepoints may not call):
    `flow`'s load and `doctor` both fall back to the perf build, and say why."""
    from tracer import doctor

    source = program.source
    sig = "int pt_rx(struct bpf_raw_tracepoint_args *ctx) {"

    def broken(files=None):
        text = source(files)
        assert sig in text
        return text.replace(sig, sig + " { u32 v = 0; bpf_skb_load_bytes((void *)ctx, 0, &v, 4);"
                                       " if (v == 7) return 1; }")
    monkeypatch.setattr(program, "source", broken)
    loaded = program.load()
    try:
        assert not loaded.raw_tp and {k for k, _ in loaded.attached} == {"tracepoint"}
        assert loaded.tracepoints.startswith("perf tracepoints (the kernel refused a raw one: netif_receive_skb"), \
            loaded.tracepoints
    finally:
        loaded.close()
    rep = doctor.report()
    assert rep["can_trace"] and rep["compile"]["tracepoints"].startswith(
        "perf tracepoints (the kernel refused a raw one: pt_rx"), rep["compile"]
    wait_no_programs()


def test_doctor_on_this_kernel(lab):
    res = cli(lab, "doctor", "-o", "json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["can_trace"] is True
    hooks = {h["name"]: h for h in rep["hooks"]}
    assert all(hooks[n]["active"] for n in DEFAULT_HOOKS + ["tc:ingress", "tc:egress"])
    kp = [h for h in rep["hooks"] if h["kind"] in ("kprobe", "kretprobe")]
    assert len(kp) >= 13
    if kernel_config().get("CONFIG_KPROBES") == "n":
        assert all(not h["active"] and "CONFIG_KPROBES" in h["reason"] for h in kp)
        assert any("kernel-function hooks unavailable" in d for d in rep["degraded"])
    assert rep["headers"]["kind"] in ("real", "substitute")
    assert rep["btf"]["offsets"] == "ok"
    assert rep["compile"]["tracepoints"].startswith("raw tracepoints"), rep["compile"]
    assert any(s.startswith(f"lab {lab['prefix']}") for s in rep["metadata"]["sources"])
    table = cli(lab, "doctor")
    assert table.returncode == 0 and "tc:ingress" in table.stdout and "flow can run" in table.stdout


def test_tracepoints_and_tc_merge_into_one_path(lab):
    before = lab_tc_state(lab)
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"]))
    assert r.ok, r.verdict
    for p in r.packets:
        places = [(h.netns, h.dev, h.point) for h in p.hops]
        assert all(a != b for a, b in zip(places, places[1:])), f"duplicate consecutive hop: {places}"
        both = [h for h in p.hops if set(h.seen_by) == {"tracepoint", "tc"}]
        assert {h.dev for h in both} >= {"cni0", "flannel.1", "eth0"}, p.hops
    assert lab_tc_state(lab) == before, "flow must remove its filters and the qdiscs it added"


def _tc_seen(r) -> set[tuple[str | None, str]]:
    return {(h.node, h.dev) for p in r.packets for h in p.hops if "tc" in h.seen_by}


@pytest.mark.parametrize("mode", ["agents", "single"])
def test_tc_observers_only_where_another_tc_program_runs(lab, monkeypatch, mode):
    """The default: no tc program of anybody's on the path's devices (flannel), no observer
    of ours either, and the tracepoints see all 12 hops of the request; someone's filter on
    node-1's cni0 brings the observers to node-1's path devices (with agents, node-2's stay
    bare: each node decides on its own devices), and that filter is left as it was."""
    monkeypatch.setenv("PODTRACE_TC_OBSERVERS", "auto")
    before = lab_tc_state(lab)
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1, mode=mode))
    assert r.ok, r.verdict
    assert not [h for h in r.meta["hooks"] if h.startswith("tc:")], r.meta["hooks"]
    assert not _tc_seen(r)
    assert [len(p.hops) for p in r.packets if p.direction == "request"] == [12]
    assert lab_tc_state(lab) == before

    node1, node2 = (n["name"] for n in lab["nodes"][:2])
    ns = lab["nodes"][0]["netns"]
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "cni0", "clsact"], check=True)
    try:
        subprocess.run(["tc", "-n", ns, "filter", "add", "dev", "cni0", "ingress", "prio", "7", "protocol", "ip",
                        "u32", "match", "ip", "dst", "192.0.2.1/32", "classid", "1:1"], check=True)
        theirs = tc_state(ns, "cni0")
        r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1, mode=mode))
        assert r.ok, r.verdict
        assert {"tc:ingress", "tc:egress"} <= set(r.meta["hooks"])
        seen = _tc_seen(r)
        assert {(node1, "cni0"), (node1, "flannel.1"), (node1, "eth0")} <= seen, seen
        if mode == "agents":
            assert not {n for n, _ in seen} - {node1}, seen
        else:
            assert (node2, "cni0") in seen, seen
        assert tc_state(ns, "cni0") == theirs
    finally:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "cni0", "clsact"])
    assert lab_tc_state(lab) == before


def test_foreign_filter_untouched(lab):
    node = lab["nodes"][0]["netns"]
    dev = "cni0"
    subprocess.run(["tc", "-n", node, "qdisc", "add", "dev", dev, "clsact"], check=True)
    try:
        subprocess.run(["tc", "-n", node, "filter", "add", "dev", dev, "ingress", "prio", "7", "protocol", "ip",
                        "u32", "match", "ip", "dst", "192.0.2.1/32", "classid", "1:1"], check=True)
        before = tc_state(node, dev)
        assert "192.0.2.1" in before or "c0000201" in before
        r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1))
        assert r.ok, r.verdict
        assert tc_state(node, dev) == before
        assert cli(lab, "cleanup").returncode == 0
        assert tc_state(node, dev) == before
    finally:
        subprocess.run(["tc", "-n", node, "qdisc", "del", "dev", dev, "clsact"])


def _start_long_flow(lab, marks: Path, **extra):
    env = subprocess_env(PODTRACE_LAB_PREFIX=lab["prefix"], PODTRACE_FLOW_MODE="agents",
               PODTRACE_TEST_PAUSE="tracing", PODTRACE_TEST_PAUSE_S="0", PODTRACE_TEST_PAUSE_DIR=str(marks), **extra)
    return subprocess.Popen([sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1", "--no-probe",
                             "--duration", "60"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_attached(proc, marks: Path):
    """Until the coordinator says it is tracing: every agent has attached all it attaches."""
    assert wait_until(lambda: (marks / f"tracing.{proc.pid}").exists() or proc.poll() is not None, 30), \
        "the flow never started tracing"
    assert proc.poll() is None


@pytest.mark.parametrize("attach", ["clsact", "tcx"])
def test_sigkill_of_everything_then_cleanup_leaves_nothing(lab, tmp_path, attach):
    """The worst case: the coordinator and every agent killed at once. Classic filters stay
    until `cleanup`; tcx links go with the killed processes."""
    before = lab_tc_state(lab)
    proc = _start_long_flow(lab, tmp_path, PODTRACE_TC_ATTACH=attach)
    try:
        _wait_attached(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert wait_until(lambda: not session_processes(proc.pid), 10), "killed agents not reaped"
    if attach == "tcx":
        assert wait_until(lambda: lab_tc_state(lab) == before, 10), "tcx links outlived their process"
        wait_no_programs()
        return
    assert lab_tc_state(lab) != before, "a SIGKILL cannot clean up: the leftovers must be visible"
    res = cli(lab, "cleanup")
    assert res.returncode == 0, res.stderr
    assert "removed tc filter podtrace:" in res.stdout
    assert lab_tc_state(lab) == before
    wait_no_programs()


def test_sigkill_of_the_coordinator_agents_clean_up(lab, tmp_path):
    """Agents notice their coordinator is gone (stdin closes) and remove what they added
    (classic filters here: tcx links would go with any exit)."""
    before = lab_tc_state(lab)
    proc = _start_long_flow(lab, tmp_path, PODTRACE_TC_ATTACH="clsact")
    try:
        _wait_attached(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while lab_tc_state(lab) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lab_tc_state(lab) == before
        wait_no_programs(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_qdisc_added_by_a_run_that_ended_goes_with_a_killed_runs_filters(lab, tmp_path):
    """Run A adds the clsact qdiscs; run B, started after it, finds them and adds only its
    filters; B is killed, then A ends normally while B's filters are still on A's qdiscs.
    A cannot remove its qdiscs then; `cleanup` removes B's filters and then A's qdiscs."""
    before = lab_tc_state(lab)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _start_long_flow(lab, tmp_path / "a", PODTRACE_TC_ATTACH="clsact")
    b = None
    try:
        _wait_attached(a, tmp_path / "a")
        b = _start_long_flow(lab, tmp_path / "b", PODTRACE_TC_ATTACH="clsact")
        _wait_attached(b, tmp_path / "b")
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(timeout=10)
        assert wait_until(lambda: not session_processes(b.pid), 10), "killed agents not reaped"
        os.killpg(a.pid, signal.SIGINT)             # Ctrl-C: A ends and removes its own filters
        a.wait(timeout=60)
        assert wait_until(lambda: not session_processes(a.pid), 30), "A's agents did not end"
        assert lab_tc_state(lab) != before, "B's filters stay until cleanup"
        res = cli(lab, "cleanup")
        assert res.returncode == 0, res.stderr
        assert "removed clsact qdisc" in res.stdout, res.stdout
        assert lab_tc_state(lab) == before, res.stdout
    finally:
        for p in (a, b):
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        cli(lab, "cleanup")
    wait_no_programs()


def _all_ours(lab) -> dict:
    """Our filter names on every device of the lab's nodes."""
    return {(ns, dev): sorted(names) for ns, dev in node_devices(lab) if (names := tc.ours(ns, dev))}


def test_cleanup_goes_by_the_owner_named_in_each_filter(lab, tmp_path):
    """Each filter names its owner (pid and start time). A `cleanup` that cannot see a
    running flow's state file (another PODTRACE_STATE_DIR) leaves that flow's filters alone;
    filters whose pid is dead, or now names another process, are removed — with the clsact
    qdiscs their owner added, found by the names alone."""
    from bcc import BPF

    before = lab_tc_state(lab)
    run_state, other_state = str(tmp_path / "run-state"), str(tmp_path / "cleanup-state")
    (tmp_path / "run-state").mkdir()      # the lab's own state (under the state dir) is shared
    (tmp_path / "run-state" / lab["prefix"]).symlink_to(lab["state_dir"])
    node_ns, dev = lab["nodes"][0]["netns"], "cni0"
    proc = _start_long_flow(lab, tmp_path, PODTRACE_STATE_DIR=run_state, PODTRACE_TC_ATTACH="clsact")
    forged = BPF(text="int forged_obs(struct __sk_buff *skb) { return -1; }")
    ipr = tc._ipr(node_ns)
    ifindex = ipr.link_lookup(ifname=dev)[0]
    try:
        _wait_attached(proc, tmp_path)
        during = _all_ours(lab)
        assert (node_ns, dev) in during, during
        owners = {tc.owner_of(n) for names in during.values() for n in names}
        assert None not in owners and all(ownership.alive(pid, start) for pid, start in owners), owners
        # forged filters of other owners, beside the flow's on node-1/cni0
        gone = subprocess.Popen(["true"])
        gone.wait()
        me, my_start = ownership.me()
        names = {"dead": tc.filter_name("ingress", gone.pid, 123),
                 "reused": tc.filter_name("ingress", 1, ownership.start_time(1) + 1),
                 "live": tc.filter_name("ingress", me, my_start)}
        fd = forged.load_func(b"forged_obs", BPF.SCHED_CLS).fd
        for prio, name in zip((40001, 40002, 40003), names.values()):
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd, name=name, parent=tc.PARENT["ingress"],
                   classid=1, direct_action=True, prio=prio)

        res = cli(lab, "cleanup", PODTRACE_STATE_DIR=other_state)
        assert res.returncode == 0, res.stderr
        assert f"removed tc filter {names['dead']} on {node_ns}/{dev}" in res.stdout, res.stdout
        assert f"removed tc filter {names['reused']} on {node_ns}/{dev}" in res.stdout, res.stdout
        after = _all_ours(lab)
        want = dict(during)
        want[(node_ns, dev)] = sorted(during[(node_ns, dev)] + [names["live"]])
        assert after == want, "a running podtrace's filters were touched"
        assert proc.poll() is None
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=tc.PARENT["ingress"], prio=40003)

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not session_processes(proc.pid), 10), "killed agents not reaped"
        assert lab_tc_state(lab) != before
        res = cli(lab, "cleanup", PODTRACE_STATE_DIR=other_state)     # no record of that run here
        assert res.returncode == 0, res.stderr
        assert _all_ours(lab) == {} and lab_tc_state(lab) == before, res.stdout
        res = cli(lab, "cleanup", PODTRACE_STATE_DIR=run_state)       # its records: nothing left to do
        assert res.returncode == 0 and "nothing left behind" in res.stdout, res.stdout
        assert json.loads((tmp_path / "run-state" / "tc-attached.json").read_text()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for prio in (40001, 40002, 40003):
            with contextlib.suppress(Exception):
                ipr.tc("del-filter", "bpf", ifindex, ":1", parent=tc.PARENT["ingress"], prio=prio)
        ipr.close()
        forged.cleanup()
        cli(lab, "cleanup", PODTRACE_STATE_DIR=run_state)
    wait_no_programs()


def _icmp_sampled_in(ident: int, seq: int, n: int) -> bool:
    """bpf/podtrace.c packet_hash + sampled_in for an ICMP echo (id, seq), in Python. The
    kernel holds id and seq as copied from the packet: network byte order in a host u16."""
    swap = (lambda v: ((v & 0xFF) << 8) | (v >> 8)) if sys.byteorder == "little" else (lambda v: v)
    return contract.sampled_in(contract.packet_hash(1, swap(ident), swap(seq)), n)


def test_sampling_is_the_same_on_every_hop_and_node(lab):
    full = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=1))
    hops_per_packet = len(full.packets[0].hops)
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=16, sample=2))
    assert r.ok, r.verdict
    seqs = {p.seq for p in r.packets}
    # The kernel keeps an echo when (hash(id, seq) >> 1) % 2 == 0; the id is random per run,
    # so the kept set is computed here rather than assumed to be mixed.
    expected = {pr.seq for pr in r.probes if _icmp_sampled_in(pr.sport, pr.dport, 2)}
    assert seqs == expected, (seqs, expected)
    for p in r.packets:
        assert len(p.hops) == hops_per_packet, "a sampled packet is kept on every hop of every node"
    assert {(p.seq, p.direction) for p in r.packets} == {(s, d) for s in seqs for d in ("request", "reply")}
    if len(expected) < len(r.probes):
        assert r.counters["sampled_out"] > 0


def test_event_budget_is_enforced_and_reported(lab):
    r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=lab["prefix"], count=3, budget=2))
    assert r.counters["over_budget"] > 0
    assert any("event budget" in n for n in r.notes), r.notes


def test_cilium_lab_tracepoints_and_tc_merge(tmp_path):
    from tests.integration.lab_fixture import LAB_PREFIX, private_lab

    with private_lab(LAB_PREFIX + "cl", cni="cilium") as cl:
        r = run_flow(FlowConfig(src="pod-1-1", dst="pod-2-1", lab_prefix=cl["prefix"], count=2))
        assert r.ok, r.verdict
        for p in r.packets:
            places = [(h.netns, h.dev, h.point) for h in p.hops]
            assert all(a != b for a, b in zip(places, places[1:])), places
            devs = [h.dev for h in p.hops]
            assert "cilium_vxlan" in devs and any(d.startswith("lxc") for d in devs)
            both = {h.dev for h in p.hops if set(h.seen_by) == {"tracepoint", "tc"}}
            assert "cilium_vxlan" in both and any(d.startswith("lxc") for d in both), p.hops
        wait_no_programs()


def test_tcx_observers_around_another_programs_and_leave_it(lab, tmp_path):
    """On a device whose tcx hook runs someone else's program (a CNI on tcx), a flow puts
    one observer before it and one after (each reads its device from the sk_buff: no stub),
    and takes only its own away."""
    from bcc import BPF
    from pyroute2 import IPRoute

    from tracer.kernel import tcx
    from tracer.node import netns as netns_mod

    if not tcx.supported():
        pytest.skip("this kernel has no tcx (Linux 6.6+)")
    node_ns, dev = lab["nodes"][0]["netns"], "cni0"
    foreign = BPF(text="int cni_datapath(struct __sk_buff *skb) { return -1; }")
    fd = foreign.load_func(b"cni_datapath", BPF.SCHED_CLS).fd
    with netns_mod.entered(node_ns):
        with IPRoute() as ipr:
            ifindex = ipr.link_lookup(ifname=dev)[0]
        link = tcx.link(fd, ifindex, "ingress")
    proc = _start_long_flow(lab, tmp_path)
    try:
        _wait_attached(proc, tmp_path)
        with netns_mod.entered(node_ns):
            during = tcx.programs(ifindex, "ingress")
        assert during == ["pt_tcx_ingress", "cni_datapath", "pt_tcx_ingress"], during
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        with netns_mod.entered(node_ns):
            assert tcx.programs(ifindex, "ingress") == ["cni_datapath"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(link)
        foreign.cleanup()
    wait_no_programs()


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
