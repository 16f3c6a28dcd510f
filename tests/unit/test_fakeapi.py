"""The test API server speaks the API server's protocol: discovery, Status errors, selectors,
snapshot paging, watch-cache events, exec flags, HTTPS with its own CA, and the command that
runs it by hand. (Its use by podtrace's cluster code is tested in test_kube.py; by kubectl in
test_fakeapi_kubectl.py.)"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakeapi import FakeApi, agent_pods, tls
from tests.fakeapi import selectors as S
from tests.fakeapi.server import _encode_continue

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pttestfake"


@pytest.fixture
def api():
    with FakeApi.from_lab(PREFIX) as fake:
        fake.exec_runner = lambda ns, pod, container, command: command if command[0] in ("sh", "cat") else None
        yield fake


def _request(api: FakeApi, path: str, method: str = "GET", headers: dict | None = None,
             body: bytes | None = None) -> tuple[int, str, bytes]:
    ctx = ssl.create_default_context(cadata=tls.authority().ca_pem.decode())
    port = int(api.url.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def _json(api: FakeApi, path: str, **kw) -> tuple[int, dict]:
    code, ctype, body = _request(api, path, **kw)
    assert ctype == "application/json", (path, ctype, body[:200])
    return code, json.loads(body)


def _events(api: FakeApi, path: str) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of a watch that the server ends by itself (timeoutSeconds)."""
    code, ctype, body = _request(api, path)
    assert code == 200, body
    out = []
    for line in body.decode().splitlines():
        ev = json.loads(line)
        md = ev["object"].get("metadata") or {}
        out.append((ev["type"], md.get("name"), md.get("resourceVersion")))
    return out


# -- discovery and errors

def test_discovery_names_every_resource(api):
    assert _json(api, "/api")[1]["versions"] == ["v1"]
    groups = _json(api, "/apis")[1]
    assert groups["kind"] == "APIGroupList" and \
        [g["name"] for g in groups["groups"]] == ["discovery.k8s.io", "authorization.k8s.io"]
    core = _json(api, "/api/v1")[1]
    assert core["kind"] == "APIResourceList" and core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert {"pods", "nodes", "services", "namespaces", "events", "pods/exec"} <= set(by_name)
    assert by_name["pods"]["namespaced"] and not by_name["nodes"]["namespaced"]
    assert by_name["pods"]["kind"] == "Pod" and "watch" in by_name["pods"]["verbs"]
    assert by_name["services"]["shortNames"] == ["svc"]
    disc = _json(api, "/apis/discovery.k8s.io/v1")[1]
    assert [(r["name"], r["kind"]) for r in disc["resources"]] == [("endpointslices", "EndpointSlice")]


def test_derived_resources(api):
    code, ep = _json(api, "/api/v1/namespaces/default/endpoints/web")
    assert code == 200 and ep["subsets"][0]["addresses"][0]["ip"] == "10.244.2.3"
    assert {p["port"] for p in ep["subsets"][0]["ports"]} == {8080}
    code, ns = _json(api, "/api/v1/namespaces")
    assert [n["metadata"]["name"] for n in ns["items"]] == ["default", "kube-system"]
    assert _json(api, "/api/v1/namespaces/default")[1]["status"]["phase"] == "Active"
    assert _json(api, "/api/v1/events?fieldSelector=involvedObject.name%3Dpod-1-1")[1]["items"] == []


def test_tables_only_when_asked(api):
    table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    doc = _json(api, "/api/v1/namespaces/default/pods?limit=1", headers={"Accept": table})[1]
    assert doc["kind"] == "Table" and [c["name"] for c in doc["columnDefinitions"]][:3] == ["Name", "Ready", "Status"]
    assert doc["rows"][0]["cells"][:3] == ["pod-1-1", "1/1", "Running"] and "continue" in doc["metadata"]
    assert doc["rows"][0]["object"]["metadata"]["namespace"] == "default"
    assert _json(api, "/api/v1/nodes/node-1", headers={"Accept": table})[1]["rows"][0]["cells"][:2] == ["node-1", "Ready"]
    for accept in ("application/json", "application/json,application/json;as=Table;v=v1;g=meta.k8s.io",
                   "application/json;as=Table;v=v1beta1;g=meta.k8s.io"):
        assert _json(api, "/api/v1/pods", headers={"Accept": accept})[1]["kind"] == "PodList"


@pytest.mark.parametrize("method,path,code,reason", [
    ("GET", "/api/v1/configmaps", 404, "NotFound"),
    ("GET", "/apis/apps/v1/deployments", 404, "NotFound"),
    ("GET", "/api/v1/namespaces/default/pods/nope", 404, "NotFound"),
    ("GET", "/api/v1/namespaces/default/nodes", 404, "NotFound"),     # nodes are not namespaced
    ("POST", "/apis/apps/v1/namespaces/default/deployments", 404, "NotFound"),
    ("GET", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", 405, "MethodNotAllowed"),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", 400, "BadRequest"),
    ("DELETE", "/api/v1/namespaces/default/pods/pod-1-1", 405, "MethodNotAllowed"),
    ("PUT", "/api/v1/nodes/node-1", 405, "MethodNotAllowed"),
    ("GET", "/api/v1/pods?fieldSelector=spec.bogus%3Dx", 400, "BadRequest"),
    ("GET", "/api/v1/pods?labelSelector=app+in+()", 400, "BadRequest"),
    ("GET", "/api/v1/pods?limit=1&continue=not-a-token", 400, "BadRequest"),
    ("GET", "/api/v1/pods?limit=x", 400, "BadRequest"),
    ("GET", "/api/v1/pods?watch=1&resourceVersion=x", 400, "BadRequest"),
])
def test_every_error_is_a_status(api, method, path, code, reason):
    got, doc = _json(api, path, method=method)
    assert (got, doc["kind"], doc["code"], doc["reason"], doc["status"]) == (code, "Status", code, reason, "Failure")
    assert doc["message"]


def test_merge_patches(api):
    rv = api.resource_version
    merge = {"Content-Type": "application/merge-patch+json"}
    body = json.dumps({"metadata": {"labels": {"app": None, "tier": "x"}, "annotations": {"a": "b"}}}).encode()
    code, obj = _json(api, "/api/v1/namespaces/default/pods/pod-1-1", method="PATCH", headers=merge, body=body)
    assert code == 200 and obj["metadata"]["labels"].get("tier") == "x" and "app" not in obj["metadata"]["labels"]
    assert obj["metadata"]["annotations"]["a"] == "b" and int(obj["metadata"]["resourceVersion"]) == rv + 1
    code, doc = _json(api, "/api/v1/namespaces/default/pods/pod-1-1", method="PATCH", body=b"{}",
                      headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert (code, doc["reason"]) == (415, "UnsupportedMediaType")
    code, doc = _json(api, "/api/v1/namespaces/default/pods/pod-1-1", method="PATCH", headers=merge,
                      body=json.dumps({"metadata": {"name": "other"}}).encode())
    assert (code, doc["reason"]) == (400, "BadRequest")
    code, doc = _json(api, "/api/v1/namespaces/default/pods/nope", method="PATCH", headers=merge, body=b"{}")
    assert (code, doc["reason"]) == (404, "NotFound")
    assert api.resource_version == rv + 1


def test_unknown_methods_and_bad_tokens_are_a_status_too(tmp_path):
    with FakeApi.from_lab(PREFIX, token="right") as api:
        code, doc = _json(api, "/api/v1/pods", headers={"Authorization": "Bearer wrong"})
        assert (code, doc["reason"]) == (401, "Unauthorized")
        code, doc = _json(api, "/api/v1/pods", method="BREW", headers={"Authorization": "Bearer right"})
        assert (code, doc["kind"], doc["reason"]) == (501, "Status", "MethodNotAllowed")


def test_plain_http_can_be_asked_for():
    with FakeApi.from_lab(PREFIX, tls_enabled=False) as api:
        assert api.url.startswith("http://")
        port = int(api.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api")
        assert json.loads(conn.getresponse().read())["kind"] == "APIVersions"
        conn.close()


def test_https_needs_our_authority(api):
    ctx = ssl.create_default_context(cadata=tls.authority("another-ca").ca_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", int(api.url.rsplit(":", 1)[1]), context=ctx, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/api")
    conn.close()
    assert _json(api, "/api")[0] == 200      # a refused handshake does not hurt the server


# -- selectors

@pytest.mark.parametrize("selector,labels,want", [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "web"}, True),
    ("app!=web", {}, True),
    ("app!=web", {"app": "web"}, False),
    ("app in (web, db)", {"app": "db"}, True),
    ("app in (web,db)", {"app": "x"}, False),
    ("app notin (web,db)", {}, True),
    ("app notin (web,db)", {"app": "web"}, False),
    ("app", {"app": ""}, True),
    ("!app", {"app": "x"}, False),
    ("!app,tier", {"tier": "1"}, True),
    ("app in (a,b),tier notin (x),!gone", {"app": "b", "tier": "y"}, True),
    ("app.kubernetes.io/name=podtrace-agent", {"app.kubernetes.io/name": "podtrace-agent"}, True),
    ("replicas>2", {"replicas": "3"}, True),
    ("replicas<2", {"replicas": "3"}, False),
])
def test_label_selectors(selector, labels, want):
    assert S.match_labels({"metadata": {"labels": labels}}, S.parse_labels(selector)) is want


@pytest.mark.parametrize("selector", ["app in ()", "app in (a", "a b", "=x", "app=in valid", "-bad=x",
                                      "app,", "app>x"])
def test_malformed_label_selectors(selector):
    with pytest.raises(S.BadSelector):
        S.parse_labels(selector)


def test_field_selectors_per_kind():
    pod = {"metadata": {"name": "a", "namespace": "n"}, "spec": {"nodeName": "node-1"}}
    assert S.match_fields(pod, S.parse_fields("spec.nodeName=node-1,metadata.name!=b", "Pod"))
    assert S.match_fields(pod, S.parse_fields("spec.hostNetwork=false", "Pod"))     # absent reads false
    assert not S.match_fields(pod, S.parse_fields("spec.nodeName==node-2", "Pod"))
    with pytest.raises(S.BadSelector, match="field label not supported: spec.nodeName"):
        S.parse_fields("spec.nodeName=node-1", "Service")
    with pytest.raises(S.BadSelector, match="can't understand"):
        S.parse_fields("spec.nodeName", "Pod")


def test_set_based_selectors_through_the_server(api):
    for pod in agent_pods(PREFIX):
        api.add(pod)
    names = lambda sel: sorted(i["metadata"]["name"] for i in _json(api, f"/api/v1/pods?labelSelector={sel}")[1]["items"])
    assert names("app+in+(pod-1-1,pod-2-2)") == ["pod-1-1", "pod-2-2"]
    assert names("app+notin+(pod-1-1),app") == ["pod-1-2", "pod-2-1", "pod-2-2"]
    assert names("!app") == sorted(p["metadata"]["name"] for p in agent_pods(PREFIX))


# -- paging

def test_pages_are_one_snapshot_and_tokens_expire(api):
    code, first = _json(api, "/api/v1/pods?limit=2")
    assert [i["metadata"]["name"] for i in first["items"]] == ["pod-1-1", "pod-1-2"]
    assert first["metadata"]["remainingItemCount"] == 2 and "kind" not in first["items"][0]
    api.delete("Pod", "default", "pod-2-1")
    api.add({**api.get("Pod", "default", "pod-1-1"), "metadata": {"name": "pod-0", "namespace": "default"}})
    _, rest = _json(api, f"/api/v1/pods?limit=2&continue={first['metadata']['continue']}")
    # the list as it was: pod-2-1 still there, pod-0 not yet, nothing skipped
    assert [i["metadata"]["name"] for i in rest["items"]] == ["pod-2-1", "pod-2-2"]
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert "continue" not in rest["metadata"]
    api.expire()
    code, doc = _json(api, f"/api/v1/pods?limit=2&continue={first['metadata']['continue']}")
    assert (code, doc["reason"]) == (410, "Expired") and "continue parameter is too old" in doc["message"]
    code, doc = _json(api, f"/api/v1/pods?limit=2&continue={_encode_continue(10**6, 'x')}")
    assert code == 410 and api.gone == ["continue", "continue"]


# -- watches

def test_a_watch_without_resource_version_starts_with_the_state(api):
    evs = _events(api, "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1&labelSelector=app+in+(pod-1-1,pod-2-1)")
    assert [(t, n) for t, n, _ in evs] == [("ADDED", "pod-1-1"), ("ADDED", "pod-2-1")]
    rv = api.resource_version
    assert _events(api, f"/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={rv}") == []


def test_a_selector_watch_sees_objects_leave_and_enter(api):
    rv = api.resource_version
    api.relabel("Pod", "default", "pod-1-1", app="other")          # leaves app=pod-1-1
    api.relabel("Pod", "default", "pod-1-1", tier="x")             # still outside: nothing
    api.relabel("Pod", "default", "pod-1-1", app="pod-1-1")        # enters again
    api.relabel("Pod", "default", "pod-1-1", tier="y")             # inside: MODIFIED
    api.delete("Pod", "default", "pod-1-1")
    evs = _events(api, f"/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={rv}&labelSelector=app%3Dpod-1-1")
    assert [t for t, _, _ in evs] == ["DELETED", "ADDED", "MODIFIED", "DELETED"]
    assert [int(v) for _, _, v in evs] == [rv + 1, rv + 3, rv + 4, rv + 5]   # each at its own version
    every = _events(api, f"/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={rv}")
    assert [t for t, _, _ in every] == ["MODIFIED"] * 4 + ["DELETED"]


def test_410_for_a_compacted_resource_version(api):
    rv = api.resource_version
    api.relabel("Pod", "default", "pod-1-1", tier="x")
    api.expire()
    code, ctype, body = _request(api, f"/api/v1/pods?watch=1&resourceVersion={rv}")
    ev = json.loads(body.decode().splitlines()[0])
    assert (code, ev["type"], ev["object"]["code"], ev["object"]["reason"]) == (200, "ERROR", 410, "Expired")
    api.expire(gone="status")
    code, doc = _json(api, f"/api/v1/pods?watch=1&resourceVersion={rv}")
    assert (code, doc["reason"]) == (410, "Expired") and "too old resource version" in doc["message"]
    assert api.gone == ["watch-event", "watch-status"]
    now = api.resource_version       # up to date: no 410
    assert _events(api, f"/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={now}") == []


# -- exec

def _exec(api: FakeApi, kubeconfig: Path, command: list[str], **flags):
    from kubernetes import client, config
    from kubernetes.stream import stream

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    core = client.CoreV1Api(client.ApiClient(cfg))
    try:
        ws = stream(core.connect_get_namespaced_pod_exec, "pod-1-1", "default", command=command,
                    _preload_content=False, **flags)
        ws.run_forever(timeout=20)
        return ws.read_stdout(timeout=0), ws.read_stderr(timeout=0), ws.returncode
    finally:
        core.api_client.close()


def test_exec_honours_the_stream_flags(api, tmp_path):
    kc = api.write_kubeconfig(tmp_path / "kc")
    cmd = ["sh", "-c", "echo out; echo err >&2"]
    assert _exec(api, kc, cmd, stdin=False, stdout=True, stderr=True, tty=False) == ("out\n", "err\n", 0)
    assert _exec(api, kc, cmd, stdin=False, stdout=False, stderr=True, tty=False) == ("", "err\n", 0)
    assert _exec(api, kc, cmd, stdin=False, stdout=True, stderr=True, tty=True) == ("out\nerr\n", "", 0)
    assert _exec(api, kc, ["cat"], stdin=False, stdout=True, stderr=False, tty=False) == ("", "", 0)
    assert [(e["stdin"], e["stdout"], e["stderr"], e["tty"], e["container"]) for e in api.execs] == [
        (False, True, True, False, "responder"), (False, False, True, False, "responder"),
        (False, True, False, True, "responder"), (False, True, False, False, "responder")]


def test_exec_into_an_unknown_container_is_400(api, tmp_path):
    from kubernetes.client.exceptions import ApiException

    kc = api.write_kubeconfig(tmp_path / "kc")
    with pytest.raises(ApiException) as e:
        _exec(api, kc, ["cat"], container="nope", stdin=False, stdout=True, stderr=True, tty=False)
    assert "400" in str(e.value)
    code, doc = _json(api, "/api/v1/namespaces/default/pods/pod-1-1/exec?command=cat&container=nope&stdout=true")
    assert (code, doc["reason"], doc["message"]) == (400, "BadRequest", "container nope is not valid for pod pod-1-1")
    code, doc = _json(api, "/api/v1/namespaces/default/pods/pod-1-1/exec?command=cat")
    assert (code, doc["message"]) == (400, "you must specify at least 1 of stdin, stdout, stderr")
    assert api.execs == []


# -- by hand

def test_the_command_serves_a_lab_until_interrupted(tmp_path):
    from tracer.cluster import api as kube, fetch

    kc = tmp_path / "kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeapi", "--lab", PREFIX, "--kubeconfig", str(kc)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""     # the readiness line: the kubeconfig is written
        assert line.startswith(f"serving lab {PREFIX} at https://127.0.0.1:") and str(kc) in line, \
            line + proc.stderr.read()
        conn = kube.connect(str(kc))
        try:
            inv, _ = fetch.inventory_for(conn, ["pod-1-1", "svc/default/web"])
            assert inv.pods["default/pod-1-1"].node == "node-1"
            agents = conn.core.list_namespaced_pod("podtrace", label_selector="app.kubernetes.io/name=podtrace-agent")
            assert sorted(p.spec.node_name for p in agents.items) == ["node-1", "node-2"]
        finally:
            conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out == "stopped\n", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- port-forward (over TLS) and RBAC

@pytest.fixture
def echo_port():
    """A TCP server on 127.0.0.1 answering each connection's bytes upper-cased."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _pod(name: str, ns: str = "default") -> dict:
    """A pod without a lab namespace: its port-forward dials this namespace's 127.0.0.1."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": {"containers": [{"name": "c"}]}, "status": {"phase": "Running"}}


def _core(kubeconfig: Path):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.CoreV1Api(client.ApiClient(cfg))


def test_port_forward_over_tls_relays_both_ways(api, tmp_path, echo_port):
    from kubernetes.stream import portforward

    from tests.conftest import wait_until

    api.add(_pod("echo"))
    core = _core(api.write_kubeconfig(tmp_path / "kc"))
    assert api.url.startswith("https://")
    try:
        pf = portforward(core.connect_get_namespaced_pod_portforward, "echo", "default", ports=str(echo_port))
        s = pf.socket(echo_port)
        s.settimeout(10)
        got = b""
        for chunk in (b"hello ", b"x" * 200_000):    # also more than one TLS record / websocket frame
            s.sendall(chunk)
            while len(got) < len(chunk):
                got += s.recv(1 << 20)
            assert got == chunk.upper()
            got = b""
        s.close()
        assert wait_until(lambda: api.forwards and api.forwards[-1]["closed_by"] == "client", 10), api.forwards
        assert pf.error(echo_port) is None
    finally:
        core.api_client.close()
    (rec,) = api.forwards
    assert (rec["pod"], rec["ports"], rec["protocol"], rec["errors"]) == ("echo", [echo_port], "v4.channel.k8s.io", [])


def test_port_forward_to_a_port_nobody_listens_on_says_so(api, tmp_path):
    import socket

    from kubernetes.stream import portforward

    from tests.conftest import wait_until

    with socket.socket() as probe:       # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api.add(_pod("echo"))
    core = _core(api.write_kubeconfig(tmp_path / "kc"))
    try:
        pf = portforward(core.connect_get_namespaced_pod_portforward, "echo", "default", ports=str(port))
        s = pf.socket(port)
        s.settimeout(10)
        assert s.recv(10) == b""
        assert wait_until(lambda: pf.error(port), 10)
        assert "failed to connect to localhost" in pf.error(port)
    finally:
        core.api_client.close()
    assert api.forwards[-1]["errors"]


def test_rbac_of_the_user_group_answers_a_forbidden_status(api, tmp_path):
    from tests.fakeapi.portforward import token_secret
    from tests.fakeapi.rbac import Rbac

    api.add(token_secret("t" * 32))
    api.add(_pod("agent", "podtrace"))
    api.authorize = Rbac.for_group("podtrace-users")
    code, doc = _json(api, "/api/v1/namespaces/podtrace/secrets/podtrace-agent-token")
    assert (code, doc["kind"], doc["metadata"]["name"]) == (200, "Secret", "podtrace-agent-token")
    assert _json(api, "/api/v1/pods?limit=1")[0] == 200                    # podtrace-reader, cluster-wide
    for method, path, verb, details in [
            ("GET", "/api/v1/namespaces/podtrace/secrets", "list", {"kind": "secrets"}),
            ("GET", "/api/v1/namespaces/podtrace/secrets/other", "get", {"kind": "secrets", "name": "other"}),
            ("GET", "/api/v1/namespaces/podtrace/pods/agent/exec?command=id&stdout=true", "get",
             {"kind": "pods", "name": "agent"}),
            ("PATCH", "/api/v1/namespaces/default/pods/pod-1-1", "patch", {"kind": "pods", "name": "pod-1-1"})]:
        code, doc = _json(api, path, method=method, body=b"{}",
                          headers={"Content-Type": "application/merge-patch+json"})
        assert (code, doc["kind"], doc["status"], doc["reason"], doc["code"]) == \
            (403, "Status", "Failure", "Forbidden", 403), (path, doc)
        assert f"cannot {verb} resource" in doc["message"] and doc["details"] == details, doc
    assert api.execs == []

    def can_i(verb, resource, sub="", ns="podtrace", name=None):
        spec = {"resourceAttributes": {"verb": verb, "resource": resource, "subresource": sub, "namespace": ns,
                                       **({"name": name} if name else {})}}
        code, doc = _json(api, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", method="POST",
                          body=json.dumps({"spec": spec}).encode(), headers={"Content-Type": "application/json"})
        assert code == 201, doc
        return doc["status"]["allowed"]

    assert can_i("create", "pods", "portforward") and can_i("get", "secrets", name="podtrace-agent-token")
    assert not can_i("create", "pods", "exec") and not can_i("list", "secrets")
    assert not can_i("create", "pods", "portforward", ns="default")
