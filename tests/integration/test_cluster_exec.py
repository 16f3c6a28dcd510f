"""`flow` in a cluster, end to end through the Kubernetes exec API: names resolve through
the API (tests/fakeapi/), the agents are found as DaemonSet pods on the nodes involved,
and each is run through a real websocket exec (v5/v4 channel protocol) — the fake server
starts the real `podtrace agent` inside the lab node's network namespace only, as a
hostNetwork + hostPID container would run on a node. The agent then finds its node's pods
by itself (host veths → peer namespaces), traces, probes from the source pod, and streams
its records back over stdout; the coordinator merges them.

What is not real here: the API server and kubelet (a test server plays both), and the node
(a lab namespace on a shared kernel instead of a machine of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakeapi import FakeApi, agent_pods, lab_agent_runner
from tests.integration.lab_fixture import private_lab, wait_until
from tests.integration.test_safety_common import our_filters, tc_snapshot
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pttestkx"
NODES = {"node-1", "node-2"}


def run(args, env, timeout=120):
    """A command line; `flow` reaches the agents through exec, this module's subject."""
    args = [*args, "--transport", "exec"] if args[:1] == ["flow"] and "--kubeconfig" in args else args
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A lab, and a fake API server that describes it and runs its agent pods."""
    with private_lab(PREFIX) as lab:
        with FakeApi.from_lab(PREFIX) as api:
            for p in agent_pods(PREFIX):
                api.add(p)
            api.exec_runner = lab_agent_runner(sys.executable, str(ROOT))
            kc = api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
            # No lab for the CLI: the API is the only source of names, exec the only way in.
            env = subprocess_env(PODTRACE_LAB_PREFIX="pttest-none", PODTRACE_FLOW_MODE="agents")
            yield {"lab": lab, "api": api, "kubeconfig": str(kc), "env": env}
        _no_agent_left()


def _agents_running() -> list[str]:
    """Agent processes living in one of this lab's node namespaces (nsenter has exec'ed
    into them, so the namespace, not the command line, tells them from other agents)."""
    nodes = set()
    for n in ("node-1", "node-2"):
        with contextlib.suppress(OSError):
            nodes.add(os.stat(f"/run/netns/{PREFIX}-{n}").st_ino)
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                ino = os.stat(d / "ns" / "net").st_ino
            except OSError:
                continue
            if b"tracer.cli" in cmd and b"agent" in cmd and ino in nodes:
                out.append(d.name)
    return out


def _no_agent_left() -> None:
    end = time.monotonic() + 15
    while _agents_running() and time.monotonic() < end:
        time.sleep(0.1)
    assert not _agents_running()


def _hops(doc: dict, direction: str) -> list[tuple]:
    pkt = next(p for p in doc["packets"] if p["direction"] == direction)
    return [(h["node"], h["pod"], h["dev"], h["point"]) for h in pkt["hops"] if h["node"] in NODES]


def test_flow_through_exec_crosses_both_nodes(cluster):
    api = cluster["api"]
    before = len(api.execs)
    res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"], "-o", "json"], cluster["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["verdict"]["status"] == "ok", doc["verdict"]
    execs = api.execs[before:]
    # one exec per node involved, each the agent, each ended cleanly
    assert sorted(e["pod"] for e in execs) == sorted(p["metadata"]["name"] for p in agent_pods(PREFIX))
    assert all(e["command"] == ["podtrace", "agent"] and e["exit_code"] == 0 for e in execs), execs
    assert all(e["protocol"] == "v5.channel.k8s.io" for e in execs)
    req = _hops(doc, "request")
    rep = _hops(doc, "reply")
    # the request leaves pod-1-1 on node-1 and reaches pod-2-1 on node-2; the reply comes back
    assert req[0] == ("node-1", "default/pod-1-1", "eth0", "tx"), req
    assert req[-1] == ("node-2", "default/pod-2-1", "eth0", "rx"), req
    assert {"flannel.1", "cni0"} <= {h[2] for h in req if h[0] == "node-1"}
    assert {"flannel.1", "cni0"} <= {h[2] for h in req if h[0] == "node-2"}
    assert rep[0][:2] == ("node-2", "default/pod-2-1") and rep[-1][:2] == ("node-1", "default/pod-1-1")
    # each agent saw only its own node: no hop of another lab namespace (fabric, other labs)
    assert all(h["node"] in NODES for p in doc["packets"] for h in p["hops"]), \
        [(h["node"], h["pod"], h["dev"], h["point"], h.get("netns")) for p in doc["packets"] for h in p["hops"]] or \
        {h["node"] for p in doc["packets"] for h in p["hops"]}
    _no_agent_left()


def test_exec_path_equals_the_lab_path_hop_for_hop(cluster):
    """The same flow through exec-run agents and through the lab's local agents: the same
    hops on the nodes (the lab's path also traces the fabric, the network between nodes,
    which a cluster's agents cannot see)."""
    via_exec = run(["flow", "pod-1-1", "pod-2-1", "--proto", "tcp", "--port", "8080", "--count", "2", "--kubeconfig",
                    cluster["kubeconfig"], "-o", "json"], cluster["env"])
    assert via_exec.returncode == 0, via_exec.stderr[-3000:]
    lab_env = subprocess_env(PODTRACE_LAB_PREFIX=PREFIX, PODTRACE_FLOW_MODE="agents")
    via_lab = run(["flow", "pod-1-1", "pod-2-1", "--proto", "tcp", "--port", "8080", "--count", "2", "-o", "json"], lab_env)
    assert via_lab.returncode == 0, via_lab.stderr[-3000:]
    a, b = json.loads(via_exec.stdout), json.loads(via_lab.stdout)
    for direction in ("request", "reply"):
        assert _hops(a, direction) == _hops(b, direction), direction


@contextlib.contextmanager
def _node_env(api: FakeApi, node: str, **env):
    """The agent pod of `node` runs its agent with extra environment (test switches)."""
    runner = api.exec_runner

    def with_env(ns, pod, container, command):
        argv, base = runner(ns, pod, container, command)
        return argv, (dict(base, **env) if pod["spec"]["nodeName"] == node else base)
    api.exec_runner = with_env
    try:
        yield
    finally:
        api.exec_runner = runner


def test_agent_dying_behind_exec_names_the_missing_view(cluster):
    api = cluster["api"]
    with _node_env(api, "node-2", PODTRACE_AGENT_DIE_AFTER_READY="1"):
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"]], cluster["env"])
    assert res.returncode != 0
    assert "node-2's view is missing" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert any(e["exit_code"] == 9 for e in api.execs), api.execs
    _no_agent_left()


def test_clock_offset_between_exec_agents(cluster):
    """node-2's agent reads a clock 4 ms ahead: the offset is estimated from the
    request/reply pairs alone (no fabric agent in a cluster), reported, and corrected."""
    skew = 4_000_000
    with _node_env(cluster["api"], "node-2", PODTRACE_AGENT_CLOCK_SKEW_NS=str(skew)):
        res = run(["flow", "pod-1-1", "pod-2-1", "--count", "5", "--kubeconfig", cluster["kubeconfig"],
                   "-o", "json"], cluster["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    est = doc["clock"]["offsets"]["node-2"]["offset_ns"]
    assert abs(est - skew) < 50_000, doc["clock"]
    for p in doc["packets"]:
        ts = [h["t_ns"] for h in p["hops"]]
        assert ts == sorted(ts), [(h["node"], h["dev"], h["t_ns"]) for h in p["hops"]]
        assert ts[-1] < 3_000_000, "cross-node latency must be corrected"


def test_v4_server_without_close_channel(cluster):
    """An API server before v5.channel.k8s.io: stdin can only end by hanging up, which the
    coordinator does once each agent has said `end`."""
    api = cluster["api"]
    speaks, api.exec_protocols = api.exec_protocols, ("v4.channel.k8s.io",)
    before = len(api.execs)
    try:
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"], "-o", "json"],
                  cluster["env"])
    finally:
        api.exec_protocols = speaks
    assert res.returncode == 0, res.stderr[-3000:]
    execs = api.execs[before:]
    assert [e["protocol"] for e in execs] == ["v4.channel.k8s.io"] * 2
    assert all(e["exit_code"] == 0 for e in execs), execs
    _no_agent_left()


def test_exec_forbidden_is_one_line(cluster):
    api = cluster["api"]
    api.forbidden.add("pods/exec")
    try:
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"]], cluster["env"])
    finally:
        api.forbidden.discard("pods/exec")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "403" in lines[0] and "podtrace-exec" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_interrupted_coordinator_leaves_no_agent(cluster, tmp_path):
    """Ctrl-C on the workstation: the exec streams go away, the agents' stdin ends, and
    they stop and remove what they attached (the kubelet cannot signal them)."""
    env = dict(cluster["env"], PODTRACE_TEST_PAUSE="tracing", PODTRACE_TEST_PAUSE_S="0",
               PODTRACE_TEST_PAUSE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1", "--no-probe",
                             "--duration", "30", "--kubeconfig", cluster["kubeconfig"], "--transport", "exec"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        # The coordinator is tracing: both agents are ready, every filter of theirs attached.
        assert wait_until(lambda: (tmp_path / f"tracing.{proc.pid}").exists() or proc.poll() is not None, 60), \
            "the flow never started tracing"
        assert proc.poll() is None, proc.communicate()
        assert len(_agents_running()) == 2
        nodes_ns = {f"{PREFIX}-{n}" for n in NODES}
        assert nodes_ns <= {f.split("/")[0] for f in our_filters(tc_snapshot(cluster["lab"]))}
        proc.kill()          # SIGKILL: nobody on the workstation says goodbye
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _no_agent_left()
    assert not our_filters(tc_snapshot(cluster["lab"]))


def test_the_server_run_by_hand_serves_exec_and_flow(cluster, tmp_path):
    """`python -m tests.fakeapi --lab PREFIX` with the lab up: an exec into a lab pod runs in
    that pod's network namespace, and `flow --kubeconfig` goes through its agent pods, by exec
    and by port-forward."""
    import select
    import signal

    from kubernetes import client, config
    from kubernetes.stream import stream

    kc = tmp_path / "kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeapi", "--lab", PREFIX, "--kubeconfig", str(kc)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith(f"serving lab {PREFIX} at https://"), line + proc.stderr.read()
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kc), client_configuration=cfg)
        core = client.CoreV1Api(client.ApiClient(cfg))
        try:
            out = stream(core.connect_get_namespaced_pod_exec, "pod-1-1", "default",
                         command=["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
                         stdin=False, stdout=True, stderr=True, tty=False)
        finally:
            core.api_client.close()
        assert " inet 10.244.1.2/" in out, out
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", str(kc), "-o", "json"], cluster["env"])
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["verdict"]["status"] == "ok"
        # and flow's default, port-forward, to the agent servers it started on the lab's nodes
        res = subprocess.run([sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1", "--kubeconfig",
                              str(kc), "-o", "json"], capture_output=True, text=True, env=cluster["env"],
                             timeout=120, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["verdict"]["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out == "stopped\n", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _no_agent_left()


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
