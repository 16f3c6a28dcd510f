"""Live cluster metadata against a fake API server (tests/fakeapi/): list, watch, 410,
errors, targeted fetches. No privileges, no network beyond 127.0.0.1."""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests.conftest import wait_until
from tests.fakeapi import FakeApi
from tracer.cluster import endpoints
from tracer.cluster import inventory
from tracer.cluster import api as kube
from tracer.cluster import fetch, watch
from tracer.errors import BadInput, EnvironmentProblem
from tracer.lab import topology as T

PREFIX = "pttestk8s"
SPECS = ["pod-1-1", "default/pod-2-1", "svc/default/web", "svc/default/echo", "node/node-1",
         "10.244.2.2", "10.96.0.20", "172.30.0.12", "192.0.2.7"]


@pytest.fixture
def api():
    with FakeApi.from_lab(PREFIX) as fake:
        yield fake


@pytest.fixture
def conn(api, tmp_path):
    c = kube.connect(str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    yield c
    c.close()


@pytest.fixture
def source(conn):
    src = watch.ClusterSource(conn, page_size=2, watch_timeout=5, backoff=(0.05, 0.2))
    src.start()
    yield src
    src.stop()
    assert not src.running


def _file_inventory(tmp_path) -> inventory.Inventory:
    doc = T.inventory(T.plan(T.LabConfig(prefix=PREFIX, state_dir=tmp_path)))
    f = tmp_path / "inv.json"
    f.write_text(json.dumps(doc))
    return inventory.load_list(f)


def _new_pod(api: FakeApi, name: str, ip: str, like: str = "pod-1-1", **labels) -> dict:
    obj = api.get("Pod", "default", like)
    obj["metadata"]["name"] = name
    obj["metadata"]["uid"] = f"uid-{name}"
    obj["metadata"]["labels"].update(labels)
    obj["status"]["podIP"] = ip
    obj["status"]["podIPs"] = [{"ip": ip}]
    return obj


def test_initial_list_resolves_like_the_cluster_file(source, tmp_path):
    fileinv = _file_inventory(tmp_path)
    for spec in SPECS:
        assert source.resolve(spec).as_json() == endpoints.resolve(spec, fileinv).as_json(), spec
    assert source.resolve("svc/default/web").addresses() == ["10.96.0.10", "10.244.2.3"]
    inv = source.inventory
    assert set(inv.pods) == set(fileinv.pods) and set(inv.nodes) == set(fileinv.nodes)
    assert {k: v.backend_ips for k, v in inv.services.items()} == \
        {k: v.backend_ips for k, v in fileinv.services.items()}
    st = source.stats()
    assert st["pods"] == 4 and all(s["lists"] == 1 for s in st["streams"])


def test_pages_are_followed(api, conn):
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], page_size=1, watch_timeout=5)
    src.start()
    try:
        assert len(src.inventory.pods) == 4
        assert sum("continue=" in r for r in api.requests) == 3
    finally:
        src.stop()


def test_pod_added_during_watch_becomes_resolvable(api, source):
    with pytest.raises(BadInput):
        source.resolve("pod-9-9")
    api.add(_new_pod(api, "pod-9-9", "10.244.1.99"))
    assert source.wait_until(lambda inv: "default/pod-9-9" in inv.pods, 5)
    ep = source.resolve("pod-9-9")
    assert ep.ip == "10.244.1.99" and ep.node.name == "node-1"
    assert source.resolve("10.244.1.99").pod.key == "default/pod-9-9"


def test_deleted_pod_disappears(api, source):
    assert source.resolve("10.244.1.3").pod.key == "default/pod-1-2"
    api.delete("Pod", "default", "pod-1-2")
    assert source.wait_until(lambda inv: "default/pod-1-2" not in inv.pods, 5)
    with pytest.raises(BadInput, match="no pod default/pod-1-2"):
        source.resolve("pod-1-2")
    assert source.resolve("10.244.1.3").pod is None


def test_pod_moves_to_another_node(api, source):
    def move(obj):
        obj["spec"]["nodeName"] = "node-2"
        obj["status"]["podIP"] = "10.244.2.77"
    api.modify("Pod", "default", "pod-1-1", move)
    assert source.wait_until(lambda inv: inv.pods["default/pod-1-1"].node == "node-2", 5)
    assert source.resolve("10.244.2.77").pod.key == "default/pod-1-1"
    assert source.resolve("10.244.1.2").pod is None      # the old address is free


def test_endpointslice_update_changes_backends(api, source):
    def add_backend(sl):
        sl["endpoints"].append({"addresses": ["10.244.1.2"], "conditions": {"ready": True},
                                "targetRef": {"kind": "Pod", "namespace": "default", "name": "pod-1-1"}})
    name = next(n for (k, ns, n) in api._objects if k == "EndpointSlice" and n.startswith("web-"))
    api.modify("EndpointSlice", "default", name, add_backend)
    assert source.wait_until(lambda inv: len(inv.services["default/web"].backend_ips) == 2, 5)
    assert source.resolve("svc/default/web").addresses() == ["10.96.0.10", "10.244.2.3", "10.244.1.2"]


def test_410_as_an_error_event_relists(api, source):
    with api._cond:      # both at once: the watch never sees this DELETED, only 410
        api.delete("Pod", "default", "pod-2-1")
        api.expire()
    assert source.wait_until(lambda inv: "default/pod-2-1" not in inv.pods, 10)
    api.add(_new_pod(api, "pod-after", "10.244.1.50"))
    assert source.wait_until(lambda inv: "default/pod-after" in inv.pods, 10)
    pods = next(s for s in source.stats()["streams"] if s["stream"] == "pods")
    assert pods["expired"] >= 1 and pods["lists"] >= 2 and pods["errors"] == 0
    assert "watch-event" in api.gone and "watch-status" not in api.gone


def test_410_on_the_watch_request_relists(api, conn):
    """The open watch ends and its next request, from a compacted resourceVersion, is
    answered with HTTP 410 (not an event in a stream)."""
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], watch_timeout=5, backoff=(0.05, 0.2))
    src.start()
    try:
        with api._cond:      # the watch never sees this DELETED
            api.delete("Pod", "default", "pod-2-1")
            api.expire(gone="status")
        assert src.wait_until(lambda inv: "default/pod-2-1" not in inv.pods, 10)
        st = src.stats()["streams"][0]
        assert st["expired"] >= 1 and st["lists"] == 2 and st["errors"] == 0
        assert "watch-status" in api.gone and "watch-event" not in api.gone
    finally:
        src.stop()


def test_expire_spares_a_watch_that_is_up_to_date(api, conn):
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], watch_timeout=30, backoff=(0.05, 0.2))
    src.start()
    try:
        api.add(_new_pod(api, "pod-seen", "10.244.1.61"))
        assert src.wait_until(lambda inv: "default/pod-seen" in inv.pods, 10)   # the watch is at the newest RV
        api.expire()
        api.add(_new_pod(api, "pod-x", "10.244.1.60"))
        assert src.wait_until(lambda inv: "default/pod-x" in inv.pods, 10)
        st = src.stats()["streams"][0]
        assert (st["expired"], st["lists"], api.gone) == (0, 1, [])
    finally:
        src.stop()


def test_a_pod_leaving_and_entering_a_label_selector(api, conn):
    """A Service's pods are watched by its selector: a pod relabelled away is DELETED for
    that watch, relabelled back it is ADDED again."""
    inv, streams = fetch.inventory_for(conn, ["svc/default/web"])
    assert kube.Stream("Pod", "default", label_selector="app=pod-2-2") in streams
    with watch.ClusterSource(conn, streams, inventory=inv, watch_timeout=30) as src:
        api.relabel("Pod", "default", "pod-2-2", app="elsewhere")
        assert src.wait_until(lambda i: "default/pod-2-2" not in i.pods, 10)
        assert src.describe_ip("10.244.2.3") is None
        api.relabel("Pod", "default", "pod-2-2", app="pod-2-2")
        assert src.wait_until(lambda i: "default/pod-2-2" in i.pods, 10)
        assert src.describe_ip("10.244.2.3")["key"] == "default/pod-2-2"


def test_a_pod_leaving_one_selector_stays_while_another_stream_has_it(api, conn):
    """The pod is traced by name and is a backend of the Service: leaving the Service's
    selector does not remove it while its own stream still has it."""
    inv, streams = fetch.inventory_for(conn, ["pod-2-2", "svc/default/web"])
    with watch.ClusterSource(conn, streams, inventory=inv, watch_timeout=30) as src:
        by_label = next(st for st in src.states if st.stream.label_selector == "app=pod-2-2")
        by_name = next(st for st in src.states if st.stream.field_selector == "metadata.name=pod-2-2")
        api.relabel("Pod", "default", "pod-2-2", app="elsewhere")
        # the label stream's DELETED changes no inventory (nothing to wake on): poll its keys
        assert wait_until(lambda: "default/pod-2-2" not in by_label.keys and by_name.events >= 1, 10)
        assert "default/pod-2-2" in src.inventory.pods
        api.delete("Pod", "default", "pod-2-2")
        assert src.wait_until(lambda i: "default/pod-2-2" not in i.pods, 10)


def _all_pods(api: FakeApi) -> set[str]:
    return {f"{ns}/{name}" for (kind, ns, name) in api._objects if kind == "Pod"}


def test_pages_come_from_one_snapshot(api, conn):
    """A pod deleted between two pages is still in the list (its snapshot), and the watch
    from the list's resourceVersion then deletes it: no other pod is skipped."""
    everyone = _all_pods(api)
    calls = []

    def delete_once():
        if not calls:
            calls.append(1)
            api.delete("Pod", "default", "pod-1-2")
    api.on_continue = delete_once
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], page_size=1, watch_timeout=30)
    src.start()
    try:
        assert set(src.inventory.pods) == everyone and calls
        assert src.wait_until(lambda inv: set(inv.pods) == everyone - {"default/pod-1-2"}, 10)
    finally:
        src.stop()


def test_an_expired_continue_token_starts_the_list_again(api, conn):
    everyone = _all_pods(api)
    calls = []

    def expire_once():
        if not calls:
            calls.append(1)
            api.expire()
    api.on_continue = expire_once
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], page_size=1, watch_timeout=30)
    src.start()
    try:
        assert api.gone == ["continue"]
        assert set(src.inventory.pods) == everyone
        assert src.stats()["streams"][0]["lists"] == 1
    finally:
        src.stop()


def test_a_targeted_fetch_survives_an_expired_continue_token(api, conn):
    calls = []

    def expire_once():
        if not calls:
            calls.append(1)
            api.expire()
    api.on_continue = expire_once
    got = [it["metadata"]["name"] for it in fetch._items(conn, kube.Stream("Pod"), "list pods", page=1)]
    assert api.gone == ["continue"]
    assert sorted(got) == sorted(n.split("/")[1] for n in _all_pods(api))


def test_a_wrong_certificate_authority_is_one_line(api, tmp_path):
    from tests.fakeapi import tls

    cfg = api.write_kubeconfig(tmp_path / "kc", ca_pem=tls.authority("another-ca").ca_pem)
    with pytest.raises(EnvironmentProblem) as e:
        kube.connect(str(cfg))
    line = e.value.line()
    assert line.startswith(f"TLS with the Kubernetes API server {api.url} (kubeconfig ") and \
        "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "\n" not in line and e.value.exit_code == 1


def test_a_field_selector_the_server_refuses_is_one_line(conn):
    src = watch.ClusterSource(conn, [kube.Stream("Pod", field_selector="spec.bogus=x")])
    with pytest.raises(EnvironmentProblem) as e:
        src.start()
    assert "answered 400 to list pods [spec.bogus=x]: field label not supported: spec.bogus" in e.value.line()


def test_bookmark_moves_the_resource_version(api, source):
    before = {s["stream"]: s["resource_version"] for s in source.stats()["streams"]}
    api.add(_new_pod(api, "pod-b", "10.244.1.70"))      # advance the server's RV
    source.wait_until(lambda inv: "default/pod-b" in inv.pods, 5)
    api.bookmark()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        nodes = next(s for s in source.stats()["streams"] if s["stream"] == "nodes")
        if nodes["bookmarks"]:
            break
        time.sleep(0.02)
    assert nodes["bookmarks"] >= 1
    assert int(nodes["resource_version"]) > int(before["nodes"])


def test_watch_survives_timeouts_and_stop_is_quick(api, conn):
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], watch_timeout=1)
    src.start()
    # the server closed the first watch: reconnected from the RV (a second watch request)
    assert wait_until(lambda: sum("watch=" in r for r in api.requests) >= 2, 10), api.requests
    api.add(_new_pod(api, "pod-late", "10.244.1.80"))
    assert src.wait_until(lambda inv: "default/pod-late" in inv.pods, 5)
    assert src.stats()["streams"][0]["lists"] == 1
    t = time.monotonic()
    src.stop()
    assert time.monotonic() - t < 2 and not src.running


def test_api_server_down_one_clear_error(api, tmp_path):
    cfg = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.stop()
    with pytest.raises(EnvironmentProblem) as e:
        kube.connect(str(cfg))
    line = e.value.line()
    assert "cannot reach the Kubernetes API server" in line and "connection refused" in line
    assert "\n" not in line and e.value.exit_code == 1


def test_api_server_dies_during_watch(api, conn):
    src = watch.ClusterSource(conn, [kube.Stream("Pod")], watch_timeout=5, backoff=(0.05, 0.1))
    src.start()
    api.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not src.stats()["streams"][0]["errors"]:
        time.sleep(0.02)
    st = src.stats()["streams"][0]
    assert st["errors"] >= 1 and "cannot reach" in st["last_error"]
    assert len(src.inventory.pods) == 4       # the last known state stays usable
    src.stop()
    assert not src.running


@pytest.mark.parametrize("case,needle,exc", [
    ("401", "rejected the credentials (401 Unauthorized)", EnvironmentProblem),
    ("403", "(403 Forbidden)", EnvironmentProblem),
    ("context", "no context 'fak' in kubeconfig", BadInput),
    ("missing", "does not exist", BadInput),
    ("yaml", "is unusable", EnvironmentProblem),
    ("nocurrent", "has no current-context", EnvironmentProblem),
])
def test_configuration_and_auth_errors(tmp_path, case, needle, exc):
    with FakeApi.from_lab(PREFIX, token="right") as api:
        path, context = api.write_kubeconfig(tmp_path / "kc", token="right"), None
        if case == "401":
            path = api.write_kubeconfig(tmp_path / "kc", token="wrong")
        elif case == "403":
            api.forbidden.add("Pod")
        elif case == "context":
            context = "fak"
        elif case == "missing":
            path = tmp_path / "nope"
        elif case == "yaml":
            path.write_text("{{{ not yaml")
        elif case == "nocurrent":
            doc = json.loads(path.read_text())
            del doc["current-context"]
            path.write_text(json.dumps(doc))
        with pytest.raises(exc) as e:
            kube.connect(str(path), context)
    assert needle in e.value.line() and "\n" not in e.value.line()
    if case == "context":
        assert "did you mean fake?" in e.value.line() and e.value.exit_code == 2


def test_find_config_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(kube, "DEFAULT_KUBECONFIG", tmp_path / "home-config")
    monkeypatch.setattr(kube, "IN_CLUSTER_TOKEN", tmp_path / "token")
    assert kube.find_config(environ={}) is None
    (tmp_path / "home-config").write_text("{}")
    assert kube.find_config(environ={}).path == str(tmp_path / "home-config")
    (tmp_path / "env-config").write_text("{}")
    env = {"KUBECONFIG": f"{tmp_path / 'missing'}:{tmp_path / 'env-config'}"}
    assert kube.find_config(environ=env).path == env["KUBECONFIG"]
    assert kube.find_config("/x/explicit", "ctx", environ=env) == kube.ConfigRef("kubeconfig", "/x/explicit", "ctx")
    (tmp_path / "home-config").unlink()
    (tmp_path / "token").write_text("t")
    incluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert kube.find_config(environ=incluster).kind == "in-cluster"
    with pytest.raises(BadInput, match="--context"):
        kube.find_config(context="prod", environ=incluster)


def test_connect_needs_some_configuration(monkeypatch, tmp_path):
    monkeypatch.setattr(kube, "DEFAULT_KUBECONFIG", tmp_path / "none")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(EnvironmentProblem, match="no Kubernetes configuration"):
        kube.connect()


# ---------------------------------------------------------------------------------------
# Targeted fetches: no full list per trace

def _unfiltered_lists(api: FakeApi) -> list[str]:
    out = []
    for r in api.requests:
        path, _, query = r.partition("?")
        if path.endswith(("/pods", "/services", "/endpointslices", "/nodes")) and \
                "Selector=" not in query:
            out.append(r)
    return out


def test_inventory_for_fetches_only_what_is_traced(api, conn, tmp_path):
    for i in range(30):     # noise that a trace of two pods must not load
        api.add(_new_pod(api, f"noise-{i}", f"10.244.3.{i + 2}"))
    api.requests.clear()
    inv, streams = fetch.inventory_for(conn, ["pod-1-1", "svc/default/web"])
    assert set(inv.pods) == {"default/pod-1-1", "default/pod-2-2"}
    assert set(inv.services) == {"default/web"} and set(inv.nodes) == {"node-1", "node-2"}
    assert _unfiltered_lists(api) == []
    fileinv = _file_inventory(tmp_path)
    for spec in ("pod-1-1", "svc/default/web"):
        assert endpoints.resolve(spec, inv).as_json() == endpoints.resolve(spec, fileinv).as_json()
    assert kube.Stream("Pod", "default", field_selector="metadata.name=pod-1-1") in streams
    assert kube.Stream("EndpointSlice", "default", label_selector="kubernetes.io/service-name=web") in streams
    assert kube.Stream("Pod", "default", label_selector="app=pod-2-2") in streams


def test_targeted_streams_follow_a_rollout(api, conn):
    inv, streams = fetch.inventory_for(conn, ["svc/default/web"])
    src = watch.ClusterSource(conn, streams, inventory=inv, watch_timeout=5)
    src.start()
    try:
        # A new backend pod comes up with the Service's labels, the slice moves to it.
        api.add(_new_pod(api, "pod-2-2-v2", "10.244.2.42", like="pod-2-2"))
        name = next(n for (k, ns, n) in api._objects if k == "EndpointSlice" and n.startswith("web-"))

        def move(sl):
            sl["endpoints"] = [{"addresses": ["10.244.2.42"], "conditions": {"ready": True},
                                "targetRef": {"kind": "Pod", "namespace": "default", "name": "pod-2-2-v2"}}]
        api.modify("EndpointSlice", "default", name, move)
        api.delete("Pod", "default", "pod-2-2")
        assert src.wait_until(lambda i: i.services["default/web"].backends == ["default/pod-2-2-v2"]
                              and "default/pod-2-2" not in i.pods, 5)
        assert src.describe_ip("10.244.2.42")["key"] == "default/pod-2-2-v2"
        assert "default/pod-1-1" not in src.inventory.pods       # never asked for
    finally:
        src.stop()


def test_targeted_pod_moving_to_an_unknown_node(api, conn):
    inv, streams = fetch.inventory_for(conn, ["pod-1-1"])
    assert set(inv.nodes) == {"node-1"}
    with watch.ClusterSource(conn, streams, inventory=inv, watch_timeout=5) as src:
        api.modify("Pod", "default", "pod-1-1", lambda o: o["spec"].update(nodeName="node-2"))
        assert src.wait_until(lambda i: "node-2" in i.nodes, 5)
        assert src.resolve("pod-1-1").node.ip == "172.30.0.12"


def test_kubectl_plugin_entry_point():
    import subprocess
    import sys

    code = "import sys; sys.argv = ['kubectl-hoptrace', '--help']; from tracer.cli.main import kubectl_plugin; kubectl_plugin()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("Usage: kubectl hoptrace ")


def test_inventory_for_addresses(api, conn):
    inv, _ = fetch.inventory_for(conn, ["10.244.2.2", "10.96.0.10", "172.30.0.11", "192.0.2.1"])
    assert endpoints.resolve("10.244.2.2", inv).pod.key == "default/pod-2-1"
    assert endpoints.resolve("10.96.0.10", inv).service.backend_ips == ["10.244.2.3"]
    assert endpoints.resolve("172.30.0.11", inv).node.name == "node-1"
    assert endpoints.resolve("192.0.2.1", inv).pod is None


def test_inventory_for_without_cluster_ip_field_selector(tmp_path):
    with FakeApi.from_lab(PREFIX, supports_cluster_ip_selector=False) as api:
        conn = kube.connect(str(api.write_kubeconfig(tmp_path / "kc")))
        inv, _ = fetch.inventory_for(conn, ["10.96.0.10"])
        assert endpoints.resolve("10.96.0.10", inv).service.key == "default/web"


@pytest.mark.parametrize("spec,needle", [
    ("pod-1-9", "no pod default/pod-1-9; did you mean default/pod-1-"),
    ("svc/default/wbe", "no Service default/wbe; did you mean svc/default/web"),
    ("node/node-9", "no node node-9; did you mean node/node-"),
])
def test_inventory_for_unknown_names(conn, spec, needle):
    with pytest.raises(BadInput) as e:
        fetch.inventory_for(conn, [spec])
    assert needle in e.value.line()


def test_owner_references_through_the_api(api, conn):
    obj = _new_pod(api, "web-7d9f8b6c5d-x2x4z", "10.244.1.91", **{"pod-template-hash": "7d9f8b6c5d"})
    obj["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                           "name": "web-7d9f8b6c5d", "uid": "u", "controller": True}]
    api.add(obj)
    inv, _ = fetch.inventory_for(conn, ["web-7d9f8b6c5d-x2x4z"])
    pod = inv.pods["default/web-7d9f8b6c5d-x2x4z"]
    assert (pod.owner_kind, pod.owner_name, pod.workload) == ("ReplicaSet", "web-7d9f8b6c5d", "Deployment/web")
    assert inv.describe_ip("10.244.1.91") == {"kind": "pod", "key": "default/web-7d9f8b6c5d-x2x4z",
                                               "node": "node-1", "workload": "Deployment/web"}


def test_streams_describe_and_validate():
    assert kube.Stream("Pod", "ns", "spec.nodeName=n1", "app=x").describe() == "pods in ns [spec.nodeName=n1] {app=x}"
    assert kube.node_streams("n1")[1] == kube.Stream("Pod", field_selector="spec.nodeName=n1")
    with pytest.raises(ValueError):
        kube.Stream("Secret")


def test_models_deserialize_what_the_fake_serves(api):
    """The fake's objects are what the official client's models accept."""
    from kubernetes import client

    c = client.ApiClient()
    for (kind, _, _), obj in api._objects.items():
        model = {"Pod": "V1Pod", "Node": "V1Node", "Service": "V1Service",
                 "EndpointSlice": "V1EndpointSlice"}[kind]
        assert c._ApiClient__deserialize(copy.deepcopy(obj), model) is not None
