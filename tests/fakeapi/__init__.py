"""A Kubernetes API server for tests: what podtrace's cluster code and kubectl need of one.

    with FakeApi.from_lab("pttestk8s") as api:          # serves the lab's objects over HTTPS
        cfg = api.write_kubeconfig(tmp_path / "kubeconfig")   # carries the CA, a bearer token
        api.add(pod_obj)                                  # ADDED on every open watch
        api.relabel("Pod", "default", "pod-1-1", app="x") # DELETED/ADDED for selector watches
        api.delete("Pod", "default", "pod-1-1")           # DELETED
        api.expire()                                      # stale watches and continue tokens: 410

Serves, on 127.0.0.1 and a random port, from threads (stdlib http.server), over TLS with a
certificate of its own authority (`tls.py`; `tls_enabled=False` for plain HTTP):

- discovery: /api, /apis, /api/v1, /apis/discovery.k8s.io[/v1],
  /apis/authorization.k8s.io[/v1], /version, /healthz;
- pods, nodes, services, secrets and discovery.k8s.io/v1 endpointslices: list (cluster-wide and per
  namespace), get, and watch; namespaces, endpoints (from the EndpointSlices) and events
  (always none) are derived: list and get, and a watch of them sends the current state only;
- label selectors in every form (`k=v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`) and
  field selectors on the fields each kind supports (others: 400), `selectors.py`;
- paging with `limit`/`continue` from one snapshot per list; a continue token whose snapshot
  was compacted by `expire()` is answered 410, a malformed one 400;
- watches like the watch cache: from `resourceVersion` on, or the current state as ADDED
  events first when there is none; DELETED/ADDED when an object leaves/enters the selectors;
  BOOKMARK on `bookmark()`; 410 for a resourceVersion older than the last `expire()`, as an
  ERROR event or (after `expire(gone="status")`) as the HTTP status of the watch request;
- exec over a websocket (`execws.py`), honouring stdin/stdout/stderr/tty and `container`;
  what runs is up to `exec_runner(namespace, pod, container, command)`;
- port-forward over a websocket (`portforward.py`) to 127.0.0.1 in the pod's network namespace
  (a lab node's, for the agent pods), and the agents' side of it: the token Secret, `agent
  --serve` on every lab node;
- authorization: `authorize(handler, path, query)` returns a 403 message or None, e.g. `rbac.py`
  (the roles manifests/rbac.yaml binds to a group);
- every error as a JSON `Status` (401 bad token, 403 `forbidden` kinds or `authorize`, 404,
  405, 400, 410);
- Tables (`tables.py`) to a client that asks for them, as `kubectl get` does without `-o`;
- JSON merge patches of one object (`kubectl label`, `annotate`); nothing else writes;
- SelfSubjectAccessReviews (`kubectl auth can-i`): what it serves is allowed, unless `forbidden`.

Run by hand, serving a lab's objects and its agent pods until interrupted:

    python -m tests.fakeapi --lab PREFIX --kubeconfig FILE
"""

from tests.fakeapi.execws import EXEC_PROTOCOLS, WS_GUID
from tests.fakeapi.lab import AGENT_LABELS, AGENT_NAMESPACE, agent_pods, lab_agent_runner, lab_pod_runner
from tests.fakeapi.server import RESOURCES, FakeApi

__all__ = ["AGENT_LABELS", "AGENT_NAMESPACE", "EXEC_PROTOCOLS", "RESOURCES", "WS_GUID", "FakeApi",
           "agent_pods", "lab_agent_runner", "lab_pod_runner"]
