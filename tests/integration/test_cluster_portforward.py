"""`flow` in a cluster through port-forward, as a user holding only the roles manifests/rbac.yaml
binds to the group podtrace-users.

The fake API server (tests/fakeapi/, with its rbac.py and portforward.py) authorizes every
request with those roles, and forwards the websocket port-forward the official client opens
to 127.0.0.1:7463 inside the agent pod's node namespace, where the real `podtrace agent
--serve` of that lab node listens (as the DaemonSet runs it on a node's host network). The
agent server checks the token from the Secret, traces, and streams back; the coordinator
merges. The same user cannot exec into the agent pods.

What is not real here: the API server and kubelet (a test server plays both), and the node
(a lab namespace on a shared kernel instead of a machine of its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.fakeapi import FakeApi, agent_pods, lab_agent_runner
from tests.fakeapi.portforward import close_forwards, forwards, lab_agent_servers, token_secret
from tests.fakeapi.rbac import Rbac
from tests.integration.lab_fixture import private_lab, wait_until
from tests.integration.test_safety_common import descendants, our_filters, tc_snapshot

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pttestkp"
NODES = {"node-1", "node-2"}
TOKEN = "portforward-test-token-" + "z" * 24


def run(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A lab; its nodes' agent servers; a fake API server that describes it, holds the token
    Secret and authorizes as a member of podtrace-users."""
    d = tmp_path_factory.mktemp("kube")
    (d / "token").write_text(TOKEN)
    with private_lab(PREFIX) as lab:
        with lab_agent_servers(PREFIX, d / "token", sys.executable, str(ROOT)) as servers:
            with FakeApi.from_lab(PREFIX) as api:
                for p in agent_pods(PREFIX):
                    api.add(p)
                api.add(token_secret(TOKEN))
                api.exec_runner = lab_agent_runner(sys.executable, str(ROOT))   # were exec allowed
                api.authorize = Rbac.for_group("podtrace-users")
                kc = api.write_kubeconfig(d / "kubeconfig")
                env = subprocess_env(PODTRACE_LAB_PREFIX="pttest-none", PODTRACE_FLOW_MODE="agents")
                try:
                    yield {"lab": lab, "api": api, "kubeconfig": str(kc), "env": env, "servers": servers}
                finally:
                    close_forwards(api)
            _no_session_left(servers)


def _no_session_left(servers) -> None:
    """Every agent server is up and runs no trace (their sessions' agents are gone)."""
    def idle():
        return all(descendants(p.pid) == {p.pid} or _only_nsenter(p.pid) for p in servers.values())
    assert wait_until(idle, 30), {n: descendants(p.pid) for n, p in servers.items()}
    assert all(p.poll() is None for p in servers.values())


def _only_nsenter(pid: int) -> bool:
    """nsenter execs the server (same pid) unless it forks: then its only child is the server."""
    return len(descendants(pid)) == 1


def _hops(doc: dict, direction: str) -> list[tuple]:
    pkt = next(p for p in doc["packets"] if p["direction"] == direction)
    return [(h["node"], h["pod"], h["dev"], h["point"]) for h in pkt["hops"] if h["node"] in NODES]


def test_flow_through_portforward_crosses_both_nodes(cluster):
    api = cluster["api"]
    before_f, before_e = len(forwards(api)), len(api.execs)
    res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"], "-o", "json"], cluster["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["verdict"]["status"] == "ok", doc["verdict"]
    fw = forwards(api)[before_f:]
    # one port-forward per node involved, each to the agent server's port, none refused
    assert sorted(f["pod"] for f in fw) == sorted(p["metadata"]["name"] for p in agent_pods(PREFIX))
    assert all(f["ports"] == [7463] and f["protocol"] == "v4.channel.k8s.io" and not f["errors"] for f in fw), fw
    assert len(api.execs) == before_e, "no exec at all"
    req, rep = _hops(doc, "request"), _hops(doc, "reply")
    assert req[0] == ("node-1", "default/pod-1-1", "eth0", "tx"), req
    assert req[-1] == ("node-2", "default/pod-2-1", "eth0", "rx"), req
    assert {"flannel.1", "cni0"} <= {h[2] for h in req if h[0] == "node-1"}
    assert {"flannel.1", "cni0"} <= {h[2] for h in req if h[0] == "node-2"}
    assert rep[0][:2] == ("node-2", "default/pod-2-1") and rep[-1][:2] == ("node-1", "default/pod-1-1")
    _no_session_left(cluster["servers"])
    assert not our_filters(tc_snapshot(cluster["lab"]))


def test_service_flow_through_portforward_names_the_dnat(cluster):
    res = run(["flow", "pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80", "--kubeconfig",
               cluster["kubeconfig"], "-o", "json"], cluster["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    req = _hops(json.loads(res.stdout), "request")
    assert req[-1][1] == "default/pod-2-2", req
    _no_session_left(cluster["servers"])


def test_the_user_role_cannot_exec_into_an_agent_pod(cluster):
    """--transport exec with podtrace-user's rights: the API server refuses the exec (403),
    and the raw exec API refuses it too; nothing ran in the agent pods."""
    api = cluster["api"]
    before = len(api.execs)
    res = run(["flow", "pod-1-1", "pod-2-1", "--transport", "exec", "--kubeconfig", cluster["kubeconfig"]],
              cluster["env"])
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "403" in lines[0] and "exec" in lines[0], res.stderr
    assert len(api.execs) == before
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.stream import stream

    core = client.CoreV1Api(config.new_client_from_config(cluster["kubeconfig"]))
    pod = agent_pods(PREFIX)[0]["metadata"]["name"]
    with pytest.raises(ApiException) as err:
        stream(core.connect_get_namespaced_pod_exec, pod, "podtrace", command=["sh", "-c", "id"],
               stdin=False, stdout=True, stderr=True, tty=False)
    assert "403" in str(err.value)
    assert len(api.execs) == before
    # the same user may port-forward to it and read the token, nothing more in namespace podtrace
    rbac = api.authorize
    assert rbac.allows("create", "", "pods/portforward", "podtrace", pod)
    assert rbac.allows("get", "", "secrets", "podtrace", "podtrace-agent-token")
    assert not rbac.allows("get", "", "secrets", "podtrace", "other")
    assert not rbac.allows("list", "", "secrets", "podtrace", None)
    assert not rbac.allows("create", "", "pods/portforward", "default", "pod-1-1")
    assert not rbac.allows("create", "", "pods/attach", "podtrace", pod)


def test_wrong_token_is_one_line(cluster):
    api = cluster["api"]
    api.add(token_secret("not-the-agents-token-" + "q" * 20))
    try:
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"]], cluster["env"])
    finally:
        api.add(token_secret(TOKEN))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not authorized" in lines[0], res.stderr
    _no_session_left(cluster["servers"])


def test_no_agent_server_listening_is_one_line(cluster):
    """The agent pod does not serve on the port (an old DaemonSet): the port-forward's error
    channel says so, and so does podtrace, in one line."""
    api = cluster["api"]
    pod = agent_pods(PREFIX)[1]
    name = pod["metadata"]["name"]
    api.modify("Pod", "podtrace", name, lambda p: p["metadata"]["annotations"].update({"podtrace.io/agent-port": "9"}))
    try:
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"]], cluster["env"])
    finally:
        api.add(pod)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "agent server" in lines[0] and "--serve" in lines[0], res.stderr
    _no_session_left(cluster["servers"])


def test_interrupted_coordinator_leaves_no_trace_running(cluster, tmp_path):
    """SIGKILL on the workstation: the port-forwards go away, each agent server ends its
    session, and the session's agent stops and removes what it attached."""
    env = dict(cluster["env"], PODTRACE_TEST_PAUSE="tracing", PODTRACE_TEST_PAUSE_S="0",
               PODTRACE_TEST_PAUSE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "flow", "pod-1-1", "pod-2-1", "--no-probe",
                             "--duration", "30", "--kubeconfig", cluster["kubeconfig"]],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert wait_until(lambda: (tmp_path / f"tracing.{proc.pid}").exists() or proc.poll() is not None, 60), \
            "the flow never started tracing"
        assert proc.poll() is None, proc.communicate()
        nodes_ns = {f"{PREFIX}-{n}" for n in NODES}
        assert nodes_ns <= {f.split("/")[0] for f in our_filters(tc_snapshot(cluster["lab"]))}
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _no_session_left(cluster["servers"])
    assert wait_until(lambda: not our_filters(tc_snapshot(cluster["lab"])), 30)


@pytest.mark.parametrize("scenario,node,cause", [("ip-forward-off", "node-1", "ip-forward-off"),
                                                 ("netpol-drop", "node-2", "netfilter-rule")])
def test_a_broken_node_is_diagnosed_through_portforward(cluster, scenario, node, cause):
    """The diagnosis asks the agents for node facts and rule counters (`facts` commands with
    the packets' addresses and devices): every one passes the agent's bounds, and the cause
    is named as through exec or on the lab."""
    lab_cli = ["lab", "--prefix", PREFIX]
    broke = run([lab_cli[0], "break", scenario, *lab_cli[1:]], cluster["env"])
    assert broke.returncode == 0, broke.stderr
    try:
        res = run(["flow", "pod-1-1", "pod-2-1", "--kubeconfig", cluster["kubeconfig"], "-o", "json"],
                  cluster["env"])
    finally:
        fixed = run([lab_cli[0], "fix", scenario, *lab_cli[1:]], cluster["env"])
    assert fixed.returncode == 0, fixed.stderr
    assert res.returncode == 3, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    caused = [p["verdict"] for p in doc["packets"] if p["direction"] == "request" and p["verdict"].get("cause")]
    assert caused and caused[0]["cause"] == cause and caused[0]["node"] == node, \
        [p["verdict"] for p in doc["packets"]]
    assert "agent error" not in res.stderr and "bad command" not in res.stdout + res.stderr
    _no_session_left(cluster["servers"])


@pytest.fixture(scope="module", autouse=True)
def _tc_observers_on_every_device(tc_observers_everywhere):
    """These runs follow the tc observers' life: on every device of the path."""
