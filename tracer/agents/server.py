"""`podtrace agent --serve`: a node's agent, reached on a loopback port, one trace per connection.

The DaemonSet pod runs this on the host network; it listens on 127.0.0.1 only, so nothing
outside the node reaches it except through the API server's port-forward (which the
`podtrace-user` role may use on the agent pods, and which needs no exec). On a connection it
takes frames of the agent stream (tracer/agents/wire.py), never anything else:

    client → agent   request {"token": T, "request": AgentRequest}   (within FIRST_FRAME_S)
                     command {"cmd": ...}                             (any number, in order)
    agent → client   the frames of `podtrace agent` (hello, ready, events, …, end)
                     or one `error` frame {"message", "exit_code"} and the end of the connection

The token (a Secret mounted into the agent pod) is compared in constant time before anything
else is read; every field of the request and of each command is then held to the command
line's bounds (tracer/agents/validate.py). Only what passed is handed, re-encoded from the
typed request, to a `podtrace agent` child of this server: a fixed command line, never one a
client names. At most `max_sessions` traces run at once and `max_connections` connections are
open; beyond them a client gets one `error` frame. Whatever a client does, the server stays
up, and a session's agent stops (removing what it attached) when its connection ends.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import deque

from tracer.agents import validate, wire
from tracer.errors import BadInput, EnvironmentProblem, ExitStatus, PodtraceError
from tracer import testhooks

DEFAULT_PORT = 7463
FIRST_FRAME_S = 10.0        # a connection that has not sent its request by then is refused
MAX_CLIENT_FRAME = 4 << 20  # a request with MAX_DISCOVER addresses twice fits easily
MAX_CONNECTIONS = 8
MAX_SESSIONS = 2            # traces at once on this node (each is a BPF load and a ring buffer)
MIN_TOKEN_BYTES = 16
STOP_GRACE_S = 20.0         # an agent asked to stop removes its tc filters in this time
SEND_TIMEOUT_S = 60         # a client that reads nothing for this long is gone: its trace stops
AGENT_ARGV = [sys.executable, "-m", "tracer.cli", "agent"]


def loopback(host: str) -> str:
    """`host` if it is a loopback address; BadInput otherwise (the agent must not be reachable
    from the node's network)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"--listen {host!r} is not an IP address", "use 127.0.0.1:PORT") from None
    if not ip.is_loopback:
        raise BadInput(f"--listen {host} is not a loopback address: the agent would be reachable from the network",
                       "use 127.0.0.1:PORT (the coordinator comes in through the API server's port-forward)")
    return str(ip)


def read_token(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            token = f.read(4096).strip()
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read the agent token {path}: {exc.strerror}",
                                 "create the Secret: kubectl -n podtrace create secret generic podtrace-agent-token "
                                 "--from-literal=token=$(head -c 32 /dev/urandom | base64)") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise EnvironmentProblem(f"the agent token in {path} is shorter than {MIN_TOKEN_BYTES} bytes",
                                 "put a random token of 32 bytes or more in the Secret podtrace-agent-token")
    return token


class _Out:
    """Whole frames to one client, from the relay and the session thread, never interleaved."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, kind: str, payload) -> bool:
        with self.lock:
            try:
                self.conn.sendall(wire.encode(kind, payload))
                return True
            except OSError:
                return False


class AgentServer:
    """The listener and its sessions. `serve(stop)` runs until `stop` is set."""

    def __init__(self, token: bytes, host: str = "127.0.0.1", port: int = DEFAULT_PORT, node: str | None = None,
                 max_connections: int = MAX_CONNECTIONS, max_sessions: int = MAX_SESSIONS,
                 agent_argv: list[str] | None = None, send_timeout: float = SEND_TIMEOUT_S):
        self.token = token
        self.host = loopback(host)
        self.port = port
        self.node = node
        self.agent_argv = list(agent_argv or AGENT_ARGV)
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self._conns = threading.BoundedSemaphore(max_connections)
        self._sessions = threading.BoundedSemaphore(max_sessions)
        self._threads: set[threading.Thread] = set()
        self._procs: set[subprocess.Popen] = set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def bind(self) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self.port))
        except OSError as exc:
            s.close()
            raise EnvironmentProblem(f"cannot listen on {self.host}:{self.port}: {exc.strerror}",
                                     "is another agent running on this node? (ss -ltnp)") from None
        s.listen(16)
        s.setblocking(False)
        self._sock = s
        return s.getsockname()[:2]

    def serve(self, stop: threading.Event, every=None) -> None:
        """Accept until `stop`; `every()` runs about once a minute (cleanup of killed runs)."""
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        ticks = 0
        try:
            while not stop.is_set():
                if not sel.select(0.5):
                    ticks += 1
                    if every is not None and ticks % 120 == 0:
                        every()
                    continue
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                # sends time out: a client that stops reading cannot hold an agent (and its
                # BPF programs) forever
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.send_timeout))
                if not self._conns.acquire(blocking=False):
                    _refuse(_Out(conn), f"busy: {self.max_connections} connections are open to this agent",
                            ExitStatus.CANNOT_TRACE, "retry when a trace on this node has ended")
                    _close(conn)
                    continue
                t = threading.Thread(target=self._connection, args=(conn,), name="agent-conn", daemon=True)
                with self._lock:
                    self._threads.add(t)
                t.start()
        finally:
            sel.close()
            self.close()

    def close(self) -> None:
        """Stop listening; end every session (their agents stop and clean up)."""
        if self._sock is not None:
            _close(self._sock)
            self._sock = None
        with self._lock:
            procs, threads, conns = list(self._procs), list(self._threads), list(self._open)
        for c in conns:        # every session reads the end of its client's input
            _shutdown(c, socket.SHUT_RD)
        for p in procs:
            _close(p.stdin)
        for t in threads:
            t.join(STOP_GRACE_S + 15)

    # -- one connection

    def _connection(self, conn: socket.socket) -> None:
        out = _Out(conn)
        with self._lock:
            self._open.add(conn)
        try:
            self._converse(conn, out)
        except Exception as exc:  # a bug must cost one client its session, never the server
            _refuse(out, f"agent server error: {type(exc).__name__}: {exc}", ExitStatus.CANNOT_TRACE)
        finally:
            _close(conn)
            self._conns.release()
            with self._lock:
                self._open.discard(conn)
                self._threads.discard(threading.current_thread())

    def _converse(self, conn: socket.socket, out: _Out) -> None:
        late = threading.Event()

        def too_late():
            late.set()
            _shutdown(conn, socket.SHUT_RD)    # the read below ends; the answer can still go out
        deadline = testhooks.first_frame_s(FIRST_FRAME_S)
        timer = threading.Timer(deadline, too_late)
        timer.start()
        rf = conn.makefile("rb")
        frames = wire.read(rf, limit=MAX_CLIENT_FRAME)
        try:
            first = next(frames, None)
        except (wire.WireError, OSError) as exc:
            first = exc
        finally:
            timer.cancel()
        if late.is_set():
            return _refuse(out, f"no request within {deadline:g}s", ExitStatus.BAD_INPUT)
        if first is None:
            return              # connected and left without a word: nothing to answer
        if isinstance(first, Exception):
            return _refuse(out, f"bad frame: {first}", ExitStatus.BAD_INPUT)
        if first.kind != "request":
            return _refuse(out, f"the first frame must be a request, not {first.kind}", ExitStatus.BAD_INPUT)
        try:
            doc = first.json()
        except (ValueError, RecursionError):
            return _refuse(out, "the request frame is not JSON", ExitStatus.BAD_INPUT)
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(errors="replace"), self.token):
            return _refuse(out, "not authorized: wrong or missing agent token", ExitStatus.CANNOT_TRACE,
                           "the coordinator reads it from the Secret podtrace-agent-token")
        try:
            if set(doc) - {"token", "request"}:
                raise validate.Refused("the request frame holds fields other than token and request")
            req = validate.trace_request(doc.get("request"), self.node)
        except validate.Refused as exc:
            return _refuse(out, f"bad request: {exc}", ExitStatus.BAD_INPUT)
        if not self._sessions.acquire(blocking=False):
            return _refuse(out, "busy: the most traces this agent runs at once are running",
                           ExitStatus.CANNOT_TRACE, "retry when one has ended")
        try:
            self._session(conn, out, frames, req)
        finally:
            self._sessions.release()

    def _session(self, conn: socket.socket, out: _Out, frames, req) -> None:
        proc = subprocess.Popen(self.agent_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd="/", start_new_session=True)
        with self._lock:
            self._procs.add(proc)
        errors: deque[bytes] = deque(maxlen=5)
        said = threading.Thread(target=lambda: errors.extend(proc.stderr), name="agent-stderr", daemon=True)
        said.start()
        relay = threading.Thread(target=_relay, args=(proc, out, conn, errors, said), name="agent-relay",
                                 daemon=True)
        relay.start()
        try:
            _write(proc, req.to_wire())
            for fr in frames:
                if fr.kind != "command":
                    _refuse(out, f"only command frames follow the request, not {fr.kind}", ExitStatus.BAD_INPUT)
                    break
                try:
                    cmd = validate.command(fr.json())
                except (ValueError, RecursionError) as exc:
                    _refuse(out, f"bad command: {exc}", ExitStatus.BAD_INPUT)
                    break
                _write(proc, cmd)
        except (wire.WireError, OSError) as exc:
            if proc.poll() is None:
                _refuse(out, f"bad frame: {exc}", ExitStatus.BAD_INPUT)
        finally:
            _end(proc)
            relay.join(STOP_GRACE_S)
            with self._lock:
                self._procs.discard(proc)


def _relay(proc: subprocess.Popen, out: _Out, conn: socket.socket, errors: deque, said: threading.Thread) -> None:
    """The agent's frames to the client, whole; when the agent is done, the connection ends
    (an agent that died without saying why: one `error` frame with its last stderr line).
    Once the client is gone (or stopped reading) the agent is told to stop, and what it still
    writes is read and dropped, so it can finish removing what it attached."""
    client = True
    last = None
    try:
        for fr in wire.read(proc.stdout):
            last = fr.kind
            if client and not out.send(fr.kind, fr.payload):
                client = False
                _close(proc.stdin)
    except wire.WireError as exc:
        if client:
            out.send("error", {"message": f"the agent's stream broke: {exc}", "exit_code": 1})
            client = False
        _close(proc.stdin)
        while proc.stdout.read(1 << 16):
            pass
    rc = proc.wait()
    said.join(5)
    if client and last not in ("end", "error"):
        why = next((ln.decode(errors="replace").strip() for ln in reversed(errors) if ln.strip()), "")
        out.send("error", {"message": f"the agent stopped (exit {rc})" + (f": {why[:300]}" if why else ""),
                           "exit_code": 1})
    _shutdown(conn, socket.SHUT_RDWR)


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def _write(proc: subprocess.Popen, doc: dict) -> None:
    try:
        proc.stdin.write((json.dumps(doc) + "\n").encode())
        proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _end(proc: subprocess.Popen) -> None:
    """End of stdin: the agent stops and removes what it attached; signals if it does not."""
    _close(proc.stdin)
    for sig, wait in ((None, STOP_GRACE_S), (signal.SIGTERM, 10), (signal.SIGKILL, None)):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _refuse(out: _Out, message: str, code: int, fix: str | None = None) -> None:
    out.send("error", {"message": PodtraceError(message, fix).line(), "exit_code": int(code)})
    _shutdown(out.conn, socket.SHUT_RDWR)


def _shutdown(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:
        pass


def _close(f) -> None:
    try:
        if f is not None:
            f.close()
    except OSError:
        pass


def main(listen: str, token_file: str, node: str | None) -> int:
    """The DaemonSet container's main process. Exits 0 on SIGTERM, after its sessions ended."""
    from tracer.kernel import tc

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
        if not 0 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        raise BadInput(f"--listen {listen!r}: bad port", "use 127.0.0.1:PORT") from None
    server = AgentServer(read_token(token_file), host, port_n, node=node)
    bound = server.bind()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    print(f"podtrace agent: serving on {bound[0]}:{bound[1]}" + (f" for node {node}" if node else ""),
          file=sys.stderr, flush=True)

    def cleanup():
        try:
            tc.cleanup(scan=False)    # what killed runs left on this node
        except PodtraceError:
            pass
    server.serve(stop, every=cleanup)
    return 0
