"""Security properties that can be read from the code (no privileges needed).

- Nothing executes input: no shell (`shell=True`, os.system, os.popen, os.exec*/spawn*,
  subprocess.getoutput), no eval/exec/compile, no pickle/marshal, no unsafe YAML; every
  subprocess gets an argv list, so a pod, namespace or node name is one argument, never shell
  text.
- Probes go only to the endpoint named: in tracer/node/prober.py every packet-sending call's
  destination is the `dst` argument, and running the probe code with recording sockets shows
  no other destination, for every protocol.
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

import tracer
from tracer.node import prober

ROOT = Path(tracer.__file__).resolve().parent
SOURCES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _calls(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            yield node, _dotted(node.func)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT.parent)}:{node.lineno}"


def test_sources_found():
    assert len(SOURCES) > 20 and ROOT / "node" / "prober.py" in SOURCES


def test_nothing_runs_a_shell_or_evaluates_input():
    bad = []
    forbidden = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                 "eval", "exec", "compile", "pickle.loads", "pickle.load", "marshal.loads", "marshal.load",
                 "yaml.load", "yaml.unsafe_load", "yaml.full_load", "commands.getoutput"}
    for path in SOURCES:
        for node, name in _calls(path):
            if name in forbidden or name.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
                bad.append(f"{_where(path, node)}: {name}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad.append(f"{_where(path, node)}: {name}(shell=...)")
    assert not bad, "code that can execute input:\n" + "\n".join(bad)


def test_subprocesses_get_an_argv_list():
    """A string command needs a shell to split it; an f-string or concatenation there is how
    a name from the cluster would end up interpreted."""
    bad = []
    for path in SOURCES:
        for node, name in _calls(path):
            if name.split(".")[-1] not in SUBPROCESS_CALLS or not name.startswith(("subprocess.", "run", "Popen")):
                continue
            if not node.args:
                continue
            first = node.args[0]
            if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)) and not isinstance(first, ast.List):
                if not (isinstance(first, ast.Constant) and not isinstance(first.value, str)):
                    bad.append(f"{_where(path, node)}: {name}({ast.unparse(first)[:60]})")
    assert not bad, "subprocess with a command string:\n" + "\n".join(bad)


def test_probe_packets_go_to_dst_only_by_construction():
    """Every sendto/connect/connect_ex in the probe code addresses (dst, ...)."""
    path = ROOT / "node" / "prober.py"
    sends = []
    for node, name in _calls(path):
        meth = name.rsplit(".", 1)[-1]
        if meth in ("sendto", "connect", "connect_ex", "sendmsg", "create_connection"):
            addr = node.args[-1] if meth != "sendmsg" else None
            ok = (isinstance(addr, ast.Tuple) and addr.elts and isinstance(addr.elts[0], ast.Name)
                  and addr.elts[0].id == "dst")
            sends.append((_where(path, node), meth, ok, ast.unparse(node)[:80]))
    assert sends, "no sending call found in tracer/node/prober.py: update this test"
    bad = [s for s in sends if not s[2]]
    assert not bad, f"a probe addresses something other than dst: {bad}"


def test_probe_callers_pass_the_resolved_destination():
    """flow (single process) passes the resolved DST's address; the agent passes the request's
    `dst`, which flow fills with the resolved DST's address and nothing else."""
    trace_src = (ROOT / "runs" / "flow.py").read_text()
    agent_src = (ROOT / "agents" / "agent.py").read_text()
    calls = [ast.unparse(n) for path in (ROOT / "runs" / "flow.py", ROOT / "agents" / "agent.py")
             for n, name in _calls(path) if name == "probe.send"]
    assert calls, "probe.send is not called from runs/flow.py/agents/agent.py any more: update this test"
    for c in calls:
        dst_arg = c.split("(", 1)[1].split(",")[2].strip()
        assert dst_arg in ("dst.ip", "plan.dst.ip", "p['dst']", 'p["dst"]', "p.dst"), c
    assert "def _probe(" in agent_src
    # every probe request flow builds for an agent (lab or cluster) names the resolved DST:
    # a ProbeRequest built anywhere in tracer/ takes `dst=` from the resolved endpoint
    requests = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in (ROOT / "agents" / "request.py", ROOT / "agents" / "validate.py"):
            continue   # parse the wire (validate.py: a served agent's), where the dst is the coordinator's
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "ProbeRequest":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert "dst" in kw and not node.args, f"{path}: {ast.unparse(node)}"
                requests.append(kw["dst"])
    assert requests, "no ProbeRequest built in tracer/: update this test"
    assert "ProbeRequest(" in (ROOT / "runs" / "plan.py").read_text(), "the planner builds the probe requests"
    assert set(requests) <= {"plan.dst.ip", "dst.ip"}, requests


class _Recorder:
    """A socket that records where it would send and never sends."""

    log: list[tuple[str, object]] = []

    def __init__(self, family, type_, proto=0):
        self.family, self.type = family, type_

    def setsockopt(self, *a):
        pass

    def setblocking(self, flag):
        pass

    def settimeout(self, t):
        pass

    def bind(self, addr):
        self.log.append(("bind", addr))
        self.local = addr

    def getsockname(self):
        return ("10.244.1.2", 40000)

    def sendto(self, data, addr):
        self.log.append(("sendto", addr))
        return len(data)

    def connect(self, addr):
        self.log.append(("connect", addr))

    def connect_ex(self, addr):
        self.log.append(("connect", addr))
        return 115          # EINPROGRESS

    def send(self, data):
        self.log.append(("send", None))
        return len(data)

    def close(self):
        pass

    def fileno(self):
        return -1


@pytest.mark.parametrize("proto,port", [("icmp", None), ("tcp", 8080), ("udp", 53)])
def test_probe_code_sends_to_dst_only(monkeypatch, proto, port):
    _Recorder.log = []
    monkeypatch.setattr(prober.netns, "socket_in", lambda ns, family, type_, p=0: _Recorder(family, type_, p))
    monkeypatch.setattr(prober.select, "select", lambda r, w, x, t=None: ([], [], []))
    res = prober.send("pod-ns", "10.244.1.2", "10.96.0.10", proto, port, count=3, timeout=0.01, interval=0,
                     size=100 if proto != "tcp" else None, sport=40000 if proto != "icmp" else None)
    assert [r.outcome for r in res] == ["timeout"] * 3
    dests = {addr for what, addr in _Recorder.log if what in ("sendto", "connect")}
    want = ("10.96.0.10", 0) if proto == "icmp" else ("10.96.0.10", port)
    assert dests == {want}, _Recorder.log
    # a bind is only ever local: any address, our own source port or 0
    assert all(addr in (("0.0.0.0", 40000), ("0.0.0.0", 0)) for what, addr in _Recorder.log if what == "bind")
    assert socket is not None
