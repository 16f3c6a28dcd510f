"""A fake Kubernetes API server for tests: the list and watch protocol over plain HTTP.

    with FakeApi.from_lab("pttestk8s") as api:          # serves the lab's objects
        cfg = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.add(pod_obj)                                  # ADDED on every open watch
        api.delete("Pod", "default", "pod-1-1")           # DELETED
        api.expire()                                      # open watches get ERROR 410

Serves, on 127.0.0.1 and a random port, from a thread (stdlib http.server):
GET /api/v1/{pods,nodes,services}, /api/v1/namespaces/NS/{pods,services}[/NAME],
/api/v1/nodes/NAME, /apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices[/NAME], with
`limit`/`continue` pagination, `fieldSelector` (metadata.name, metadata.namespace,
spec.nodeName, status.podIP, spec.clusterIP) and equality `labelSelector`s; with `watch=1`
and `resourceVersion=RV` it streams JSON lines (chunked) ADDED/MODIFIED/DELETED after RV,
BOOKMARK when asked (`bookmark()`), and ERROR 410 when RV is older than the last `expire()`.
Bearer token checking (401), forbidden kinds (403) and `/version` are there for error tests.

Exec: GET /api/v1/namespaces/NS/pods/NAME/exec?command=…&stdin=…&stdout=…&stderr=… with a
websocket upgrade speaks the channel protocol of the real API server (v5.channel.k8s.io, else
v4): binary messages whose first byte is the channel (0 stdin, 1 stdout, 2 stderr, 3 the
exit Status, 255 v5 "close channel"). What runs is up to `exec_runner(namespace, pod,
container, command)`, which returns an argv (and env) or None for "no such executable"; the
process's stdin is closed when the client closes stdin (v5) or drops the connection, as the
kubelet does. `forbidden` may hold "pods/exec" (403 before the upgrade, like RBAC).

Port-forward (pods/NAME/portforward): tests/fakeapi_portforward.py; RBAC of a user bound by
manifests/rbac.yaml (`authorize`): tests/fakeapi_rbac.py. Secrets are served like the other kinds.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

RESOURCES = {
    # path segment → (kind, namespaced, list kind, apiVersion)
    "pods": ("Pod", True, "PodList", "v1"),
    "nodes": ("Node", False, "NodeList", "v1"),
    "services": ("Service", True, "ServiceList", "v1"),
    "endpointslices": ("EndpointSlice", True, "EndpointSliceList", "discovery.k8s.io/v1"),
    "secrets": ("Secret", True, "SecretList", "v1"),
}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")   # the server's preference


def _field(obj: dict, path: str):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _match_fields(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        neg = "!=" in term
        key, _, want = term.partition("!=" if neg else "=")
        want = want.lstrip("=")
        have = _field(obj, key.strip())
        have = "" if have is None else str(have)
        if (have == want) == neg:
            return False
    return True


def _match_labels(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.strip()) != v.strip().lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeApi:
    """The server and its object store. Thread-safe; every change wakes the open watches."""

    def __init__(self, items: list[dict] | None = None, token: str | None = None,
                 supports_cluster_ip_selector: bool = True, netns: str | None = None):
        self.token = token
        self.netns = netns          # listen on the loopback of this (lab) namespace instead
        self.forbidden: set[str] = set()            # kinds that answer 403
        self.authorize = None                       # (handler, path, query) -> 403 message | None
        self.supports_cluster_ip_selector = supports_cluster_ip_selector
        self.requests: list[str] = []               # "GET /api/v1/pods?..." in order
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._log: list[tuple[int, str, dict]] = []  # (rv, type, object) for watches
        self._expired_before = 0                     # watches from an older RV get 410
        self._bookmarks = 0
        self._closing = False
        self.exec_runner = None                      # (ns, pod, container, command) -> argv | (argv, env) | None
        self.exec_protocols = EXEC_PROTOCOLS         # what this "server version" speaks, preferred first
        self.execs: list[dict] = []                  # one record per exec: pod, command, protocol, exit code
        self._exec_procs: list[subprocess.Popen] = []
        for it in items or []:
            self._put(copy.deepcopy(it), log=False)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_lab(cls, prefix: str, **kw) -> "FakeApi":
        from tracer.lab import topology as T

        doc = T.inventory(T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent"))))
        return cls(doc["items"], **kw)

    # -- store

    @staticmethod
    def _key(obj: dict) -> tuple[str, str, str]:
        md = obj["metadata"]
        return obj["kind"], md.get("namespace", ""), md["name"]

    def _put(self, obj: dict, log: bool = True) -> dict:
        with self._cond:
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            key = self._key(obj)
            typ = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = obj
            if log:
                self._log.append((self._rv, typ, copy.deepcopy(obj)))
            self._cond.notify_all()
            return obj

    def add(self, obj: dict) -> dict:
        """Create or replace an object (ADDED or MODIFIED on open watches)."""
        return self._put(copy.deepcopy(obj))

    def modify(self, kind: str, namespace: str, name: str, fn) -> dict:
        with self._cond:
            obj = copy.deepcopy(self._objects[(kind, namespace, name)])
            fn(obj)
            return self._put(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._cond:
            obj = self._objects.pop((kind, namespace or "", name))
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._log.append((self._rv, "DELETED", obj))
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._cond:
            return copy.deepcopy(self._objects.get((kind, namespace or "", name)))

    def expire(self) -> None:
        """Compact history: every resourceVersion up to now is too old (watches get 410)."""
        with self._cond:
            self._expired_before = self._rv + 1
            self._log.clear()
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    @property
    def resource_version(self) -> int:
        return self._rv

    # -- server

    def start(self) -> "FakeApi":
        api = self

        class Handler(_Handler):
            fake = api

        from tracer.node import netns

        # A socket keeps the namespace it was made in: so do the connections it accepts.
        with netns.entered(self.netns) if self.netns else contextlib.nullcontext():
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakeapi",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for proc in list(self._exec_procs):   # like a kubelet going away: stdin ends, then TERM
            _close_quietly(proc.stdin)
        for proc in list(self._exec_procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    def __enter__(self) -> "FakeApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path | str, context: str = "fake", token: str | None = None) -> Path:
        token = token if token is not None else (self.token or "fake-token")
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake"}}],
        }
        path = Path(path)
        path.write_text(json.dumps(doc))   # JSON is YAML
        return path

    # -- what the handler asks

    def _select(self, kind: str, ns: str | None, fsel: str | None, lsel: str | None) -> list[dict]:
        out = []
        for (k, ons, _), obj in sorted(self._objects.items()):
            if k != kind or (ns and ons != ns):
                continue
            if _match_fields(obj, fsel) and _match_labels(obj, lsel):
                out.append(obj)
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeApi

    def log_message(self, *args) -> None:   # quiet
        pass

    def _send_json(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": message, "reason": reason, "code": code})

    def do_GET(self) -> None:  # noqa: N802 — http.server's naming
        fake = self.fake
        fake.requests.append(f"GET {self.path}")
        if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if fake.authorize is not None and (denied := fake.authorize(self, self.path, q)):
            return self._status(403, "Forbidden", denied)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["version"]:
            return self._send_json(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"})
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:3] == ["apis", "discovery.k8s.io", "v1"]:
            rest = parts[3:]
        else:
            return self._status(404, "NotFound", f"the server could not find the requested resource {url.path}")
        ns = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if ns and len(rest) == 3 and rest[0] == "pods" and rest[2] == "exec":
            return self._exec(ns, rest[1], parse_qs(url.query))
        if ns and len(rest) == 3 and rest[0] == "pods" and rest[2] == "portforward":
            from tests.fakeapi_portforward import portforward_session
            return portforward_session(self, ns, rest[1], parse_qs(url.query))
        if not rest or rest[0] not in RESOURCES or len(rest) > 2:
            return self._status(404, "NotFound", f"the server could not find the requested resource {url.path}")
        kind, namespaced, list_kind, api_version = RESOURCES[rest[0]]
        if kind in fake.forbidden:
            return self._status(403, "Forbidden",
                                f'{rest[0]} is forbidden: User "fake" cannot list resource "{rest[0]}"')
        fsel = q.get("fieldSelector")
        if fsel and "spec.clusterIP" in fsel and not fake.supports_cluster_ip_selector:
            return self._status(400, "BadRequest", '"spec.clusterIP" is not a known field selector')
        if len(rest) == 2:      # GET one object
            with fake._cond:
                obj = fake._objects.get((kind, ns or "", rest[1]))
                obj = copy.deepcopy(obj) if obj else None
            if obj is None:
                return self._status(404, "NotFound", f'{rest[0]} "{rest[1]}" not found')
            return self._send_json(200, obj)
        if q.get("watch") in ("1", "true", "True"):
            return self._watch(kind, ns, q)
        return self._list(kind, ns, q, list_kind, api_version)

    def _exec(self, ns: str, name: str, qs: dict) -> None:
        _exec_session(self, ns, name, qs)

    def _list(self, kind, ns, q, list_kind, api_version) -> None:
        fake = self.fake
        with fake._cond:
            items = copy.deepcopy(fake._select(kind, ns, q.get("fieldSelector"), q.get("labelSelector")))
            rv = fake._rv
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0)
        page = items[start:start + limit] if limit else items[start:]
        for it in page:     # like the real server, list items carry no kind/apiVersion
            it.pop("kind", None)
            it.pop("apiVersion", None)
        meta = {"resourceVersion": str(rv)}
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
        self._send_json(200, {"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": page})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, typ: str, obj: dict) -> None:
        self._chunk(json.dumps({"type": typ, "object": obj}).encode() + b"\n")

    def _watch(self, kind, ns, q) -> None:
        fake = self.fake
        fsel, lsel = q.get("fieldSelector"), q.get("labelSelector")
        since = int(q.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 300)
        bookmarks_wanted = q.get("allowWatchBookmarks") in ("1", "true", "True")
        self.close_connection = True    # a watch ends its connection (and stop() cuts it)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with fake._cond:
            seen_bookmarks = fake._bookmarks
        try:
            while True:
                out: list[tuple[str, dict]] = []
                done = False
                with fake._cond:     # collect under the lock, write outside it
                    if fake._closing:
                        return
                    if since and since < fake._expired_before:
                        out.append(("ERROR", {
                            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": f"too old resource version: {since} ({fake._expired_before - 1})",
                            "reason": "Expired", "code": 410}))
                        done = True
                    else:
                        for rv, typ, obj in fake._log:
                            if rv <= since or obj["kind"] != kind:
                                continue
                            if ns and obj["metadata"].get("namespace") != ns:
                                continue
                            if _match_fields(obj, fsel) and _match_labels(obj, lsel):
                                out.append((typ, obj))
                                since = rv
                        if bookmarks_wanted and fake._bookmarks != seen_bookmarks:
                            seen_bookmarks = fake._bookmarks
                            out.append(("BOOKMARK", {"kind": kind, "apiVersion": "v1",
                                                     "metadata": {"resourceVersion": str(fake._rv)}}))
                            since = max(since, fake._rv)
                    left = deadline - time.monotonic()
                    if not out and not done and left > 0:
                        fake._cond.wait(min(left, 0.5))
                for typ, obj in out:
                    self._event(typ, obj)
                if done or deadline - time.monotonic() <= 0:
                    break
            self._chunk(b"")    # end of the chunked body: the watch ended normally
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


# ---------------------------------------------------------------------------------------
# Exec over a websocket (RFC 6455, server side; only what the exec channel protocol uses)

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
        data = self.rfile.read(n)
        if data is None or len(data) < n:
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


def _exec_session(self: "_Handler", ns: str, name: str, qs: dict) -> None:
    """One exec: upgrade, run, relay the channels, send the exit Status, close."""
    fake = self.fake
    if "pods/exec" in fake.forbidden:
        return self._status(403, "Forbidden", f'pods "{name}" is forbidden: User "fake" cannot create '
                                              f'resource "pods/exec" in API group "" in the namespace "{ns}"')
    pod = fake.get("Pod", ns, name)
    if pod is None:
        return self._status(404, "NotFound", f'pods "{name}" not found')
    if self.headers.get("Upgrade", "").lower() != "websocket" or not self.headers.get("Sec-WebSocket-Key"):
        return self._status(400, "BadRequest", "Upgrade request required")
    offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    proto = next((p for p in fake.exec_protocols if p in offered), None)
    if proto is None:
        return self._status(400, "BadRequest", f"none of the offered subprotocols {offered} is supported")
    command = qs.get("command", [])
    container = (qs.get("container") or [None])[0]
    spec = fake.exec_runner(ns, pod, container, command) if fake.exec_runner else None
    argv, env = (spec if isinstance(spec, tuple) else (spec, None)) if spec else (None, None)
    accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
    self.send_response(101, "Switching Protocols")
    self.send_header("Upgrade", "websocket")
    self.send_header("Connection", "Upgrade")
    self.send_header("Sec-WebSocket-Accept", accept.decode())
    self.send_header("Sec-WebSocket-Protocol", proto)
    self.end_headers()
    self.wfile.flush()
    self.close_connection = True
    ws = _ServerWebsocket(self.rfile, self.connection)
    record = {"namespace": ns, "pod": name, "command": command, "protocol": proto, "exit_code": None,
              "stdin_closed_by": None}
    fake.execs.append(record)
    if argv is None:
        ws.send(0x2, bytes([3]) + json.dumps(_exec_status(None, command, f'exec: "{(command or [""])[0]}": '
                                                                           "executable file not found in $PATH")).encode())
        ws.send(0x8, struct.pack("!H", 1000))
        return
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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

    pumps = [threading.Thread(target=pump, args=(proc.stdout, 1), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, 2), daemon=True)]
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
    time.sleep(0.05)
    with contextlib.suppress(OSError):
        self.connection.shutdown(socket.SHUT_RDWR)



# ---------------------------------------------------------------------------------------
# The podtrace agent DaemonSet, played by the lab

AGENT_NAMESPACE = "podtrace"
AGENT_LABELS = {"app.kubernetes.io/name": "podtrace-agent", "app.kubernetes.io/part-of": "podtrace"}


def agent_pods(prefix: str) -> list[dict]:
    """One running agent pod per lab node, as the DaemonSet of manifests/ would make them."""
    from tracer.lab import topology as T

    topo = T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent")))
    out = []
    for n in topo.nodes:
        name = f"podtrace-agent-{hashlib.sha256(n.name.encode()).hexdigest()[:5]}"
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": AGENT_NAMESPACE, "labels": dict(AGENT_LABELS),
                         "uid": str(hashlib.md5(f"{prefix}/{name}".encode()).hexdigest()),
                         "annotations": {"podtrace.io/netns": n.netns},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": "podtrace-agent", "uid": "ds", "controller": True}]},
            "spec": {"nodeName": n.name, "hostNetwork": True, "hostPID": True,
                     "containers": [{"name": "agent", "image": "podtrace:dev"}]},
            "status": {"phase": "Running", "podIP": n.ip, "hostIP": n.ip},
        })
    return out


def lab_agent_runner(python: str, cwd: str, env: dict | None = None):
    """exec_runner for agent pods: `podtrace agent` runs on the pod's node — inside the lab
    node's network namespace only (nsenter --net: same mounts, same /proc, like a
    hostNetwork + hostPID container) — and anything else is "not found"."""
    def run(ns: str, pod: dict, container: str | None, command: list[str]):
        if ns != AGENT_NAMESPACE or command[:2] != ["podtrace", "agent"]:
            return None
        node_netns = pod["metadata"]["annotations"]["podtrace.io/netns"]
        argv = ["nsenter", f"--net=/run/netns/{node_netns}", "--", python, "-m", "tracer.cli", *command[1:]]
        return argv, dict(env if env is not None else os.environ, PYTHONPATH=cwd)
    return run
