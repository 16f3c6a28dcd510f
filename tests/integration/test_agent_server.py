"""`podtrace agent --serve`, the real server process, attacked from the node it runs on.

The server runs in a network namespace of its own ("the node", with its loopback and a veth
to a second namespace, "the neighbour"), as the DaemonSet runs it on a node's host network.
Hostile clients on the node's loopback — wrong tokens, truncated and corrupt frames, huge
counts, other namespaces' devices, path-like names, too many connections — each get exactly
one `error` frame; the server stays up, starts nothing for them and leaves nothing behind.
From the neighbour namespace, the port is not reachable at all. A real trace request still
gets traced after all that, and a bad command inside it ends that session with one error.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import NetNS
from pyroute2 import netns as pnetns

from tests.conftest import subprocess_env, wait_until
from tests.integration.lab_fixture import require_environment
from tests.integration.test_safety_common import bpf_objects_held_by, descendants
from tracer.agents import server, validate, wire
from tracer.node import netns

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-a"
NODE_IP, OTHER_IP = "10.231.0.1", "10.231.0.2"
PORT = server.DEFAULT_PORT
FIRST_FRAME_S = 3.0      # the server's deadline for a request, shortened for the test (the real one is longer)
TOKEN = "t0ken-" + "x" * 40


def _namespaces(tag: str) -> tuple[str, str]:
    node_ns, other_ns = f"ptsrv{tag}n", f"ptsrv{tag}o"
    pnetns.create(node_ns)
    pnetns.create(other_ns)
    with NetNS(node_ns) as ns:
        ns.link("add", ifname="ptsrv0", kind="veth", peer={"ifname": "ptsrv1", "net_ns_fd": other_ns})
        i = ns.link_lookup(ifname="ptsrv0")[0]
        ns.addr("add", index=i, address=NODE_IP, prefixlen=30)
        ns.link("set", index=i, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    with NetNS(other_ns) as ns:
        i = ns.link_lookup(ifname="ptsrv1")[0]
        ns.addr("add", index=i, address=OTHER_IP, prefixlen=30)
        ns.link("set", index=i, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return node_ns, other_ns


def _readline(proc: subprocess.Popen, seconds: float) -> str:
    ready, _, _ = select.select([proc.stderr], [], [], seconds)
    return proc.stderr.readline() if ready else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The agent server on the loopback of a namespace of its own, with a neighbour namespace."""
    require_environment()
    d = tmp_path_factory.mktemp("agent-server")
    (d / "token").write_text(TOKEN + "\n")
    state = d / "state"
    state.mkdir()
    tag = str(os.getpid())
    node_ns, other_ns = _namespaces(tag)
    proc = None
    try:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node_ns}", "--", sys.executable, "-m", "tracer.cli",
                                 "agent", "--serve", "--listen", f"127.0.0.1:{PORT}", "--token-file", str(d / "token"),
                                 "--node", NODE],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd="/", env=subprocess_env(PYTHONPATH=str(ROOT), PODTRACE_STATE_DIR=str(state),
                                                            PODTRACE_TEST_FIRST_FRAME_S=str(FIRST_FRAME_S)))
        line = _readline(proc, 60)
        assert f"serving on 127.0.0.1:{PORT}" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        yield {"proc": proc, "node_ns": node_ns, "other_ns": other_ns, "state": state,
               "threads": _threads(proc.pid)}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in (node_ns, other_ns):
            with contextlib.suppress(OSError):
                pnetns.remove(ns)
    assert proc.returncode == 0, proc.stderr.read()


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def _connect(ns: str, host: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, PORT))
    except OSError:
        s.close()
        raise
    return s


def _answers(s: socket.socket) -> list[wire.Frame]:
    """Every frame until the server ends the connection (a broken stream fails the test)."""
    with contextlib.closing(s), s.makefile("rb") as f:
        return list(wire.read(f))


def _ask(ns: str, data: bytes) -> list[wire.Frame]:
    s = _connect(ns)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)     # the request is all there is: what the server reads ends here
    return _answers(s)


def _one_error(frames: list[wire.Frame]) -> dict:
    assert [f.kind for f in frames] == ["error"], [(f.kind, f.payload[:200]) for f in frames]
    doc = frames[0].json()
    assert doc["message"] and "\n" not in doc["message"] and doc["exit_code"] in (1, 2), doc
    return doc


def _nothing_left(served) -> None:
    pid = served["proc"].pid
    assert served["proc"].poll() is None, "the agent server died"
    assert descendants(pid) == {pid}, "the server started something"
    assert wait_until(lambda: _threads(pid) <= served["threads"], 30), (_threads(pid), served["threads"])
    # the state directory holds the per-kernel BPF cache (a trace made it) and nothing else
    left = [p for p in served["state"].rglob("*") if p.relative_to(served["state"]).parts[0] != "bpf-cache"]
    assert not left, left


def _request(**over) -> dict:
    req = {"version": 1, "node": NODE, "addrs": [OTHER_IP], "tc_devices": [], "sample": 1, "budget": 0,
           "max_seconds": 30}
    req.update(over)
    return req


def _frame(doc, token: str = TOKEN) -> bytes:
    return wire.encode("request", {"token": token, "request": doc})


PROBE = {"netns": None, "src": OTHER_IP, "dst": NODE_IP, "proto": "icmp", "port": None, "count": 3, "timeout": 1.0,
         "interval": 0.05}
DISCOVER = {"pod_ips": [OTHER_IP], "node_ips": [NODE_IP]}
# (what is wrong, the request) — every field the command line bounds, pushed past its bound
HOSTILE = [
    ("huge count", _request(probe=dict(PROBE, count=10**12), discover=DISCOVER)),
    ("negative count", _request(probe=dict(PROBE, count=-1), discover=DISCOVER)),
    ("count as text", _request(probe=dict(PROBE, count="3; reboot"), discover=DISCOVER)),
    ("long timeout", _request(probe=dict(PROBE, timeout=86400), discover=DISCOVER)),
    ("NaN timeout", _request(probe=dict(PROBE, timeout=float("nan")), discover=DISCOVER)),
    ("huge size", _request(probe=dict(PROBE, size=10**7), discover=DISCOVER)),
    ("port 0", _request(probe=dict(PROBE, proto="tcp", port=0), discover=DISCOVER)),
    ("port 70000", _request(probe=dict(PROBE, proto="udp", port=70000), discover=DISCOVER)),
    ("proto", _request(probe=dict(PROBE, proto="sctp"), discover=DISCOVER)),
    ("probe netns path", _request(probe=dict(PROBE, netns="/proc/1/ns/net"), discover=DISCOVER)),
    ("probe from a name", _request(probe=dict(PROBE, src="pod-1-1"), discover=DISCOVER)),
    ("probe mixed families", _request(probe=dict(PROBE, dst="fd00::1"), discover=DISCOVER)),
    ("probe without discovery", _request(probe=PROBE)),
    ("other namespace's device", _request(tc_devices=[["cni-1234", "eth0"]])),
    ("path-like device", _request(tc_devices=[[None, "../../etc/passwd"]])),
    ("absolute device", _request(tc_devices=[[None, "/dev/sda"]])),
    ("option-like device", _request(tc_devices=[[None, "-batch"]])),
    ("long device", _request(tc_devices=[[None, "a" * 16]])),
    ("too many devices", _request(tc_devices=[[None, f"eth{i}"] for i in range(65)])),
    ("node namespace path", _request(node_netns="/proc/1/ns/net")),
    ("node namespace name", _request(node_netns="pttest-node-1")),
    ("another node", _request(node="node-b")),
    ("node name with a path", _request(node="../node-a")),
    ("no address", _request(addrs=[])),
    ("not an address", _request(addrs=["10.0.0.1; rm -rf /"])),
    ("too many addresses", _request(addrs=[f"10.{i >> 8}.{i & 255}.1" for i in range(validate.MAX_ADDRS + 1)])),
    ("sample 0", _request(sample=0)),
    ("budget", _request(budget=10**12)),
    ("a year", _request(max_seconds=3.15e7)),
    ("discovery too big", _request(discover={"pod_ips": ["10.0.0.1"] * (validate.MAX_DISCOVER + 1)})),
    ("unknown field", _request(command=["sh", "-c", "id"])),
    ("version", _request(version=2)),
    ("not an object", ["version", 1]),
]


@pytest.mark.parametrize("what,req", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_each_hostile_request_gets_one_error(served, what, req):
    doc = _one_error(_ask(served["node_ns"], _frame(req)))
    assert doc["exit_code"] == 2 and doc["message"].startswith("bad request"), doc
    _nothing_left(served)


def test_wrong_or_missing_token_is_refused_before_the_request_is_read(served):
    for token in ("", TOKEN[:-1], TOKEN + "x", "t0ken-" + "y" * 40):
        doc = _one_error(_ask(served["node_ns"], _frame(_request(), token=token)))
        assert doc["exit_code"] == 1 and "not authorized" in doc["message"], doc
    # a bad request with a wrong token says nothing about the request
    doc = _one_error(_ask(served["node_ns"], _frame(_request(addrs=["x"]), token="nope")))
    assert "not authorized" in doc["message"]
    doc = _one_error(_ask(served["node_ns"], wire.encode("request", {"request": _request()})))
    assert "not authorized" in doc["message"]
    _nothing_left(served)


def _framed(kind_id: int, payload: bytes, crc=None, version=wire.VERSION, magic=wire.MAGIC) -> bytes:
    import zlib
    return wire.HEADER.pack(magic, version, kind_id, 0, len(payload),
                            zlib.crc32(payload) if crc is None else crc) + payload


def test_broken_frames_get_one_error(served):
    good = _frame(_request())
    cases = {
        "truncated header": good[:7],
        "truncated payload": good[:-5],
        "bad magic": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "CRC mismatch": _framed(wire.KIND_IDS["request"], good[wire.HEADER.size:], crc=1),
        "newer version": _framed(wire.KIND_IDS["request"], good[wire.HEADER.size:], version=wire.VERSION + 1),
        "unknown kind": _framed(200, b"{}"),
        "4 GiB frame": wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.KIND_IDS["request"], 0, 0xFFFFFFFF, 0),
        "not JSON": _framed(wire.KIND_IDS["request"], b"\xff\xfe not json"),
        "deep JSON": _framed(wire.KIND_IDS["request"], b"[" * 100_000 + b"]" * 100_000),
        "events first": wire.encode("events", b"\0" * 64),
        "command first": wire.encode("command", {"cmd": "probe"}),
        "hello first": wire.encode("hello", {"node": NODE}),
    }
    for what, data in cases.items():
        doc = _one_error(_ask(served["node_ns"], data))
        assert doc["exit_code"] == 2, (what, doc)
    _nothing_left(served)


def _refused(req: dict) -> bool:
    """Only requests the bounds refuse: a valid one would start a trace, which is not this test."""
    try:
        validate.trace_request(json.loads(json.dumps(req)), NODE)
    except validate.Refused:
        return True
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda doc, cut: _frame(doc)[:cut] if cut else _frame(doc),
              st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                                     max_size=6), max_leaves=20),
              st.integers(min_value=0, max_value=200)),
    st.builds(lambda field, value: _request(**{field: value}),
              st.sampled_from(["node", "addrs", "node_netns", "netns_filter", "tc_devices", "discover", "probe",
                               "sample", "budget", "max_seconds", "version"]),
              st.one_of(st.integers(), st.floats(), st.text(max_size=40), st.lists(st.text(max_size=20), max_size=4),
                        st.dictionaries(st.sampled_from(sorted(PROBE)), st.integers() | st.text(max_size=10),
                                        max_size=4))).filter(_refused).map(_frame),
))
def test_fuzzed_requests_each_get_one_error(served, data):
    """Random bytes, random JSON in a good frame cut anywhere, a good request with one field
    replaced by anything: one error frame each (the fields drawn never make a valid request
    that would trace: none of them names this node with an address and nothing else)."""
    frames = _ask(served["node_ns"], data)
    _one_error(frames)
    assert served["proc"].poll() is None


def test_fuzz_left_nothing_behind(served):
    _nothing_left(served)


def test_too_many_connections_are_refused_and_the_server_recovers(served):
    idle = []
    try:
        for _ in range(server.MAX_CONNECTIONS):
            idle.append(_connect(served["node_ns"]))
        # the server took every idle one (its connection threads are up) before the next comes
        assert wait_until(lambda: _threads(served["proc"].pid) >= served["threads"] + server.MAX_CONNECTIONS, 30)
        for _ in range(3):
            doc = _one_error(_answers(_connect(served["node_ns"])))
            assert doc["exit_code"] == 1 and doc["message"].startswith("busy"), doc
    finally:
        for s in idle:
            s.close()      # left without a word: the server answers nothing and frees the slot
    assert wait_until(lambda: _threads(served["proc"].pid) <= served["threads"], 30)
    doc = _one_error(_ask(served["node_ns"], _frame(_request(), token="wrong")))
    assert "not authorized" in doc["message"]
    _nothing_left(served)


def test_a_silent_connection_is_refused_after_the_first_frame_deadline(served, monkeypatch):
    s = _connect(served["node_ns"], timeout=FIRST_FRAME_S + 30)
    s.sendall(_frame(_request())[:10])          # a header begun, never finished
    t0 = time.monotonic()
    doc = _one_error(_answers(s))
    assert f"no request within {FIRST_FRAME_S:g}s" in doc["message"], doc
    assert time.monotonic() - t0 < FIRST_FRAME_S + 20
    _nothing_left(served)


def test_port_is_not_reachable_from_another_network_namespace(served):
    """Only the node's loopback: neither the node's address seen from the neighbour nor the
    neighbour's own loopback reaches the agent; the node's loopback does (the control)."""
    for host in (NODE_IP, "127.0.0.1"):
        with pytest.raises(ConnectionRefusedError):
            _connect(served["other_ns"], host, timeout=5).close()
    with pytest.raises(ConnectionRefusedError):   # on the node itself, its own address is not it either
        _connect(served["node_ns"], NODE_IP, timeout=5).close()
    listeners = netns.run(served["node_ns"], "ss", "-Hltn").stdout.split()
    assert f"127.0.0.1:{PORT}" in listeners and not [w for w in listeners if w.endswith(f":{PORT}")
                                                      and w != f"127.0.0.1:{PORT}"], listeners
    _one_error(_ask(served["node_ns"], _frame(_request(), token="wrong")))


def _session(served) -> tuple[socket.socket, object]:
    s = _connect(served["node_ns"], timeout=120)
    s.sendall(_frame(_request()))
    return s, wire.read(s.makefile("rb"))


def test_a_real_trace_still_runs_and_a_bad_command_ends_it_with_one_error(served):
    pid = served["proc"].pid
    s, frames = _session(served)
    with contextlib.closing(s):
        kinds = []
        for fr in frames:
            kinds.append(fr.kind)
            if fr.kind in ("ready", "error"):
                break
        assert kinds[-1] == "ready" and "hello" in kinds, kinds
        agent = descendants(pid) - {pid}
        assert len(agent) == 1
        # the coordinator's `sample` passes the bounds and reaches the agent: its window ends at 1 in 8
        s.sendall(wire.encode("command", {"cmd": "sample", "n": 8}))
        s.sendall(wire.encode("command", {"cmd": "drain"}))
        drained = next(f for f in frames if f.kind in ("drained", "error"))
        assert drained.kind == "drained" and drained.json()["sample"] == 8, drained.json()
        s.sendall(wire.encode("command", {"cmd": "sh", "args": ["-c", "id"]}))
        rest = list(frames)
    errors = [f.json() for f in rest if f.kind == "error"]
    assert len(errors) == 1 and errors[0]["message"].startswith("bad command"), errors
    # the agent stopped and closed what it loaded; the server is still up
    assert wait_until(lambda: descendants(pid) == {pid}, 60), descendants(pid)
    assert not bpf_objects_held_by(agent)
    _nothing_left(served)
    _one_error(_ask(served["node_ns"], _frame(_request(), token="wrong")))


@pytest.mark.parametrize("cmd", [{"cmd": "sample", "n": 65537}, {"cmd": "sample", "n": "8"},
                                 {"cmd": "sample", "n": 8, "budget": 1}])
def test_a_sample_command_out_of_bounds_ends_the_trace_with_one_error(served, cmd):
    pid = served["proc"].pid
    s, frames = _session(served)
    with contextlib.closing(s):
        kinds = []
        for fr in frames:
            kinds.append(fr.kind)
            if fr.kind in ("ready", "error"):
                break
        assert kinds[-1] == "ready", kinds
        s.sendall(wire.encode("command", cmd))
        rest = list(frames)
    errors = [f.json() for f in rest if f.kind == "error"]
    assert len(errors) == 1 and errors[0]["message"].startswith("bad command") and "sample" in errors[0]["message"], \
        errors
    assert not [f for f in rest if f.kind == "sample"]
    assert wait_until(lambda: descendants(pid) == {pid}, 60), descendants(pid)
    _nothing_left(served)
