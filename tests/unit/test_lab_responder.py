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


def test_responder_answers_tcp_and_udp_and_stops_on_sigterm():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer.lab.responder", "--name", "pod-9-9", "--port", str(port),
         "--host", "127.0.0.1"],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    first = s.recv(100)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.02)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
