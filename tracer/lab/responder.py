"""The lab's stand-in for an application container: answers with its pod name.

One process per lab pod, started inside the pod's network namespace by `tracer.lab.build`:

    ip netns exec ptlab-pod-1-1 python -m tracer.lab.responder --name pod-1-1 --port 8080

TCP: every accepted connection gets b"pod-1-1\\n" and is closed. UDP: every datagram is
answered with b"pod-1-1\\n" to its sender. The answer carries the pod's name so a test (or a
probe) can tell which backend a Service sent it to. Single-threaded selectors loop; SIGTERM
and SIGINT end it cleanly through a wakeup pipe, so no handler runs mid-send.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys


def serve(name: str, port: int, host: str = "0.0.0.0") -> None:
    answer = f"{name}\n".encode()

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(128)
    tcp.setblocking(False)

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind((host, port))
    udp.setblocking(False)

    # Signals only write a byte to this pipe; the loop sees it like any other event.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)

    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ, "tcp")
    sel.register(udp, selectors.EVENT_READ, "udp")
    sel.register(wake_r, selectors.EVENT_READ, "stop")

    try:
        while True:
            for key, _ in sel.select():
                if key.data == "stop":
                    return
                if key.data == "tcp":
                    _answer_tcp(tcp, answer)
                else:
                    _answer_udp(udp, answer)
    finally:
        sel.close()
        tcp.close()
        udp.close()


def _answer_tcp(listener: socket.socket, answer: bytes) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    with conn:
        # The answer is a few bytes: it always fits the empty send buffer of a new socket.
        conn.setblocking(False)
        try:
            conn.send(answer)
        except OSError:
            pass


def _answer_udp(sock: socket.socket, answer: bytes) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # e.g. ECONNREFUSED from an ICMP error for an earlier reply: not ours to act on.
            continue
        try:
            sock.sendto(answer, peer)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracer.lab.responder",
                                     description="Answer TCP and UDP with this pod's name.")
    parser.add_argument("--name", required=True, help="pod name to answer with, e.g. pod-1-1")
    parser.add_argument("--port", type=int, default=8080, help="TCP and UDP port (default 8080)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.port, args.host)
    except OSError as exc:
        print(f"responder {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
