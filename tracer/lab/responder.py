"""The lab's stand-in for an application container: answers with its pod name.

One process per lab pod, started inside the pod's network namespace by `tracer.lab.build`:

    ip netns exec ptlab-pod-1-1 python -m tracer.lab.responder --name pod-1-1 --port 8080

In a lab with IPv6 pods it gets `--ipv6` and answers the same way on [::]:8080.

TCP: every accepted connection gets b"pod-1-1\\n" and is closed. A connection whose first
bytes are an HTTP request line (`GET / HTTP/1.1`, as `curl http://POD_IP:8080/` sends) gets a
minimal HTTP/1.0 response with that same body instead; a client that sends nothing gets the
plain answer after a short wait (GRACE) for such a request. UDP: every datagram is answered
with b"pod-1-1\\n" to its sender. The answer carries the pod's name so a test (or a
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
import time

# How long a new TCP connection may stay silent before it gets the plain answer, and how long
# an HTTP client has to finish its request head.
GRACE = 0.1
HTTP_HEAD_TIMEOUT = 2.0
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")

def _listener(family: int, kind: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # IPv6 only: the IPv4 socket answers IPv4, so each reply leaves from the address the
        # request was sent to, in its own family.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(name: str, port: int, host: str = "0.0.0.0", ipv6: bool = False) -> None:
    """Answer on (host, port) over IPv4, and with `ipv6` on [::]:port over IPv6 too."""
    answer = f"{name}\n".encode()
    binds = [(socket.AF_INET, host)] + ([(socket.AF_INET6, "::")] if ipv6 else [])
    tcps = [_listener(fam, socket.SOCK_STREAM, h, port) for fam, h in binds]
    udps = [_listener(fam, socket.SOCK_DGRAM, h, port) for fam, h in binds]

    # Signals only write a byte to this pipe; the loop sees it like any other event.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)

    sel = selectors.DefaultSelector()
    for tcp in tcps:
        sel.register(tcp, selectors.EVENT_READ, "tcp")
    for udp in udps:
        sel.register(udp, selectors.EVENT_READ, "udp")
    sel.register(wake_r, selectors.EVENT_READ, "stop")

    pending: dict[socket.socket, _Conn] = {}
    try:
        while True:
            timeout = None
            if pending:
                timeout = max(0.0, min(c.deadline for c in pending.values()) - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.data == "stop":
                    return
                if key.data == "tcp":
                    conn = _accept(key.fileobj)
                    if conn is not None:
                        pending[conn] = _Conn(time.monotonic() + GRACE)
                        sel.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "conn":
                    if pending[key.fileobj].read(key.fileobj, answer):
                        _close(sel, pending, key.fileobj)
                else:
                    _answer_udp(key.fileobj, answer)
            now = time.monotonic()
            for conn in [c for c, st in pending.items() if st.deadline <= now]:
                pending[conn].expire(conn, answer)
                _close(sel, pending, conn)
    finally:
        for conn in list(pending):
            conn.close()
        sel.close()
        for sock in tcps + udps:
            sock.close()


class _Conn:
    """One accepted TCP connection waiting to be answered: its deadline and what it sent."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.buf = b""

    def read(self, conn: socket.socket, answer: bytes) -> bool:
        """Read what arrived; answer when the request is known. True when done with it."""
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True   # reset (a probe closes with RST at once): nobody to answer
        if not data:      # the client sent nothing and closed its side: the plain answer
            _send(conn, answer)
            return True
        self.buf += data
        if not _may_be_http(self.buf):
            _send(conn, answer)
            return True
        if b"\r\n\r\n" in self.buf or b"\n\n" in self.buf:
            _send(conn, _http(self.buf, answer))
            return True
        if len(self.buf) > 16384:
            return True
        self.deadline = time.monotonic() + HTTP_HEAD_TIMEOUT
        return False

    def expire(self, conn: socket.socket, answer: bytes) -> None:
        # Silent until the deadline: the plain answer. A started HTTP request: answer it as HTTP.
        _send(conn, _http(self.buf, answer) if self.buf else answer)


def _accept(listener: socket.socket) -> socket.socket | None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    conn.setblocking(False)
    return conn


def _close(sel: selectors.BaseSelector, pending: dict, conn: socket.socket) -> None:
    sel.unregister(conn)
    del pending[conn]
    conn.close()


def _may_be_http(buf: bytes) -> bool:
    """Whether the bytes so far are (the start of) an HTTP request line."""
    word = buf.split(b" ", 1)[0]
    if b" " not in buf:
        return any(m.startswith(word) for m in _METHODS)
    return word in _METHODS


def _http(request: bytes, answer: bytes) -> bytes:
    head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(answer))
    return head if request.startswith(b"HEAD ") else head + answer


def _send(conn: socket.socket, data: bytes) -> None:
    # The answer is small: it always fits the empty send buffer of a new socket.
    try:
        conn.send(data)
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
    parser.add_argument("--host", default="0.0.0.0", help="IPv4 address to bind (default all)")
    parser.add_argument("--ipv6", action="store_true", help="answer over IPv6 too (on [::])")
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.port, args.host, ipv6=args.ipv6)
    except OSError as exc:
        print(f"responder {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
