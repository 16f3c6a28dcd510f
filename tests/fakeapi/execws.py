"""Exec over a websocket: the API server's side of `pods/exec` (RFC 6455 framing, only what
the channel protocol uses).

Binary messages whose first byte is the channel: 0 stdin, 1 stdout, 2 stderr, 3 the exit
Status, 255 (v5.channel.k8s.io) "close channel". The query's `stdin`, `stdout`, `stderr`
and `tty` flags say which streams exist, as the kubelet honours them: a stream not asked
for is not connected (the process reads an empty stdin, its output is discarded), and with
`tty=true` stderr is merged into stdout (a terminal has one output). `container` must name
one of the pod's containers (400 otherwise); without it a pod of one container is meant.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")   # the server's preference

def _close_quietly(f) -> None:
    try:
        if f is not None:
            f.close()
    except OSError:
        pass


class _ServerWebsocket:
    """Frames on an upgraded connection: unmasked from us, masked from the client."""

    def __init__(self, rfile, conn: socket.socket):
        self.rfile, self.conn = rfile, conn
        self.lock = threading.Lock()
        self.closed = False      # a close frame went out: nothing more may
        self.peer_closed = threading.Event()   # the client's close frame came, or it hung up

    def wait_closed(self, timeout: float) -> bool:
        return self.peer_closed.wait(timeout)

    def send(self, opcode: int, payload: bytes) -> bool:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([n])
        elif n < 1 << 16:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        with self.lock:
            if self.closed:
                return False
            if opcode == 0x8:
                self.closed = True
            try:
                self.conn.sendall(head + payload)
                return True
            except OSError:
                self.closed = True
                return False

    def _exact(self, n: int) -> bytes:
        try:
            data = self.rfile.read(n)
        except (OSError, ValueError):
            data = None
        if data is None or len(data) < n:
            self.peer_closed.set()
            raise EOFError
        return data

    def recv(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next whole message; EOFError when the peer is gone."""
        opcode, parts = None, []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(self._exact(n))) if n else b""
            op = b0 & 0x0F
            if op >= 0x8:            # control frames come whole, also between fragments
                if op == 0x8:
                    self.peer_closed.set()
                return op, data
            opcode = op if opcode is None else opcode
            parts.append(data)
            if b0 & 0x80:
                return opcode, b"".join(parts)




def _exec_status(rc: int | None, command: list[str], problem: str | None = None) -> dict:
    if rc == 0 and problem is None:
        return {"metadata": {}, "status": "Success"}
    if problem is not None:
        return {"metadata": {}, "status": "Failure", "reason": "InternalError", "message": problem,
                "details": {"causes": [{"message": problem}]}}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing command {command}, "
                       f"exit code {rc}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}}


def _flag(qs: dict, name: str) -> bool:
    return (qs.get(name) or ["false"])[-1].lower() in ("1", "true")


def exec_problem(pod: dict, qs: dict) -> tuple[str | None, str | None]:
    """(container, None) for a valid exec request, else (None, the 400 message)."""
    name = pod["metadata"]["name"]
    containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    container = (qs.get("container") or [None])[-1]
    if not qs.get("command"):
        return None, "you must specify at least one command for the container"
    if not any(_flag(qs, f) for f in ("stdin", "stdout", "stderr")):
        return None, "you must specify at least 1 of stdin, stdout, stderr"
    if container is None:
        if len(containers) != 1:
            return None, f"a container name must be specified for pod {name}, choose one of: {containers}"
        container = containers[0]
    if container not in containers:
        return None, f"container {container} is not valid for pod {name}"
    return container, None


def exec_session(handler, ns: str, name: str, qs: dict) -> None:
    """One exec: check, upgrade, run, relay the channels, send the exit Status, close."""
    fake = handler.fake
    if "pods/exec" in fake.forbidden:
        return handler.status(403, "Forbidden", f'pods "{name}" is forbidden: User "fake" cannot create '
                                                f'resource "pods/exec" in API group "" in the namespace "{ns}"')
    pod = fake.get("Pod", ns, name)
    if pod is None:
        return handler.status(404, "NotFound", f'pods "{name}" not found')
    container, problem = exec_problem(pod, qs)
    if problem:
        return handler.status(400, "BadRequest", problem)
    if handler.headers.get("Upgrade", "").lower() != "websocket" or not handler.headers.get("Sec-WebSocket-Key"):
        return handler.status(400, "BadRequest", "Upgrade request required")
    offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    proto = next((p for p in fake.exec_protocols if p in offered), None)
    if proto is None:
        return handler.status(400, "BadRequest", f"none of the offered subprotocols {offered} is supported")
    command = qs.get("command", [])
    tty = _flag(qs, "tty")
    want_in, want_out = _flag(qs, "stdin"), _flag(qs, "stdout")
    want_err = _flag(qs, "stderr") and not tty      # a terminal has one output, like the kubelet's
    spec = fake.exec_runner(ns, pod, container, command) if fake.exec_runner else None
    argv, env = (spec if isinstance(spec, tuple) else (spec, None)) if spec else (None, None)
    accept = base64.b64encode(hashlib.sha1((handler.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept.decode())
    handler.send_header("Sec-WebSocket-Protocol", proto)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    ws = _ServerWebsocket(handler.rfile, handler.connection)
    record = {"namespace": ns, "pod": name, "container": container, "command": command, "protocol": proto,
              "stdin": want_in, "stdout": want_out, "stderr": want_err, "tty": tty,
              "exit_code": None, "stdin_closed_by": None}
    fake.execs.append(record)
    if argv is None:
        ws.send(0x2, bytes([3]) + json.dumps(_exec_status(None, command, f'exec: "{(command or [""])[0]}": '
                                                                           "executable file not found in $PATH")).encode())
        ws.send(0x8, struct.pack("!H", 1000))
        _await_close(ws, handler.connection)
        return
    err_to = subprocess.PIPE if want_err else (subprocess.STDOUT if tty and want_out else subprocess.DEVNULL)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if want_in else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if want_out else subprocess.DEVNULL, stderr=err_to,
                            env=env, start_new_session=True)
    fake._exec_procs.append(proc)

    def pump(f, channel: int) -> None:
        fd = f.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                return
            ws.send(0x2, bytes([channel]) + data)   # dropped once the client has closed

    def read_client() -> None:
        try:
            while True:
                op, data = ws.recv()
                if op == 0x8:                       # the client hangs up: its stdin ends
                    record["stdin_closed_by"] = record["stdin_closed_by"] or "disconnect"
                    _close_quietly(proc.stdin)
                    ws.send(0x8, data[:2] or struct.pack("!H", 1000))
                    return
                if op == 0x9:
                    ws.send(0xA, data)
                elif op in (0x1, 0x2) and data:
                    if data[0] == 0 and proc.stdin and not proc.stdin.closed:
                        try:
                            proc.stdin.write(data[1:])
                            proc.stdin.flush()
                        except (BrokenPipeError, OSError, ValueError):
                            pass
                    elif data[0] == 255 and data[1:2] == b"\0" and proto.startswith("v5"):
                        record["stdin_closed_by"] = "close-channel"
                        _close_quietly(proc.stdin)
        except (EOFError, OSError, ValueError):
            record["stdin_closed_by"] = record["stdin_closed_by"] or "disconnect"
            _close_quietly(proc.stdin)

    pumps = [threading.Thread(target=pump, args=(f, ch), daemon=True)
             for f, ch in ((proc.stdout, 1), (proc.stderr, 2)) if f is not None]
    for t in pumps:
        t.start()
    threading.Thread(target=read_client, daemon=True).start()
    rc = proc.wait()
    for t in pumps:
        t.join(10)
    _close_quietly(proc.stdout)
    _close_quietly(proc.stderr)
    record["exit_code"] = rc
    with contextlib.suppress(ValueError):
        fake._exec_procs.remove(proc)
    ws.send(0x2, bytes([3]) + json.dumps(_exec_status(rc, command)).encode())
    ws.send(0x8, struct.pack("!H", 1000))
    # The client's close reply (or its hang-up) before the socket goes: closing a socket with
    # unread data in it resets the connection, and a reset can lose what we sent last.
    ws.wait_closed(5.0)
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


def _await_close(ws: _ServerWebsocket, conn) -> None:
    """Read (and drop) what the client still sends until its close frame, or a few seconds."""
    with contextlib.suppress(OSError):
        conn.settimeout(5)
    try:
        while True:
            op, _ = ws.recv()
            if op == 0x8:
                return
    except (EOFError, OSError, ValueError):
        return
