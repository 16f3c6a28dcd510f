"""The fake API server: the objects it holds, served the way the API serves them (list, watch,
discovery, errors; see the package docstring for what it serves)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests.fakeapi import execws, portforward, selectors, tables, tls


@dataclass(frozen=True)
class Resource:
    """One resource of the API, as discovery describes it."""

    name: str                   # the path segment
    kind: str
    namespaced: bool
    group_version: str          # "v1" or "discovery.k8s.io/v1"
    short_names: tuple[str, ...] = ()
    virtual: bool = False       # derived from the other objects (namespaces) or always empty (events)

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    def discovery(self) -> dict:
        out = {"name": self.name, "singularName": self.kind.lower(), "namespaced": self.namespaced,
               "kind": self.kind, "verbs": ["get", "list", "watch"]}
        if self.short_names:
            out["shortNames"] = list(self.short_names)
        if self.kind in ("Pod", "Service"):
            out["categories"] = ["all"]
        return out


DISCOVERY_GROUP = "discovery.k8s.io"
AUTHORIZATION_GROUP = "authorization.k8s.io"
RESOURCES = {r.name: r for r in (
    Resource("pods", "Pod", True, "v1", ("po",)),
    Resource("nodes", "Node", False, "v1", ("no",)),
    Resource("services", "Service", True, "v1", ("svc",)),
    Resource("namespaces", "Namespace", False, "v1", ("ns",), virtual=True),
    Resource("events", "Event", True, "v1", ("ev",), virtual=True),
    Resource("endpoints", "Endpoints", True, "v1", ("ep",), virtual=True),
    Resource("endpointslices", "EndpointSlice", True, f"{DISCOVERY_GROUP}/v1"),
    Resource("secrets", "Secret", True, "v1"),
)}
SUBRESOURCES = {"exec": "PodExecOptions", "portforward": "PodPortForwardOptions"}   # of pods: create, get
KIND_RESOURCE = {r.kind: r for r in RESOURCES.values()}
CONTINUE_EXPIRED = ("The provided continue parameter is too old to display a consistent list result. You can "
                    "start a new list without the continue parameter, or use the continue token in this response "
                    "to retrieve the remainder of the results. Continuing with the provided token results in an "
                    "inconsistent list - objects that were created, modified, or deleted between the time the "
                    "first chunk was returned and now may show up in the list.")


def _merge(target: dict, patch: dict) -> None:
    """Apply a JSON merge patch in place: null removes a key, objects merge, the rest replaces."""
    for k, v in patch.items():
        if k in ("kind", "apiVersion") or (k == "metadata" and not isinstance(v, dict)):
            continue
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def _capacity() -> dict:
    pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{pages * page // 1024}Ki", "pods": "110",
            "ephemeral-storage": "10Gi"}


class _BadRequest(Exception):
    pass


def _status_doc(code: int, reason: str, message: str, **extra) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code, **extra}


def _forbidden_details(path: str) -> dict:
    """A 403's `details`, as the real server fills them: the resource (and the object's name)."""
    parts = [p for p in path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if len(rest) >= 2 and rest[0] == "namespaces":
        rest = rest[2:] or ["namespaces", rest[1]]
    out = {}
    if len(rest) >= 2:
        out["name"] = rest[1]
    if rest:
        out["kind"] = rest[0]
    return out


def _pos(key: tuple[str, str, str]) -> str:
    """Where an object sorts in a list: the etcd key's tail ("ns/name", or "name")."""
    return f"{key[1]}/{key[2]}" if key[1] else key[2]


def _encode_continue(rv: int, start: str) -> str:
    doc = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(doc, dict) or doc.get("v") != "meta.k8s.io/v1":
            raise ValueError("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
        rv, start = doc["rv"], doc["start"]
        if not isinstance(rv, int) or rv <= 0 or not isinstance(start, str) or not start.endswith("\x00"):
            raise ValueError("continue key is not valid")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise _BadRequest(f"continue key is not valid: {exc}") from None
    return rv, start[:-1]


class FakeApi:
    """The server and its object store. Thread-safe; every change wakes the open watches."""

    def __init__(self, items: list[dict] | None = None, token: str | None = None,
                 supports_cluster_ip_selector: bool = True, netns: str | None = None,
                 tls_enabled: bool = True, port: int = 0):
        self.token = token
        self.netns = netns          # listen on the loopback of this (lab) namespace instead
        self.tls_enabled = tls_enabled
        self.port = port
        self.forbidden: set[str] = set()            # kinds (and "pods/exec", "pods/portforward") that answer 403
        self.authorize = None                       # (handler, path, query) -> 403 message | None (rbac.py)
        self.supports_cluster_ip_selector = supports_cluster_ip_selector
        self.requests: list[str] = []               # "GET /api/v1/pods?..." in order
        self.gone: list[str] = []                   # each 410: "watch-event", "watch-status", "continue"
        self.on_continue = None                     # called before a continue page is served
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str, str], dict] = {}     # stored objects are never mutated
        self._log: list[tuple[int, str, dict, dict | None]] = []  # (rv, type, object, previous)
        self._snapshots: dict[int, dict] = {}        # rv → the store then, for continue tokens
        self._compacted = 0                          # history up to this RV is gone (410)
        self._gone_as = "event"                      # how a too-old watch request is answered
        self._cuts = 0                               # expire(gone="status") ends stale open watches
        self._bookmarks = 0
        self._closing = False
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.exec_runner = None                      # (ns, pod, container, command) -> argv | (argv, env) | None
        self.exec_protocols = execws.EXEC_PROTOCOLS  # what this "server version" speaks, preferred first
        self.execs: list[dict] = []                  # one record per exec: pod, command, protocol, exit code
        self._exec_procs: list[subprocess.Popen] = []
        self.forwards: list[dict] = []               # one record per port-forward (portforward.py)
        self._forward_socks: set[socket.socket] = set()   # its open connections to pods
        for it in items or []:
            self._put(copy.deepcopy(it), log=False)
        self._compacted = self._rv
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._certdir: tempfile.TemporaryDirectory | None = None

    @classmethod
    def from_lab(cls, prefix: str, **kw) -> "FakeApi":
        from tracer.lab import topology as T

        doc = T.inventory(T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent"))))
        for it in doc["items"]:
            if it["kind"] == "Node":    # what a kubelet reports: this machine's size
                it["status"].setdefault("capacity", _capacity())
                it["status"].setdefault("allocatable", _capacity())
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
            prev = self._objects.get(key)
            self._objects[key] = obj
            if log:
                self._log.append((self._rv, "ADDED" if prev is None else "MODIFIED", obj, prev))
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def add(self, obj: dict) -> dict:
        """Create or replace an object (ADDED or MODIFIED on open watches)."""
        return self._put(copy.deepcopy(obj))

    def modify(self, kind: str, namespace: str, name: str, fn) -> dict:
        with self._cond:
            obj = copy.deepcopy(self._objects[(kind, namespace, name)])
            fn(obj)
            return self._put(obj)

    def relabel(self, kind: str, namespace: str, name: str, **labels: str | None) -> dict:
        """Set (or, with None, remove) labels of an object: a selector watch sees it leave or enter."""
        def change(obj):
            have = obj["metadata"].setdefault("labels", {})
            for k, v in labels.items():
                if v is None:
                    have.pop(k, None)
                else:
                    have[k] = v
        return self.modify(kind, namespace, name, change)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._cond:
            prev = self._objects.pop((kind, namespace or "", name))
            self._rv += 1
            obj = copy.deepcopy(prev)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._log.append((self._rv, "DELETED", obj, prev))
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._cond:
            return copy.deepcopy(self._objects.get((kind, namespace or "", name)))

    def expire(self, gone: str = "event") -> None:
        """Compact history: every resourceVersion before now is too old. A watch that has not
        seen every change yet gets 410, as do continue tokens of earlier lists; a watch that
        is up to date goes on. `gone` says how a too-old watch hears it: "event" (an ERROR
        event in its stream, as the watch cache answers) or "status" (open stale watches end,
        and opening a watch from an old resourceVersion is answered with HTTP 410)."""
        if gone not in ("event", "status"):
            raise ValueError(f"gone must be 'event' or 'status', not {gone!r}")
        with self._cond:
            self._compacted = self._rv
            self._log.clear()
            self._snapshots.clear()
            self._gone_as = gone
            if gone == "status":
                self._cuts += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    @property
    def resource_version(self) -> int:
        return self._rv

    def _namespaces(self, objects: dict) -> list[tuple[tuple[str, str, str], dict]]:
        names = {"default", "kube-system"} | {k[1] for k in objects if k[1]}
        return [(("Namespace", "", n), {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": n, "resourceVersion": str(self._rv),
                                                     "uid": f"ns-{n}", "creationTimestamp": self._created},
                                        "spec": {"finalizers": ["kubernetes"]},
                                        "status": {"phase": "Active"}}) for n in sorted(names)]

    @staticmethod
    def _endpoints(objects: dict) -> list[tuple[tuple[str, str, str], dict]]:
        """The core v1 Endpoints of each Service, from its EndpointSlices (as the mirroring
        controller keeps them; `kubectl describe service` reads these)."""
        out = []
        for (kind, ns, name), svc in objects.items():
            if kind != "Service":
                continue
            subsets = []
            for (k, sns, _), sl in sorted(objects.items()):
                labels = sl.get("metadata", {}).get("labels") or {}
                if k != "EndpointSlice" or sns != ns or labels.get("kubernetes.io/service-name") != name:
                    continue
                addrs = [{"ip": a, "nodeName": ep.get("nodeName"), "targetRef": ep.get("targetRef")}
                         for ep in sl.get("endpoints") or [] if (ep.get("conditions") or {}).get("ready", True)
                         for a in ep.get("addresses") or []]
                if addrs:
                    subsets.append({"addresses": addrs, "ports": [
                        {"name": p.get("name"), "port": p.get("port"), "protocol": p.get("protocol", "TCP")}
                        for p in sl.get("ports") or []]})
            md = svc["metadata"]
            out.append((("Endpoints", ns, name), {
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns, "labels": dict(md.get("labels") or {}),
                             "resourceVersion": md.get("resourceVersion"),
                             "creationTimestamp": md.get("creationTimestamp")},
                "subsets": subsets}))
        return out

    def _of_kind(self, objects: dict, kind: str, ns: str | None) -> list[tuple[tuple[str, str, str], dict]]:
        """(key, object) of one kind (and namespace), in list order."""
        if kind == "Namespace":
            found = self._namespaces(objects)
        elif kind == "Endpoints":
            found = self._endpoints(objects)
        elif kind == "Event":
            found = []
        else:
            found = [(k, o) for k, o in objects.items() if k[0] == kind]
        return sorted(((k, o) for k, o in found if not ns or k[1] == ns), key=lambda ko: _pos(ko[0]))

    # -- server

    def start(self) -> "FakeApi":
        api = self

        class Handler(_Handler):
            fake = api

        from tracer.node import netns

        # A socket keeps the namespace it was made in: so do the connections it accepts.
        with netns.entered(self.netns) if self.netns else contextlib.nullcontext():
            self._server = _Server(("127.0.0.1", self.port), Handler)
        if self.tls_enabled:
            auth = tls.authority()
            self._certdir = tempfile.TemporaryDirectory(prefix="fakeapi-tls-")
            cert, key = Path(self._certdir.name, "tls.crt"), Path(self._certdir.name, "tls.key")
            cert.write_bytes(auth.cert_pem)
            key.write_bytes(auth.key_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            ctx.set_alpn_protocols(["http/1.1"])
            ctx.num_tickets = 0     # no writes after the handshake that a reader thread could race
            # The handshake happens in the connection's own thread (Handler.setup), not in accept().
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakeapi",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls_enabled else 'http'}://{host}:{port}"

    def stop(self) -> None:
        if self._server is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        portforward.close_forwards(self)       # like a kubelet going away: the pods' connections end
        for proc in list(self._exec_procs):   # like a kubelet going away: stdin ends, then TERM
            execws._close_quietly(proc.stdin)
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
        with self._cond:
            conns, handlers = list(self._conns), list(self._handlers)
        for conn in conns:      # idle keep-alive connections: their threads wait for a request
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for t in handlers:
            t.join(5)
        self._server = None
        if self._certdir is not None:
            self._certdir.cleanup()
            self._certdir = None

    def __enter__(self) -> "FakeApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path | str, context: str = "fake", token: str | None = None,
                         ca_pem: bytes | None = None) -> Path:
        """A kubeconfig for this server: its CA as certificate-authority-data (`ca_pem`
        another one's, to test a wrong CA), a bearer token."""
        token = token if token is not None else (self.token or "fake-token")
        cluster = {"server": self.url}
        if self.tls_enabled:
            ca = ca_pem if ca_pem is not None else tls.authority().ca_pem
            cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake"}}],
        }
        path = Path(path)
        path.write_text(json.dumps(doc))   # JSON is YAML
        return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Quiet for a client refusing our certificate or hanging up; loud for our own bugs."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):     # ssl.SSLError is an OSError
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeApi

    def log_message(self, *args) -> None:   # quiet
        pass

    # -- connection life cycle

    def setup(self) -> None:
        fake = self.fake
        with fake._cond:
            fake._handlers.add(threading.current_thread())
            fake._conns.add(self.request)
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(10)
                self.request.do_handshake()
                self.request.settimeout(None)
            except OSError:     # e.g. a client that does not trust our authority
                with fake._cond:
                    fake._handlers.discard(threading.current_thread())
                    fake._conns.discard(self.request)
                raise
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.fake._cond:
                self.fake._handlers.discard(threading.current_thread())
                self.fake._conns.discard(self.request)

    # -- answers

    def _send_json(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def status(self, code: int, reason: str, message: str, **extra) -> None:
        self._send_json(code, _status_doc(code, reason, message, **extra))

    _status = status

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request, an unknown method) as a Status too."""
        reasons = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 408: "Timeout",
                   413: "RequestEntityTooLarge", 414: "RequestURITooLong", 431: "BadRequest",
                   501: "MethodNotAllowed"}
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.status(code, reasons.get(code, "InternalError"),
                        message or self.responses.get(code, ("error",))[0])

    def _not_found(self, path: str) -> None:
        self.status(404, "NotFound", f"the server could not find the requested resource ({path})",
                    details={})

    # -- requests

    def do_GET(self) -> None:  # noqa: N802 — http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch("OPTIONS")

    def _drain_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        fake.requests.append(f"{method} {self.path}")
        self._drain_body()
        if method == "HEAD":        # no body may follow: answer and close
            self.close_connection = True
        if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
            return self.status(401, "Unauthorized", "Unauthorized")
        url = urlparse(self.path)
        qs = parse_qs(url.query)
        q = {k: v[-1] for k, v in qs.items()}
        if fake.authorize is not None and (denied := fake.authorize(self, self.path, q)):
            return self.status(403, "Forbidden", denied, details=_forbidden_details(url.path))
        parts = [p for p in url.path.split("/") if p]
        if parts in (["healthz"], ["readyz"], ["livez"]) and method == "GET":
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        discovery = self._discovery(parts)
        if discovery is not None:
            if method != "GET":
                return self.status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                            "requested resource")
            return self._send_json(200, discovery)
        if parts == ["apis", AUTHORIZATION_GROUP, "v1", "selfsubjectaccessreviews"]:
            if method != "POST":
                return self.status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                            "requested resource")
            return self._access_review()
        if parts[:2] == ["api", "v1"]:
            group, rest = "v1", parts[2:]
        elif parts[:3] == ["apis", DISCOVERY_GROUP, "v1"]:
            group, rest = f"{DISCOVERY_GROUP}/v1", parts[3:]
        else:
            return self._not_found(url.path)
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if ns and len(rest) == 3 and rest[0] == "pods" and rest[2] == "exec" and group == "v1":
            if method not in ("GET", "POST"):
                return self.status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                            "requested resource")
            return execws.exec_session(self, ns, rest[1], qs)
        if ns and len(rest) == 3 and rest[0] == "pods" and rest[2] == "portforward" and group == "v1":
            if method not in ("GET", "POST"):
                return self.status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                            "requested resource")
            return portforward.portforward_session(self, ns, rest[1], qs)
        res = RESOURCES.get(rest[0]) if rest else None
        if res is None or res.group_version != group or len(rest) > 2 or (ns and not res.namespaced):
            return self._not_found(url.path)
        if method == "PATCH" and len(rest) == 2 and not res.virtual and res.kind not in fake.forbidden:
            return self._patch(res, ns, rest[1])
        if method != "GET":
            return self.status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                        "requested resource")
        if res.kind in fake.forbidden:
            verb = "get" if len(rest) == 2 else ("watch" if q.get("watch") in ("1", "true") else "list")
            return self.status(403, "Forbidden",
                               f'{res.name} is forbidden: User "fake" cannot {verb} resource "{res.name}" in '
                               f'API group "{group.rpartition("/")[0]}"' +
                               (f' in the namespace "{ns}"' if ns else " at the cluster scope"),
                               details={"kind": res.name})
        if len(rest) == 2:      # GET one object
            return self._get_one(res, ns, rest[1])
        try:
            lsel = selectors.parse_labels(q.get("labelSelector"))
            fsel = selectors.parse_fields(q.get("fieldSelector"), res.kind)
            if not fake.supports_cluster_ip_selector and any(f == "spec.clusterIP" for f, _, _ in fsel):
                raise selectors.BadSelector('"spec.clusterIP" is not a known field selector: only '
                                            '"metadata.name", "metadata.namespace"')
            if q.get("watch") in ("1", "true", "True"):
                return self._watch(res, ns, q, lsel, fsel)
            return self._list(res, ns, q, lsel, fsel)
        except (_BadRequest, selectors.BadSelector) as exc:
            return self.status(400, "BadRequest", str(exc))

    def _discovery(self, parts: list[str]) -> dict | None:
        host = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        if parts == ["version"]:
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake", "platform": "linux/amd64"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
        groups = [{"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                   "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}}
                  for g in (DISCOVERY_GROUP, AUTHORIZATION_GROUP)]
        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        for g in groups:
            if parts == ["apis", g["name"]]:
                return {"kind": "APIGroup", "apiVersion": "v1", **g}
        for path, gv in ((["api", "v1"], "v1"), (["apis", DISCOVERY_GROUP, "v1"], f"{DISCOVERY_GROUP}/v1"),
                         (["apis", AUTHORIZATION_GROUP, "v1"], f"{AUTHORIZATION_GROUP}/v1")):
            if parts == path:
                resources = [r.discovery() for r in RESOURCES.values() if r.group_version == gv]
                if gv == "v1":
                    resources += [{"name": f"pods/{sub}", "singularName": "", "namespaced": True,
                                   "kind": kind, "verbs": ["create", "get"]} for sub, kind in SUBRESOURCES.items()]
                if gv == f"{AUTHORIZATION_GROUP}/v1":
                    resources.append({"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
                                      "namespaced": False, "kind": "SelfSubjectAccessReview", "verbs": ["create"]})
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                        "resources": resources}
        return None

    def _access_review(self) -> None:
        """`kubectl auth can-i`: allowed are the verbs the server serves (get, list, watch,
        patch; create and get on pods/exec and pods/portforward) on what `forbidden` does not
        name — and, with an `authorize` that can say (rbac.py), what it allows."""
        try:
            review = json.loads(self.body or b"null")
            attrs = review["spec"]["resourceAttributes"]
        except (ValueError, KeyError, TypeError):
            return self.status(400, "BadRequest", "a SelfSubjectAccessReview with spec.resourceAttributes is needed")
        resource, sub, verb = attrs.get("resource", ""), attrs.get("subresource", ""), attrs.get("verb", "")
        res = RESOURCES.get(resource)
        group_ok = res is not None and attrs.get("group", "") == res.group_version.rpartition("/")[0]
        if sub:
            allowed = resource == "pods" and sub in SUBRESOURCES and group_ok and verb in ("create", "get") \
                and f"pods/{sub}" not in self.fake.forbidden
        else:
            allowed = group_ok and res.kind not in self.fake.forbidden and \
                (verb in ("get", "list", "watch") or (verb == "patch" and not res.virtual))
        allows = getattr(self.fake.authorize, "allows", None)
        if allowed and allows is not None:
            allowed = allows(verb, attrs.get("group", ""), resource + (f"/{sub}" if sub else ""),
                             attrs.get("namespace") or None, attrs.get("name") or None)
        self._send_json(201, {"kind": "SelfSubjectAccessReview", "apiVersion": f"{AUTHORIZATION_GROUP}/v1",
                              "metadata": {}, "spec": review["spec"],
                              "status": {"allowed": bool(allowed),
                                         **({} if allowed else {"reason": "not served, or forbidden"})}})

    def _get_one(self, res: Resource, ns: str | None, name: str) -> None:
        fake = self.fake
        with fake._cond:
            found = [o for k, o in fake._of_kind(fake._objects, res.kind, ns) if k[2] == name]
            obj = copy.deepcopy(found[0]) if found else None
        if obj is None:
            return self.status(404, "NotFound", f'{res.name} "{name}" not found',
                               details={"name": name, "kind": res.name})
        if tables.wants_table(self.headers.get("Accept")):
            return self._send_json(200, tables.table(res.kind, [obj], {"resourceVersion": str(fake._rv)}))
        return self._send_json(200, obj)

    def _patch(self, res: Resource, ns: str | None, name: str) -> None:
        """A JSON merge patch (RFC 7386) of one object, as `kubectl label` and `annotate` send:
        the object changes like `modify()` changes it (MODIFIED, or DELETED/ADDED for
        selector watches). Other patch types are refused (415)."""
        fake = self.fake
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != "application/merge-patch+json":
            return self.status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types include: "
                                                            f"application/merge-patch+json (got {ctype!r})")
        try:
            patch = json.loads(self.body or b"null")
            if not isinstance(patch, dict):
                raise ValueError("a merge patch is a JSON object")
        except ValueError as exc:
            return self.status(400, "BadRequest", f"error decoding patch: {exc}")
        md = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
        for field, want in (("name", name), ("namespace", ns or None)):
            if field in md and md[field] != want:
                return self.status(400, "BadRequest", f"the {field} of the object ({md[field]}) does not match "
                                                      f"the {field} on the URL ({want})")
        with fake._cond:
            if (res.kind, ns or "", name) not in fake._objects:
                return self.status(404, "NotFound", f'{res.name} "{name}" not found',
                                   details={"name": name, "kind": res.name})
            obj = fake.modify(res.kind, ns or "", name, lambda o: _merge(o, patch))
        self._send_json(200, obj)

    def _list(self, res: Resource, ns, q, lsel, fsel) -> None:
        """One page of a list. A list that needs more pages is served from one snapshot of
        the store: the continue token names its resourceVersion and where the page ended."""
        fake = self.fake
        try:
            limit = int(q.get("limit") or 0)
        except ValueError:
            raise _BadRequest(f"invalid limit: {q.get('limit')!r}") from None
        token = q.get("continue")
        if token and fake.on_continue:
            fake.on_continue()
        start = ""
        with fake._cond:
            if token:
                rv, start = _decode_continue(token)
                objects = fake._snapshots.get(rv)
                if objects is None or rv < fake._compacted:
                    fake.gone.append("continue")
                    return self.status(410, "Expired", CONTINUE_EXPIRED)
            else:
                rv, objects = fake._rv, fake._objects
            items = [(k, o) for k, o in fake._of_kind(objects, res.kind, ns)
                     if (not start or _pos(k) > start + "\x00")
                     and selectors.match_labels(o, lsel) and selectors.match_fields(o, fsel)]
            page = items[:limit] if limit else items
            meta = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                if rv not in fake._snapshots:
                    fake._snapshots[rv] = dict(objects)
                    for old in sorted(fake._snapshots)[:-64]:
                        del fake._snapshots[old]
                meta["continue"] = _encode_continue(rv, _pos(page[-1][0]))
                if not lsel and not fsel:
                    meta["remainingItemCount"] = len(items) - limit
            page = copy.deepcopy([o for _, o in page])
        if tables.wants_table(self.headers.get("Accept")):
            return self._send_json(200, tables.table(res.kind, page, meta))
        for it in page:     # like the real server, list items carry no kind/apiVersion
            it.pop("kind", None)
            it.pop("apiVersion", None)
        self._send_json(200, {"kind": res.list_kind, "apiVersion": res.group_version, "metadata": meta,
                              "items": page})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, typ: str, obj: dict) -> None:
        self._chunk(json.dumps({"type": typ, "object": obj}).encode() + b"\n")

    def _watch(self, res: Resource, ns, q, lsel, fsel) -> None:
        """A watch as the watch cache serves it: from `resourceVersion` on (without one, or
        with "0", first an ADDED for every object there is); an object that stops matching
        the selectors is DELETED for this watch, one that starts matching is ADDED; 410 when
        the resourceVersion is older than the history kept."""
        fake = self.fake
        raw_rv = q.get("resourceVersion") or ""
        try:
            since = int(raw_rv) if raw_rv not in ("", "0") else None
        except ValueError:
            raise _BadRequest(f"invalid resourceVersion: {raw_rv!r}") from None
        try:
            deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        except ValueError:
            raise _BadRequest(f"invalid timeoutSeconds: {q.get('timeoutSeconds')!r}") from None
        bookmarks_wanted = q.get("allowWatchBookmarks") in ("1", "true", "True")
        as_table = tables.wants_table(self.headers.get("Accept"))

        def passes(obj):
            return (obj is not None and (not ns or obj["metadata"].get("namespace") == ns)
                    and selectors.match_labels(obj, lsel) and selectors.match_fields(obj, fsel))

        def too_old(rv_from):
            return _status_doc(410, "Expired", f"too old resource version: {rv_from} ({fake._compacted})")

        out: list[tuple[str, dict]] = []
        with fake._cond:
            if since is not None and since < fake._compacted and fake._gone_as == "status":
                fake.gone.append("watch-status")
                return self.status(410, "Expired", too_old(since)["message"])
            cuts, seen_bookmarks = fake._cuts, fake._bookmarks
            if since is None:       # the state now, as ADDED events, then what changes
                since = fake._rv
                out = [("ADDED", copy.deepcopy(o)) for _, o in fake._of_kind(fake._objects, res.kind, ns)
                       if passes(o)]
                if bookmarks_wanted and q.get("sendInitialEvents") in ("1", "true"):
                    out.append(("BOOKMARK", {"kind": res.kind, "apiVersion": res.group_version,
                                             "metadata": {"resourceVersion": str(since), "annotations": {
                                                 "k8s.io/initial-events-end": "true"}}}))
        self.close_connection = True    # a watch ends its connection (and stop() cuts it)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                done = False
                with fake._cond:     # collect under the lock, write outside it
                    if fake._closing:
                        return
                    if since < fake._compacted:
                        if fake._cuts != cuts:      # expire(gone="status"): the stream just ends
                            done = True
                        else:
                            fake.gone.append("watch-event")
                            out.append(("ERROR", too_old(since)))
                            done = True
                    else:
                        for rv, typ, obj, prev in fake._log:
                            if rv <= since:
                                continue
                            since = rv
                            if obj["kind"] != res.kind:
                                continue
                            now_in, was_in = typ != "DELETED" and passes(obj), passes(prev)
                            if typ == "DELETED":
                                if was_in:
                                    out.append(("DELETED", copy.deepcopy(obj)))
                            elif now_in:
                                out.append(("MODIFIED" if was_in and typ == "MODIFIED" else "ADDED",
                                            copy.deepcopy(obj)))
                            elif was_in:      # left the selector: gone for this watch
                                left = copy.deepcopy(prev)
                                left["metadata"]["resourceVersion"] = str(rv)
                                out.append(("DELETED", left))
                        if bookmarks_wanted and fake._bookmarks != seen_bookmarks:
                            seen_bookmarks = fake._bookmarks
                            since = max(since, fake._rv)
                            out.append(("BOOKMARK", {"kind": res.kind, "apiVersion": res.group_version,
                                                     "metadata": {"resourceVersion": str(fake._rv)}}))
                    left_s = deadline - time.monotonic()
                    if not out and not done and left_s > 0:
                        fake._cond.wait(min(left_s, 0.5))
                for typ, obj in out:
                    if as_table and typ in ("ADDED", "MODIFIED", "DELETED"):
                        obj = tables.table(res.kind, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]})
                    self._event(typ, obj)
                out = []
                if done or deadline - time.monotonic() <= 0:
                    break
            self._chunk(b"")    # end of the chunked body: the watch ended normally
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
