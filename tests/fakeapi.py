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
"""

from __future__ import annotations

import copy
import json
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
}


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
                 supports_cluster_ip_selector: bool = True):
        self.token = token
        self.forbidden: set[str] = set()            # kinds that answer 403
        self.supports_cluster_ip_selector = supports_cluster_ip_selector
        self.requests: list[str] = []               # "GET /api/v1/pods?..." in order
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._log: list[tuple[int, str, dict]] = []  # (rv, type, object) for watches
        self._expired_before = 0                     # watches from an older RV get 410
        self._bookmarks = 0
        self._closing = False
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
        if not rest or rest[0] not in RESOURCES or len(rest) > 2:
            return self._status(404, "NotFound", f"the server could not find the requested resource {url.path}")
        kind, namespaced, list_kind, api_version = RESOURCES[rest[0]]
        if kind in fake.forbidden:
            return self._status(403, "Forbidden",
                                f'{rest[0]} is forbidden: User "fake" cannot list resource "{rest[0]}"')
        fsel = q.get("fieldSelector")
        if fsel and "spec.clusterIP" in fsel and not fake.supports_cluster_ip_selector:
            return self._status(400, "BadRequest", f'"spec.clusterIP" is not a known field selector')
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
