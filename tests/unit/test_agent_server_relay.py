"""The agent server's relay, with a stand-in agent: a client that stops reading cannot hold a
trace (and its BPF programs) — the server stops the agent, drains it and ends the session."""

from __future__ import annotations

import socket
import sys
import threading
import time

from tests.conftest import wait_until
from tracer.agents import server, wire

# An agent that writes frames as fast as it can until its stdin ends, then says `end`.
FLOOD = """
import sys, threading
from tracer.agents import wire
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), stop.set()), daemon=True).start()
out = sys.stdout.buffer
while not stop.is_set():
    wire.write(out, "log", {"message": "x" * 4000})
wire.write(out, "end", {})
"""
TOKEN = b"relay-test-token-" + b"k" * 20


def test_a_client_that_stops_reading_loses_its_session():
    srv = server.AgentServer(TOKEN, port=0, node="node-1", agent_argv=[sys.executable, "-c", FLOOD],
                             send_timeout=1.0)
    host, port = srv.bind()
    stop = threading.Event()
    t = threading.Thread(target=srv.serve, args=(stop,), daemon=True)
    t.start()
    c = socket.create_connection((host, port))
    try:
        c.sendall(wire.encode("request", {"token": TOKEN.decode(),
                                          "request": {"version": 1, "node": "node-1", "addrs": ["10.0.0.1"]}}))
        assert wait_until(lambda: len(srv._procs) == 1, 30)
        (agent,) = srv._procs
        # the client reads nothing: within the send timeout the agent is told to stop, drained,
        # and gone; the session ends by itself
        assert wait_until(lambda: agent.poll() is not None, 30), "the agent still runs"
        assert agent.returncode == 0
        assert wait_until(lambda: not srv._procs and not srv._open, 30)
        c.settimeout(30)
        got = b""
        t0 = time.monotonic()
        while (chunk := c.recv(1 << 16)) and time.monotonic() - t0 < 30:
            got += chunk
        assert got.startswith(wire.MAGIC) and not chunk, "the server ended the connection"
    finally:
        c.close()
        stop.set()
        t.join(30)
    assert not t.is_alive()


def _serving(argv):
    srv = server.AgentServer(TOKEN, port=0, node="node-1", agent_argv=argv)
    host, port = srv.bind()
    stop = threading.Event()
    t = threading.Thread(target=srv.serve, args=(stop,), daemon=True)
    t.start()
    return srv, (host, port), stop, t


def test_an_agent_that_dies_without_a_word_is_one_error_with_its_last_line():
    die = ("import sys; sys.stdin.readline(); print('loading', file=sys.stderr); "
           "print('boom: no BPF', file=sys.stderr); sys.exit(7)")
    srv, addr, stop, t = _serving([sys.executable, "-c", die])
    try:
        with socket.create_connection(addr) as c:
            c.sendall(wire.encode("request", {"token": TOKEN.decode(),
                                              "request": {"version": 1, "node": "node-1", "addrs": ["10.0.0.1"]}}))
            c.settimeout(30)
            frames = list(wire.read(c.makefile("rb")))
        assert [f.kind for f in frames] == ["error"]
        assert frames[0].json() == {"message": "the agent stopped (exit 7): boom: no BPF", "exit_code": 1}
        assert wait_until(lambda: not srv._procs and not srv._open, 30)
    finally:
        stop.set()
        t.join(30)
