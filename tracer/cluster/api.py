"""Live Kubernetes metadata: the API server (kubeconfig or in-cluster; list, then watch) kept
in a `k8s.Inventory`, and the node side (which pod owns a host veth, from /proc, netlink and
CRI).

- `connect()` picks the configuration like kubectl (--kubeconfig, KUBECONFIG, ~/.kube/config,
  then in-cluster) and maps every failure to a one-line `tracer.errors` exception.
- `inventory_for()` fetches only what a trace's SRC/DST need (no cluster-wide list) and
  returns the `Stream`s that keep exactly that current.
- `ClusterSource` lists then watches a set of `Stream`s in threads (resourceVersion, bookmarks,
  410 Gone → relist, reconnect with backoff) and keeps its inventory current; `stop()` ends
  every watch at once.
- `host_veth_owner()` / `host_veth_owners()` / `pod_netns_inodes()`: a host-side veth → its
  peer's network namespace (IFLA_LINK + link-netnsid, matched by RTM_GETNSID against the
  namespaces of /proc and /run/netns) → the pod (CRI sandbox, pod cgroup, or pod IP).
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tracer import settings
from tracer.cluster import inventory as k8s
from tracer.errors import BadInput, EnvironmentProblem, PodtraceError

KINDS = ("Node", "Pod", "Service", "EndpointSlice")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBECONFIG = Path("~/.kube/config")


def host_proc() -> Path:
    """The host's /proc: the agent mounts it at /host/proc (PODTRACE_HOST_PROC)."""
    return settings.host_proc()


# ---------------------------------------------------------------------------------------
# Configuration and connection

@dataclass(frozen=True)
class ConfigRef:
    """Where the cluster configuration comes from (no network involved)."""

    kind: str                   # "kubeconfig" or "in-cluster"
    path: str | None = None     # kubeconfig file(s), os.pathsep-separated like KUBECONFIG
    context: str | None = None

    def describe(self) -> str:
        if self.kind == "in-cluster":
            return "in-cluster service account"
        return f"kubeconfig {self.path}" + (f" (context {self.context})" if self.context else "")


def find_config(kubeconfig: str | None = None, context: str | None = None,
                environ: dict | None = None) -> ConfigRef | None:
    """The configuration kubectl would use, or None when there is none (then the caller may
    fall back to the lab). --kubeconfig wins, then KUBECONFIG, ~/.kube/config, in-cluster."""
    env = os.environ if environ is None else environ
    if kubeconfig:
        return ConfigRef("kubeconfig", str(kubeconfig), context)
    if env.get("KUBECONFIG"):
        files = [f for f in env["KUBECONFIG"].split(os.pathsep) if f]
        if any(Path(f).expanduser().exists() for f in files):
            return ConfigRef("kubeconfig", env["KUBECONFIG"], context)
    home = DEFAULT_KUBECONFIG.expanduser()
    if home.exists():
        return ConfigRef("kubeconfig", str(home), context)
    if env.get("KUBERNETES_SERVICE_HOST") and IN_CLUSTER_TOKEN.exists():
        if context:
            raise BadInput(f"--context {context} given, but there is no kubeconfig (running in-cluster)",
                           "drop --context, or pass --kubeconfig FILE")
        return ConfigRef("in-cluster")
    if context:
        raise BadInput(f"--context {context} given, but there is no kubeconfig",
                       "pass --kubeconfig FILE or set KUBECONFIG")
    return None


@dataclass
class Connection:
    """An API client plus what error messages need to say where it points."""

    api: object                 # kubernetes.client.ApiClient
    ref: ConfigRef
    host: str
    timeout: float = 10.0

    @property
    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api)

    @property
    def discovery(self):
        from kubernetes import client
        return client.DiscoveryV1Api(self.api)

    @property
    def source(self) -> str:
        return f"cluster {self.host} ({self.ref.describe()})"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api.close()


def _contexts(path: str) -> tuple[list[str], str | None]:
    """Context names and current-context of a kubeconfig path list, merged like kubectl
    (the first file that sets current-context wins)."""
    import yaml

    names: list[str] = []
    active = None
    files = [f for f in path.split(os.pathsep) if f]
    found = False
    for f in files:
        fp = Path(f).expanduser()
        if not fp.exists():
            continue
        found = True
        doc = yaml.safe_load(fp.read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{fp} is not a kubeconfig (not a mapping)")
        names += [c.get("name") for c in doc.get("contexts") or [] if c.get("name") not in names]
        active = active or doc.get("current-context") or None
    if not found:
        raise FileNotFoundError(f"no such file: {path}")
    return names, active


def connect(kubeconfig: str | None = None, context: str | None = None, timeout: float = 10.0,
            ref: ConfigRef | None = None, check: bool = True) -> Connection:
    """An API connection from --kubeconfig/--context, KUBECONFIG, ~/.kube/config or the
    in-cluster service account. With `check`, one cheap request proves the server answers
    and these credentials may list pods. Raises BadInput (bad --kubeconfig/--context) or
    EnvironmentProblem (no config, unreachable, 401, 403, TLS)."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    unusable = (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError, AttributeError)
    if kubeconfig and not Path(kubeconfig).expanduser().exists():
        raise BadInput(f"kubeconfig {kubeconfig} does not exist", "pass an existing file to --kubeconfig")
    ref = ref or find_config(kubeconfig, context)
    if ref is None:
        raise EnvironmentProblem("no Kubernetes configuration: no --kubeconfig, KUBECONFIG, ~/.kube/config "
                                 "or in-cluster service account",
                                 "pass --kubeconfig FILE (and --context NAME), or --cluster FILE")
    cfg = client.Configuration()
    try:
        if ref.kind == "in-cluster":
            config.load_incluster_config(client_configuration=cfg)
        else:
            try:
                names, active = _contexts(ref.path)
            except unusable as exc:
                raise EnvironmentProblem(f"kubeconfig {ref.path} is unusable: {_first_line(exc)}",
                                         "check it with `kubectl config view`") from None
            if ref.context and ref.context not in names:
                near = difflib.get_close_matches(ref.context, names, n=3, cutoff=0.4)
                hint = f"did you mean {', '.join(near)}?" if near else \
                    f"pick one of: {', '.join(names) or '(none)'} (kubectl config get-contexts)"
                raise BadInput(f"no context {ref.context!r} in kubeconfig {ref.path}", hint)
            if not ref.context and not active:
                raise EnvironmentProblem(f"kubeconfig {ref.path} has no current-context",
                                         "pass --context NAME or run `kubectl config use-context NAME`")
            ref = ConfigRef(ref.kind, ref.path, ref.context or active)
            config.load_kube_config(config_file=ref.path, context=ref.context,
                                    client_configuration=cfg, persist_config=False)
    except PodtraceError:
        raise
    except unusable as exc:
        where = ref.describe()
        raise EnvironmentProblem(f"cannot load the Kubernetes configuration ({where}): {_first_line(exc)}",
                                 "check it with `kubectl config view`") from None
    cfg.retries = 1     # fail fast on an unreachable server; watches reconnect themselves
    conn = Connection(client.ApiClient(cfg), ref, cfg.host, timeout)
    if check:
        try:
            _call(conn, "list pods", conn.core.list_pod_for_all_namespaces, limit=1)
        except PodtraceError:
            conn.close()
            raise
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def api_error(exc: BaseException, conn: Connection, what: str) -> PodtraceError:
    """One line for what went wrong talking to the API server, and how to fix it."""
    from kubernetes.client.exceptions import ApiException
    from urllib3 import exceptions as u3

    where = f"the Kubernetes API server {conn.host} ({conn.ref.describe()})"
    if isinstance(exc, ApiException):
        status = exc.status or 0
        if status == 401:
            return EnvironmentProblem(f"{where} rejected the credentials (401 Unauthorized) while trying to {what}",
                                      "refresh them (log in again, or check the token/certificate in the kubeconfig)")
        if status == 403:
            return EnvironmentProblem(f"not allowed to {what} on {where} (403 Forbidden)",
                                      "grant get/list/watch on pods, nodes, services and "
                                      "discovery.k8s.io endpointslices (manifests/rbac.yaml has the ClusterRole)")
        reason = _status_message(exc) or exc.reason or "error"
        return EnvironmentProblem(f"{where} answered {status} to {what}: {reason}",
                                  "check the server with `kubectl get --raw /readyz`")
    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, u3.NewConnectionError):     # before TimeoutError: urllib3 2 derives it from that
        why = "connection refused" if "refused" in str(exc).lower() else _first_line(exc)
        return EnvironmentProblem(f"cannot reach {where}: {why}",
                                  "check the cluster is up and that --context/KUBECONFIG name it (kubectl cluster-info)")
    if isinstance(exc, u3.SSLError) or "SSL" in type(exc).__name__:
        return EnvironmentProblem(f"TLS with {where} failed: {_first_line(exc)}",
                                  "check certificate-authority / insecure-skip-tls-verify in the kubeconfig")
    if isinstance(exc, (u3.TimeoutError, socket.timeout, TimeoutError)):
        return EnvironmentProblem(f"{where} did not answer in time ({what})",
                                  "check the cluster is up and reachable from here (kubectl cluster-info)")
    if isinstance(exc, (u3.HTTPError, OSError)):
        why = "connection refused" if "refused" in str(exc).lower() else _first_line(exc)
        return EnvironmentProblem(f"cannot reach {where}: {why}",
                                  "check the cluster is up and that --context/KUBECONFIG name it (kubectl cluster-info)")
    return EnvironmentProblem(f"talking to {where} failed ({what}): {_first_line(exc)}",
                              "check the cluster with `kubectl cluster-info`")


def _status_message(exc) -> str | None:
    with contextlib.suppress(Exception):
        return json.loads(exc.body).get("message")
    return None


def _get_json(conn: Connection, what: str, fn: Callable, *args, **kwargs) -> dict:
    """Call a generated API method without building models: the raw JSON as a dict."""
    from kubernetes.client.exceptions import ApiException
    from urllib3 import exceptions as u3

    try:
        resp = fn(*args, _preload_content=False, _request_timeout=conn.timeout, **kwargs)
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()
    except ApiException:
        raise
    except (u3.HTTPError, OSError, ValueError) as exc:
        raise api_error(exc, conn, what) from None


def _call(conn: Connection, what: str, fn: Callable, *args, missing_ok: bool = False, **kwargs) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return _get_json(conn, what, fn, *args, **kwargs)
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        raise api_error(exc, conn, what) from None


# ---------------------------------------------------------------------------------------
# What to list and watch

@dataclass(frozen=True)
class Stream:
    """One list+watch: a kind, optionally one namespace, field and label selectors."""

    kind: str
    namespace: str | None = None
    field_selector: str | None = None
    label_selector: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind}")

    def describe(self) -> str:
        parts = [self.kind.lower() + "s"]
        if self.namespace:
            parts.append(f"in {self.namespace}")
        if self.field_selector:
            parts.append(f"[{self.field_selector}]")
        if self.label_selector:
            parts.append(f"{{{self.label_selector}}}")
        return " ".join(parts)

    def lister(self, conn: Connection) -> Callable:
        core, disc = conn.core, conn.discovery
        if self.kind == "Node":
            return core.list_node
        table = {
            "Pod": (core.list_pod_for_all_namespaces, core.list_namespaced_pod),
            "Service": (core.list_service_for_all_namespaces, core.list_namespaced_service),
            "EndpointSlice": (disc.list_endpoint_slice_for_all_namespaces, disc.list_namespaced_endpoint_slice),
        }[self.kind]
        if self.namespace:
            fn = table[1]
            return lambda **kw: fn(self.namespace, **kw)
        return table[0]

    def selectors(self) -> dict:
        out = {}
        if self.field_selector:
            out["field_selector"] = self.field_selector
        if self.label_selector:
            out["label_selector"] = self.label_selector
        return out


def cluster_streams() -> list[Stream]:
    """Everything: for a cluster-wide inventory (small clusters, `--all`)."""
    return [Stream(k) for k in KINDS]


def node_streams(node: str) -> list[Stream]:
    """What a node agent needs: its own pods and node, every Service and EndpointSlice (to name
    VIPs and backends). Memory grows with the node's pods and the cluster's Services only."""
    return [Stream("Node", field_selector=f"metadata.name={node}"),
            Stream("Pod", field_selector=f"spec.nodeName={node}"),
            Stream("Service"), Stream("EndpointSlice")]


# ---------------------------------------------------------------------------------------
# Targeted fetch: only what SRC/DST need

def _selector(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _items(conn: Connection, stream: Stream, what: str, page: int = 500) -> Iterator[dict]:
    """Every object of a (paginated) list, with `kind` set (list items have none)."""
    fn = stream.lister(conn)
    cont = None
    while True:
        doc = _call(conn, what, fn, limit=page, _continue=cont, **stream.selectors())
        for it in doc.get("items") or []:
            it.setdefault("kind", stream.kind)
            yield it
        cont = (doc.get("metadata") or {}).get("continue")
        if not cont:
            return


def _names(conn: Connection, stream: Stream, what: str) -> list[str]:
    out = []
    for it in _items(conn, stream, what):
        md = it.get("metadata") or {}
        out.append(f"{md.get('namespace')}/{md.get('name')}" if md.get("namespace") else md.get("name"))
    return out


def _close(word: str, names: list[str]) -> str:
    near = difflib.get_close_matches(word, names, n=3, cutoff=0.5)
    return f"did you mean {', '.join(near)}?" if near else "list them with kubectl get"


def inventory_for(conn: Connection, specs: Iterable[str]) -> tuple[k8s.Inventory, list[Stream]]:
    """A small inventory holding what the specs name (a pod, a Service with its slices and
    backend pods, a node, or whatever owns an address) plus the nodes of those pods, and
    the Streams that keep exactly that current during a long capture. Unknown names raise
    BadInput with close matches from the same namespace."""
    inv = k8s.Inventory(source=conn.source)
    streams: list[Stream] = []
    for spec in specs:
        _fetch_spec(conn, spec.strip(), inv, streams)
    for name in sorted({p.node for p in inv.pods.values() if p.node} - set(inv.nodes)):
        obj = _call(conn, f"get node {name}", conn.core.read_node, name, missing_ok=True)
        if obj:
            obj.setdefault("kind", "Node")
            inv.apply("ADDED", obj)
    inv.reindex()
    return inv, list(dict.fromkeys(streams))


def _add(inv: k8s.Inventory, kind: str, obj: dict | None) -> dict | None:
    if obj:
        obj.setdefault("kind", kind)
        inv.apply("ADDED", obj)
    return obj


def _fetch_service(conn: Connection, inv: k8s.Inventory, streams: list[Stream], ns: str, name: str,
                   obj: dict) -> None:
    _add(inv, "Service", obj)
    streams.append(Stream("Service", ns, field_selector=f"metadata.name={name}"))
    sl = Stream("EndpointSlice", ns, label_selector=f"{SERVICE_NAME_LABEL}={name}")
    streams.append(sl)
    for it in _items(conn, sl, f"list endpointslices of {ns}/{name}"):
        inv.apply("ADDED", it)
    selector = (obj.get("spec") or {}).get("selector") or {}
    if selector:
        ps = Stream("Pod", ns, label_selector=_selector(selector))
        streams.append(ps)
        for it in _items(conn, ps, f"list the pods of Service {ns}/{name}"):
            inv.apply("ADDED", it)
    else:   # a Service without selector: its EndpointSlices name the pods
        for key in inv.services[f"{ns}/{name}"].backends:
            pns, pname = key.split("/", 1)
            _add(inv, "Pod", _call(conn, f"get pod {key}", conn.core.read_namespaced_pod, pname, pns,
                                   missing_ok=True))
            streams.append(Stream("Pod", pns, field_selector=f"metadata.name={pname}"))


def _fetch_spec(conn: Connection, s: str, inv: k8s.Inventory, streams: list[Stream]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        ip = str(ipaddress.IPv4Address(s))
    except ValueError:
        ip = None
    if ip is not None:
        pods = Stream("Pod", field_selector=f"status.podIP={ip}")
        streams.append(pods)
        found = [inv.apply("ADDED", it) for it in _items(conn, pods, f"find the pod with IP {ip}")]
        try:
            svcs = list(_items(conn, Stream("Service", field_selector=f"spec.clusterIP={ip}"),
                               f"find the Service with IP {ip}"))
        except EnvironmentProblem:
            # API servers before 1.31 refuse the spec.clusterIP field selector (400): scan.
            svcs = [it for it in _items(conn, Stream("Service"), "list services")
                    if (it.get("spec") or {}).get("clusterIP") == ip]
        for it in svcs:
            md = it["metadata"]
            _fetch_service(conn, inv, streams, md.get("namespace", "default"), md["name"], it)
        if not found and not svcs:
            for it in _items(conn, Stream("Node"), "list nodes"):
                node = k8s.node_from_obj(it)
                if node.ip == ip:
                    inv.upsert_node(node)
                    streams.append(Stream("Node", field_selector=f"metadata.name={node.name}"))
        return
    parts = s.split("/")
    if parts[0] in ("svc", "service") and len(parts) == 3 and all(parts[1:]):
        ns, name = parts[1], parts[2]
        obj = _call(conn, f"get service {ns}/{name}", conn.core.read_namespaced_service, name, ns,
                    missing_ok=True)
        if obj is None:
            names = _names(conn, Stream("Service", ns), f"list services in {ns}")
            raise BadInput(f"no Service {ns}/{name}", _close(f"{ns}/{name}", names))
        _fetch_service(conn, inv, streams, ns, name, obj)
        return
    if parts[0] == "node" and len(parts) == 2 and parts[1]:
        obj = _call(conn, f"get node {parts[1]}", conn.core.read_node, parts[1], missing_ok=True)
        if obj is None:
            raise BadInput(f"no node {parts[1]}", _close(parts[1], _names(conn, Stream("Node"), "list nodes")))
        _add(inv, "Node", obj)
        streams.append(Stream("Node", field_selector=f"metadata.name={parts[1]}"))
        return
    if len(parts) in (1, 2) and all(parts):
        ns, name = (parts[0], parts[1]) if len(parts) == 2 else ("default", parts[0])
        obj = _call(conn, f"get pod {ns}/{name}", conn.core.read_namespaced_pod, name, ns, missing_ok=True)
        if obj is None:
            try:
                names = _names(conn, Stream("Pod", ns), f"list pods in {ns}")
            except (EnvironmentProblem, ApiException):
                names = []
            raise BadInput(f"no pod {ns}/{name}", _close(f"{ns}/{name}", names))
        _add(inv, "Pod", obj)
        streams.append(Stream("Pod", ns, field_selector=f"metadata.name={name}"))
        return
    # Anything else is left to k8s.resolve(), which says what is wrong with it.


# ---------------------------------------------------------------------------------------
# List, then watch

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
    """A `k8s.Inventory` kept current by list+watch of `streams` (default: all four kinds,
    cluster-wide). `start()` lists synchronously — so it raises the connection's errors —
    then one daemon thread per stream watches; `stop()` interrupts them all.

        with ClusterSource(connect(), streams) as src:
            ep = src.resolve("default/web-0")
            ... src.describe_ip(ip) during the capture ...
    """

    def __init__(self, conn: Connection, streams: Iterable[Stream] | None = None,
                 inventory: k8s.Inventory | None = None, page_size: int = 500,
                 watch_timeout: int = 300, backoff: tuple[float, float] = (0.5, 30.0),
                 on_event: Callable[[str, str, str], None] | None = None):
        self.conn = conn
        self.inventory = inventory or k8s.Inventory(source=conn.source)
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

    def start(self) -> k8s.Inventory:
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

    def resolve(self, spec: str) -> k8s.Endpoint:
        with self.lock:
            return k8s.resolve(spec, self.inventory)

    def describe_ip(self, ip: str | None) -> dict | None:
        with self.lock:
            return self.inventory.describe_ip(ip)

    def wait_until(self, predicate: Callable[[k8s.Inventory], bool], timeout: float = 10.0) -> bool:
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


# ---------------------------------------------------------------------------------------
# Node side: which pod owns a host veth

@dataclass(frozen=True)
class Link:
    ifindex: int
    ifname: str
    kind: str | None              # "veth", "bridge", "vxlan", …
    peer_ifindex: int | None      # IFLA_LINK: the peer's ifindex, in the peer's namespace
    link_netnsid: int | None      # the peer namespace's id, as this namespace numbers it
    master: str | None = None


def parse_links(text: str) -> list[Link]:
    """`ip -j -d link show` output → Links."""
    out = []
    for d in json.loads(text or "[]"):
        info = d.get("linkinfo") or {}
        out.append(Link(int(d["ifindex"]), d.get("ifname", ""), info.get("info_kind"),
                        d.get("link_index"), d.get("link_netnsid"), d.get("master")))
    return out


_FIB_LEAF = re.compile(r"^\s*\|-- ([0-9.]+)\s*$")


def parse_fib_trie(text: str) -> list[str]:
    """Local IPv4 addresses of a namespace from its /proc/PID/net/fib_trie (no setns)."""
    out: list[str] = []
    last = None
    for line in text.splitlines():
        m = _FIB_LEAF.match(line)
        if m:
            last = m.group(1)
            continue
        if last and "/32 host LOCAL" in line:
            if not last.startswith("127.") and last not in out:
                out.append(last)
    return out


_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a /proc/PID/cgroup of a container (systemd or cgroupfs kubelet driver)."""
    m = _POD_UID.search(text)
    return m.group(1).replace("_", "-") if m else None


def parse_crictl_inspectp(text: str) -> list[dict]:
    """`crictl inspectp -o json ID…` (one JSON document per sandbox, concatenated) →
    [{"namespace", "name", "uid", "pid", "netns_path"}]."""
    out = []
    dec = json.JSONDecoder()
    pos, text = 0, text.strip()
    while pos < len(text):
        doc, end = dec.raw_decode(text, pos)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        docs = doc if isinstance(doc, list) else [doc]
        for d in docs:
            st = d.get("status") or {}
            md = st.get("metadata") or {}
            info = d.get("info") or {}
            path = None
            for ns in ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []:
                if ns.get("type") == "network" and ns.get("path"):
                    path = ns["path"]
            out.append({"namespace": md.get("namespace"), "name": md.get("name"), "uid": md.get("uid"),
                        "pid": info.get("pid"), "netns_path": path})
    return out


def cri_netns_map(run: Callable = subprocess.run, timeout: float = 5.0) -> tuple[dict[int, str], str | None]:
    """netns inode → "ns/pod" from the container runtime (crictl), and a note when crictl
    cannot be used (missing, no runtime socket): the caller falls back to /proc."""
    try:
        ids = run(["crictl", "pods", "-q", "--state", "ready"], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {}, "crictl not installed"
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"crictl failed: {_first_line(exc)}"
    if ids.returncode != 0:
        return {}, f"crictl pods failed: {(ids.stderr or '').strip().splitlines()[-1:] or ids.returncode}"
    sandboxes = ids.stdout.split()
    if not sandboxes:
        return {}, None
    try:
        got = run(["crictl", "inspectp", "-o", "json", *sandboxes], capture_output=True, text=True,
                  timeout=timeout)
        entries = parse_crictl_inspectp(got.stdout) if got.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {}, f"crictl inspectp failed: {_first_line(exc)}"
    out = {}
    for e in entries:
        path = e["netns_path"] or (str(host_proc() / str(e["pid"]) / "ns" / "net") if e["pid"] else None)
        if not path or not e["name"]:
            continue
        with contextlib.suppress(OSError):
            out[os.stat(path).st_ino] = f"{e['namespace']}/{e['name']}"
    return out, None


@dataclass(frozen=True)
class NetnsRef:
    inode: int
    path: str                   # something open()-able: /proc/PID/ns/net or /run/netns/NAME
    pid: int | None = None
    name: str | None = None     # a named (ip netns) namespace


def scan_netns(proc: Path | None = None, run_netns: Path = Path("/run/netns")) -> dict[int, NetnsRef]:
    """Every network namespace with a process in it (one pid each) or a name under
    /run/netns. /proc/PID/ns/net of another user's process, or of one holding capabilities
    we lack, needs CAP_SYS_PTRACE: those are skipped, and /run/netns names still count."""
    proc = proc or host_proc()
    out: dict[int, NetnsRef] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        path = entry / "ns" / "net"
        with contextlib.suppress(OSError):
            ino = os.stat(path).st_ino
            if ino not in out:
                out[ino] = NetnsRef(ino, str(path), pid=int(entry.name))
    if run_netns.is_dir():
        for entry in run_netns.iterdir():
            with contextlib.suppress(OSError):
                ino = os.stat(entry).st_ino
                ref = out.get(ino)
                out[ino] = NetnsRef(ino, ref.path if ref else str(entry), ref.pid if ref else None, entry.name)
    return out


# Netlink: RTM_GETNSID asks a namespace which id it gives another one (by fd).
_NLMSG_ERROR, _RTM_NEWNSID, _RTM_GETNSID = 2, 88, 90
_NLM_F_REQUEST = 1
_NETNSA_NSID, _NETNSA_FD = 1, 3


class _Netlink:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.bind((0, 0))
        self.seq = 0

    def nsid_of(self, fd: int) -> int | None:
        """The id this socket's namespace gives the namespace behind `fd` (None: none)."""
        self.seq += 1
        body = struct.pack("=B3x", socket.AF_UNSPEC) + struct.pack("=HHI", 8, _NETNSA_FD, fd)
        msg = struct.pack("=IHHII", 16 + len(body), _RTM_GETNSID, _NLM_F_REQUEST, self.seq, 0) + body
        self.sock.send(msg)
        data = self.sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            ln, typ, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if ln < 16:
                break
            if seq == self.seq and typ == _NLMSG_ERROR:
                return None
            if seq == self.seq and typ == _RTM_NEWNSID:
                a = off + 16 + 4
                while a + 4 <= off + ln:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atype == _NETNSA_NSID:
                        (nsid,) = struct.unpack_from("=i", data, a + 4)
                        return None if nsid < 0 else nsid
                    a += (alen + 3) & ~3
                return None
            off += (ln + 3) & ~3
        return None

    def close(self) -> None:
        self.sock.close()


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def _in_netns(path: str | None):
    """This thread inside the namespace at `path` (None: stay)."""
    if path is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise EnvironmentProblem(f"cannot enter network namespace {path}: "
                                     f"{os.strerror(ctypes.get_errno())}", "run as root")
        try:
            yield
        finally:
            _libc.setns(home, _CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def _netns_path(node_netns: str | None) -> str | None:
    if node_netns is None or node_netns.startswith("/"):
        return node_netns
    return f"/run/netns/{node_netns}"


@dataclass
class VethOwner:
    host_ifname: str
    host_ifindex: int
    peer_ifindex: int | None
    nsid: int | None
    netns_inode: int | None = None
    pid: int | None = None
    netns_name: str | None = None
    ips: list[str] = field(default_factory=list)
    pod: str | None = None          # "ns/name"
    method: str | None = None       # how the pod was recognised: cri, cgroup or ip
    note: str | None = None

    def as_json(self) -> dict:
        return dict(self.__dict__)


def _ns_addresses(ref: NetnsRef) -> list[str]:
    if ref.pid is not None:
        with contextlib.suppress(OSError):
            return parse_fib_trie((host_proc() / str(ref.pid) / "net" / "fib_trie").read_text())
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError), _in_netns(ref.path):
        # A namespace nobody lives in: fib_trie of this thread, now inside it.
        return parse_fib_trie(Path("/proc/thread-self/net/fib_trie").read_text())
    return []


def _identify(ref: NetnsRef, inv: k8s.Inventory | None, cri: dict[int, str]) -> tuple[str | None, str | None, list[str]]:
    ips = _ns_addresses(ref)
    if ref.inode in cri:
        return cri[ref.inode], "cri", ips
    if inv is not None and ref.pid is not None:
        with contextlib.suppress(OSError):
            uid = pod_uid_from_cgroup((host_proc() / str(ref.pid) / "cgroup").read_text())
            if uid:
                for p in inv.pods.values():
                    if p.uid == uid:
                        return p.key, "cgroup", ips
    if inv is not None:
        for ip in ips:
            kind, key = inv.lookup_ip(ip)
            if kind == "pod" and not inv.pods[key].host_network:
                return key, "ip", ips
    return None, None, ips


def _read_links(node_netns: str | None) -> list[Link]:
    argv = ["ip", "-j", "-d", "link", "show"]
    if node_netns and not node_netns.startswith("/"):
        argv[1:1] = ["-n", node_netns]
    try:
        with _in_netns(node_netns if node_netns and node_netns.startswith("/") else None):
            got = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise EnvironmentProblem("`ip` (iproute2) is not installed", "apt-get install iproute2") from None
    if got.returncode != 0:
        raise EnvironmentProblem(f"cannot list links: {got.stderr.strip()[:200]}", "run as root")
    return parse_links(got.stdout)


def host_veth_owners(inv: k8s.Inventory | None = None, node_netns: str | None = None, cri: bool = True,
                     only: str | None = None) -> dict[str, VethOwner]:
    """Every veth of the node whose peer is in another namespace → the pod that owns it.
    `node_netns`: None (this namespace: the agent, hostNetwork), a name under /run/netns
    (the lab's nodes) or a path."""
    links = [ln for ln in _read_links(node_netns)
             if ln.kind == "veth" and ln.link_netnsid is not None and (only is None or ln.ifname == only)]
    if not links:
        return {}
    cri_map, note = cri_netns_map() if cri else ({}, "CRI not asked")
    path = _netns_path(node_netns)
    self_ino = os.stat(path or "/proc/thread-self/ns/net").st_ino
    candidates = [r for r in scan_netns().values() if r.inode != self_ino]
    by_nsid: dict[int, NetnsRef] = {}
    with _in_netns(path):
        nl = _Netlink(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    try:
        for ref in candidates:
            try:
                fd = os.open(ref.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                nsid = nl.nsid_of(fd)
            finally:
                os.close(fd)
            if nsid is not None:
                by_nsid.setdefault(nsid, ref)
    finally:
        nl.close()
    out = {}
    for ln in links:
        owner = VethOwner(ln.ifname, ln.ifindex, ln.peer_ifindex, ln.link_netnsid)
        ref = by_nsid.get(ln.link_netnsid)
        if ref is None:
            owner.note = "peer namespace not found (no process in it and no /run/netns name)"
        else:
            owner.netns_inode, owner.pid, owner.netns_name = ref.inode, ref.pid, ref.name
            owner.pod, owner.method, owner.ips = _identify(ref, inv, cri_map)
            if owner.pod is None:
                owner.note = "no pod of the inventory matches this namespace" + (f" ({note})" if note else "")
        out[ln.ifname] = owner
    return out


def host_veth_owner(ifname: str, inv: k8s.Inventory | None = None, node_netns: str | None = None,
                    cri: bool = True) -> VethOwner:
    """The pod behind one host-side veth (see host_veth_owners)."""
    got = host_veth_owners(inv, node_netns, cri, only=ifname)
    if ifname not in got:
        raise BadInput(f"{ifname} is not a veth with a peer in another namespace",
                       "give a host-side pod interface (ip -d link show type veth)")
    return got[ifname]


def uplinks(node_ips: Iterable[str] = ()) -> list[str]:
    """The devices this namespace reaches the other nodes and the world by (asked of the
    routing table; no packet is sent). They lead to the network, never into a pod — a veth
    there means a node that is itself a container or a namespace (kind, the lab)."""
    from tracer.node import facts as nodecheck

    here = nodecheck.NodeRef("host", None)
    links = nodecheck.links(here)
    out = [dev for ip in [*node_ips, "1.1.1.1"]
           if (dev := nodecheck.route_get(here, ip).get("dev")) and dev in links and dev != "lo"]
    return list(dict.fromkeys(out))


def local_pods(inv: k8s.Inventory | None = None, node_ips: Iterable[str] = (), cri: bool = False,
               ) -> tuple[int, dict[str, VethOwner], list[str]]:
    """This node as seen from its own namespace: (its netns inode, host veth → owner for
    every pod namespace hanging off it, the uplinks). Pods of other nodes that share the
    kernel (kind, the lab) are not behind this namespace's veths, so they are not here."""
    ups = uplinks(node_ips)
    host_ino = os.stat("/proc/thread-self/ns/net").st_ino
    owners = {name: o for name, o in host_veth_owners(inv, None, cri=cri).items()
              if o.netns_inode and o.netns_inode != host_ino and name not in ups}
    return host_ino, owners, ups


def pod_netns_inodes(inv: k8s.Inventory, node_netns: str | None = None, cri: bool = True) -> dict[int, str]:
    """netns inode → "ns/pod" for the pods of this node: what BPF events carry, so hops
    inside a pod's namespace can be named on a real node."""
    return {o.netns_inode: o.pod for o in host_veth_owners(inv, node_netns, cri).values()
            if o.pod and o.netns_inode}
