"""The lab responder, on loopback and an ephemeral port: no privileges needed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    # A port free for both TCP and UDP.
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def _start(name: str) -> tuple[subprocess.Popen, int, bytes]:
    """A responder on loopback, once it answers: (process, port, its first TCP answer)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer.lab.responder", "--name", name, "--port", str(port),
         "--host", "127.0.0.1"],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                return proc, port, s.recv(100)
        except ConnectionRefusedError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_responder_answers_tcp_and_udp_and_stops_on_sigterm():
    proc, port, first = _start("pod-9-9")
    try:
        assert first == b"pod-9-9\n"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                assert s.recv(100) == b"pod-9-9\n"
                assert s.recv(100) == b""  # closed after the answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            for i in range(3):
                u.sendto(f"hello {i}".encode(), ("127.0.0.1", port))
                assert u.recvfrom(100)[0] == b"pod-9-9\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stderr.read() == ""
    finally:
        _stop(proc)


def _exchange(port: int, request: bytes, pieces: int = 1) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        step = max(1, len(request) // pieces)
        for i in range(0, len(request), step):
            s.sendall(request[i:i + step])
            time.sleep(0.01)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def test_responder_answers_http_and_keeps_the_plain_protocol():
    """Plain `curl http://POD_IP:8080/` works against a lab pod; clients that send nothing, or
    something else than HTTP, still get the bare name."""
    proc, port, _ = _start("pod-9-8")
    try:
        curl = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                              capture_output=True, text=True, timeout=10)
        assert (curl.returncode, curl.stdout, curl.stderr) == (0, "pod-9-8\n", "")
        head = subprocess.run(["curl", "-sSI", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                              capture_output=True, text=True, timeout=10)
        assert head.returncode == 0 and head.stdout.startswith("HTTP/1.0 200 OK")
        # A request head that arrives in pieces is still one HTTP request.
        reply = _exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", pieces=4)
        assert reply.startswith(b"HTTP/1.0 200 OK\r\n") and reply.endswith(b"\r\n\r\npod-9-8\n")
        assert b"Content-Length: 8\r\n" in reply
        # Anything else: the bare name, at once.
        assert _exchange(port, b"hello\n") == b"pod-9-8\n"
        assert _exchange(port, b"GETTING\n") == b"pod-9-8\n"
        # A silent client: the bare name after the short wait for a request.
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            assert s.recv(100) == b"pod-9-8\n"
        assert time.monotonic() - started < 1.0
    finally:
        _stop(proc)
