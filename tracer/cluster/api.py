"""The Kubernetes API server: finding the configuration, connecting, mapping failures to errors.

- `connect()` picks the configuration like kubectl (--kubeconfig, KUBECONFIG, ~/.kube/config,
  then in-cluster) and maps every failure to a one-line `tracer.errors` exception.
- `Stream` names one list+watch (a kind, a namespace, selectors); `tracer.cluster.fetch` lists
  only what a trace needs, `tracer.cluster.watch` keeps an inventory current.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tracer import settings
from tracer.errors import BadInput, EnvironmentProblem, PodtraceError

KINDS = ("Node", "Pod", "Service", "EndpointSlice")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBECONFIG = Path("~/.kube/config")


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
