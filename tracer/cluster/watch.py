"""Keeping an inventory current from the API server: list, then watch.

`ClusterSource` lists then watches a set of `Stream`s in threads (resourceVersion, bookmarks,
410 Gone → relist, reconnect with backoff); `stop()` ends every watch at once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tracer.cluster.endpoints import resolve
from tracer.cluster.inventory import Endpoint, Inventory
from tracer.cluster.api import Connection, Stream, _call, _get_json, api_error, cluster_streams
from tracer.errors import EnvironmentProblem, PodtraceError


@dataclass
class StreamState:
    stream: Stream
    resource_version: str | None = None
    keys: set = field(default_factory=set)
    lists: int = 0
    events: int = 0
    bookmarks: int = 0
    expired: int = 0
    errors: int = 0
    last_error: str | None = None


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class ClusterSource:
    """An `Inventory` kept current by list+watch of `streams` (default: all four kinds,
    cluster-wide). `start()` lists synchronously — so it raises the connection's errors —
    then one daemon thread per stream watches; `stop()` interrupts them all.

        with ClusterSource(connect(), streams) as src:
            ep = src.resolve("default/web-0")
            ... src.describe_ip(ip) during the capture ...
    """

    def __init__(self, conn: Connection, streams: Iterable[Stream] | None = None,
                 inventory: Inventory | None = None, page_size: int = 500,
                 watch_timeout: int = 300, backoff: tuple[float, float] = (0.5, 30.0),
                 on_event: Callable[[str, str, str], None] | None = None):
        self.conn = conn
        self.inventory = inventory or Inventory(source=conn.source)
        self.states = [StreamState(s) for s in dict.fromkeys(streams or cluster_streams())]
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.on_event = on_event
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[int, object] = {}
        self._owners: dict[tuple[str, str], set[int]] = {}
        self.generation = 0
        # Without a cluster-wide Node stream, a pod that lands on a node we do not know yet
        # makes us GET that node (node addresses hardly change: no watch for them).
        self._nodes_watched = any(st.stream.kind == "Node" and not st.stream.field_selector
                                  for st in self.states)

    # -- life cycle

    def start(self) -> Inventory:
        for i, st in enumerate(self.states):
            self._list(i, st)
        self.inventory.reindex()
        for i, st in enumerate(self.states):
            t = threading.Thread(target=self._run, args=(i, st), daemon=True,
                                 name=f"podtrace-watch-{st.stream.kind.lower()}-{i}")
            t.start()
            self._threads.append(t)
        return self.inventory

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for resp in list(self._responses.values()):
            _interrupt(resp)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> "ClusterSource":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- queries (thread-safe)

    def resolve(self, spec: str) -> Endpoint:
        with self.lock:
            return resolve(spec, self.inventory)

    def describe_ip(self, ip: str | None) -> dict | None:
        with self.lock:
            return self.inventory.describe_ip(ip)

    def wait_until(self, predicate: Callable[[Inventory], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(inventory)` holds (checked after every change)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.inventory):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return predicate(self.inventory)
                self._changed.wait(left)
            return True

    def stats(self) -> dict:
        with self.lock:
            return {
                "pods": len(self.inventory.pods), "services": len(self.inventory.services),
                "nodes": len(self.inventory.nodes), "endpointslices": len(self.inventory.slices),
                "streams": [{"stream": st.stream.describe(), "resource_version": st.resource_version,
                             "lists": st.lists, "events": st.events, "bookmarks": st.bookmarks,
                             "expired": st.expired, "errors": st.errors, "last_error": st.last_error}
                            for st in self.states],
            }

    # -- internals

    def _apply(self, i: int, kind: str, event: str, obj: dict) -> None:
        obj.setdefault("kind", kind)
        with self._changed:
            md = obj.get("metadata") or {}
            key = f"{md.get('namespace')}/{md.get('name')}" if kind != "Node" else md.get("name")
            owners = self._owners.setdefault((kind, key), set())
            if event == "DELETED":
                owners.discard(i)
                self.states[i].keys.discard(key)
                if owners:      # another stream still sees it
                    return
                del self._owners[(kind, key)]
            else:
                owners.add(i)
                self.states[i].keys.add(key)
            self.inventory.apply(event, obj)
            self.generation += 1
            self._changed.notify_all()
        if kind == "Pod" and event != "DELETED" and not self._nodes_watched:
            self._fetch_node((obj.get("spec") or {}).get("nodeName"))
        if self.on_event:
            self.on_event(kind, event, key)

    def _fetch_node(self, name: str | None) -> None:
        if not name or name in self.inventory.nodes:
            return
        try:
            got = _call(self.conn, f"get node {name}", self.conn.core.read_node, name, missing_ok=True)
        except PodtraceError:
            return      # the pod still resolves; only its node's address is missing
        if got:
            got.setdefault("kind", "Node")
            with self._changed:
                self.inventory.apply("ADDED", got)
                self.generation += 1
                self._changed.notify_all()

    def _list(self, i: int, st: StreamState) -> None:
        """A full, paginated list of one stream; what it no longer returns is deleted."""
        from kubernetes.client.exceptions import ApiException

        fn = st.stream.lister(self.conn)
        what = f"list {st.stream.describe()}"
        seen: set[str] = set()
        cont = None
        while True:
            try:
                doc = _get_json(self.conn, what, fn, limit=self.page_size, _continue=cont,
                                **st.stream.selectors())
            except ApiException as exc:
                if exc.status == 410 and cont:      # the continue token expired: start over
                    seen.clear()
                    cont = None
                    continue
                raise api_error(exc, self.conn, what) from None
            for it in doc.get("items") or []:
                md = it.get("metadata") or {}
                seen.add(f"{md.get('namespace')}/{md.get('name')}" if st.stream.kind != "Node"
                         else md.get("name"))
                self._apply(i, st.stream.kind, "MODIFIED", it)
            meta = doc.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                st.resource_version = meta.get("resourceVersion")
                break
        for key in list(st.keys - seen):
            ns, _, name = key.rpartition("/")
            gone = {"kind": st.stream.kind, "metadata": {"name": name}}
            if ns:
                gone["metadata"]["namespace"] = ns
            self._apply(i, st.stream.kind, "DELETED", gone)
        st.lists += 1

    def _run(self, i: int, st: StreamState) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                if st.resource_version is None:
                    self._list(i, st)
                self._watch(i, st)
                delay = self.backoff[0]
            except _Expired:
                st.expired += 1
                st.resource_version = None
            except Exception as exc:    # noqa: BLE001 — a watch thread must outlive any failure
                if self._stop.is_set():
                    return
                err = exc if isinstance(exc, PodtraceError) else api_error(exc, self.conn, f"watch {st.stream.describe()}")
                st.errors += 1
                st.last_error = err.line()
                self._stop.wait(delay)
                delay = min(self.backoff[1], delay * 2)

    def _watch(self, i: int, st: StreamState) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        fn = st.stream.lister(self.conn)
        try:
            resp = fn(watch=True, resource_version=st.resource_version, allow_watch_bookmarks=True,
                      timeout_seconds=self.watch_timeout, _preload_content=False,
                      _request_timeout=(self.conn.timeout, self.watch_timeout + 30),
                      **st.stream.selectors())
        except ApiException as exc:
            if exc.status == 410:
                raise _Expired() from None
            raise
        self._responses[i] = resp
        try:
            if self._stop.is_set():
                return
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise EnvironmentProblem(f"watch of {st.stream.describe()} failed: "
                                             f"{obj.get('code')} {obj.get('message') or obj.get('reason')}",
                                             "it is retried; check the API server if it persists")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if typ == "BOOKMARK":
                    st.bookmarks += 1
                elif typ in ("ADDED", "MODIFIED", "DELETED"):
                    st.events += 1
                    self._apply(i, st.stream.kind, typ, obj)
                if rv:
                    st.resource_version = rv
        finally:
            self._responses.pop(i, None)
            with contextlib.suppress(Exception):
                resp.release_conn()


def _interrupt(resp) -> None:
    """Unblock a thread reading a watch response (urllib3 ≥ 2.3 has shutdown())."""
    with contextlib.suppress(Exception):
        if hasattr(resp, "shutdown"):
            resp.shutdown()
            return
    with contextlib.suppress(Exception):
        sock = resp._fp.fp.raw._sock      # older urllib3: shut the socket down under it
        sock.shutdown(socket.SHUT_RDWR)
