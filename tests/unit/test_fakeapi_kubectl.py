"""Conformance: a client nobody here wrote — the real `kubectl` — against the test API server.

Where kubectl is not installed these tests skip and say so; where it is installed they run,
and in CI (CI=true) a kubectl that is there but cannot run fails them rather than skipping.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading

import pytest

from tests.conftest import must_run
from tests.fakeapi import FakeApi, agent_pods
from tracer.cluster import endpoints, inventory

PREFIX = "pttestkctl"
TIMEOUT = 60


def _find_kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed on this machine: the conformance tests need it")
    try:
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=TIMEOUT)
        ok = out.returncode == 0 and "clientVersion" in json.loads(out.stdout or "{}")
        why = out.stderr.strip()[:300]
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        ok, why = False, str(exc)
    if not ok:
        msg = f"kubectl at {path} does not run: {why}"
        if must_run():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def kubectl_bin():
    return _find_kubectl()


@pytest.fixture
def api():
    with FakeApi.from_lab(PREFIX) as fake:
        for pod in agent_pods(PREFIX):
            fake.add(pod)
        fake.exec_runner = lambda ns, pod, container, command: command if command[0] in ("sh", "cat") else None
        yield fake


@pytest.fixture
def kubectl(api, kubectl_bin, tmp_path):
    kc = api.write_kubeconfig(tmp_path / "kubeconfig")
    env = dict(os.environ, KUBECONFIG=str(kc), HOME=str(tmp_path))

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([kubectl_bin, "--cache-dir", str(tmp_path / "cache"), *args], input=input,
                             capture_output=True, text=True, env=env, timeout=TIMEOUT)
        if check:
            assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out

    run.argv = [kubectl_bin, "--cache-dir", str(tmp_path / "cache")]
    run.env = env
    return run


def _names(doc: dict) -> list[str]:
    return sorted(f"{i['metadata'].get('namespace', '')}/{i['metadata']['name']}".lstrip("/") for i in doc["items"])


def _stored(api: FakeApi, kind: str) -> list[str]:
    return sorted(f"{ns}/{name}".lstrip("/") for (k, ns, name) in api._objects if k == kind)


def test_get_all_namespaces_as_json(api, kubectl, tmp_path):
    doc = json.loads(kubectl("get", "nodes,pods,services,endpointslices", "-A", "-o", "json").stdout)
    kinds = {}
    for it in doc["items"]:
        kinds.setdefault(it["kind"], []).append(it)
    assert sorted(kinds) == ["EndpointSlice", "Node", "Pod", "Service"]
    for kind, items in kinds.items():
        assert _names({"items": items}) == _stored(api, kind)
    # What kubectl printed is a cluster file podtrace reads (`flow --cluster FILE`).
    f = tmp_path / "cluster.json"
    f.write_text(json.dumps(doc))
    inv = inventory.load_list(f)
    assert endpoints.resolve("svc/default/web", inv).addresses() == ["10.96.0.10", "10.244.2.3"]


def test_label_selectors(api, kubectl):
    get = lambda sel: _names(json.loads(kubectl("get", "pods", "-A", "-l", sel, "-o", "json").stdout))
    assert get("app=pod-1-1") == ["default/pod-1-1"]
    assert get("app in (pod-1-1,pod-2-2)") == ["default/pod-1-1", "default/pod-2-2"]
    assert get("app,app notin (pod-1-1)") == ["default/pod-1-2", "default/pod-2-1", "default/pod-2-2"]
    assert get("!app") == sorted(f"podtrace/{p['metadata']['name']}" for p in agent_pods(PREFIX))


def test_field_selectors(api, kubectl):
    doc = json.loads(kubectl("get", "pods", "-A", "--field-selector", "spec.nodeName=node-1", "-o", "json").stdout)
    assert _names(doc) == ["default/pod-1-1", "default/pod-1-2", f"podtrace/{agent_pods(PREFIX)[0]['metadata']['name']}"]
    bad = kubectl("get", "pods", "--field-selector", "spec.bogus=x", check=False)
    assert bad.returncode != 0 and "field label not supported: spec.bogus" in bad.stderr


def test_chunked_lists_come_from_one_snapshot(api, kubectl):
    deleted = []

    def delete_once():
        if not deleted:
            deleted.append("default/pod-1-2")
            api.delete("Pod", "default", "pod-1-2")
    everyone = _stored(api, "Pod")
    api.on_continue = delete_once
    api.requests.clear()
    doc = json.loads(kubectl("get", "pods", "-A", "--chunk-size=1", "-o", "json").stdout)
    assert _names(doc) == everyone and deleted            # the pod deleted between pages is listed
    assert sum("continue=" in r for r in api.requests) == len(everyone) - 1
    assert all("limit=1" in r for r in api.requests if r.startswith("GET /api/v1/pods"))


class _Watch:
    """`kubectl get … -w` in the background: its output, line by line, as it comes."""

    def __init__(self, kubectl, *args: str):
        self.proc = subprocess.Popen([*kubectl.argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=kubectl.env)
        self.lines: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self) -> str:
        got = self.lines.get(timeout=TIMEOUT)
        assert got is not None, self.proc.stderr.read()
        return got

    def json(self) -> dict:     # one JSON document per event (one line each, or indented)
        buf = ""
        while True:
            buf += self.line()
            try:
                return json.loads(buf)
            except ValueError:
                continue

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(TIMEOUT)
        self.thread.join(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_watch_follows_a_relabel(api, kubectl):
    """`get -w -l`: the pod relabelled away is DELETED, relabelled back ADDED."""
    w = _Watch(kubectl, "get", "pods", "-l", "app=pod-1-1", "-w", "--output-watch-events", "-o", "json")

    def event() -> tuple[str, str, dict]:
        ev = w.json()
        return ev["type"], ev["object"]["metadata"]["name"], ev["object"]["metadata"].get("labels") or {}
    try:
        assert event()[:2] == ("ADDED", "pod-1-1")        # the list
        api.relabel("Pod", "default", "pod-1-1", app="elsewhere")
        typ, name, labels = event()
        assert (typ, name, labels["app"]) == ("DELETED", "pod-1-1", "pod-1-1")   # as it was when it left
        api.relabel("Pod", "default", "pod-1-1", app="pod-1-1")
        assert event()[:2] == ("ADDED", "pod-1-1")
    finally:
        w.close()


def test_tables_as_kubectl_prints_them(api, kubectl):
    """Without -o, kubectl asks the server for Tables, lists and watches alike."""
    lines = kubectl("get", "pods", "-A", "-o", "wide").stdout.splitlines()
    assert lines[0].split()[:6] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    row = next(line.split() for line in lines if " pod-1-1 " in line)
    assert row[:5] == ["default", "pod-1-1", "1/1", "Running", "0"] and row[6:8] == ["10.244.1.2", "node-1"]
    svc = kubectl("get", "service", "web").stdout.splitlines()
    assert svc[1].split()[:5] == ["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP,80/UDP"]
    w = _Watch(kubectl, "get", "pods", "-l", "app=pod-1-1", "-w", "--output-watch-events")
    try:
        assert w.line().split()[:2] == ["EVENT", "NAME"]
        assert w.line().split()[:4] == ["ADDED", "pod-1-1", "1/1", "Running"]
        kubectl("label", "pod", "pod-1-1", "app=elsewhere", "--overwrite")     # a merge patch
        assert w.line().split()[:2] == ["DELETED", "pod-1-1"]
        kubectl("label", "pod", "pod-1-1", "app=pod-1-1", "--overwrite")
        assert w.line().split()[:2] == ["ADDED", "pod-1-1"]
    finally:
        w.close()
    assert api.get("Pod", "default", "pod-1-1")["metadata"]["labels"]["app"] == "pod-1-1"


def test_exec(api, kubectl):
    assert kubectl("exec", "-i", "pod-1-1", "--", "cat", input="hello\n").stdout == "hello\n"
    out = kubectl("exec", "pod-1-1", "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (out.returncode, out.stdout) == (3, "out\n") and out.stderr.startswith("err\n")
    bad = kubectl("exec", "pod-1-1", "-c", "nope", "--", "cat", check=False)
    assert bad.returncode != 0 and "container nope is not valid for pod pod-1-1" in bad.stderr
    assert [(e["command"], e["stdin"], e["container"], e["exit_code"]) for e in api.execs] == [
        (["cat"], True, "responder", 0), (["sh", "-c", "echo out; echo err >&2; exit 3"], False, "responder", 3)]


def test_describe_and_errors_kubectl_understands(api, kubectl):
    out = kubectl("describe", "pod", "pod-1-1").stdout
    assert "Name:             pod-1-1" in out and "Node:             node-1/172.30.0.11" in out
    assert "Endpoints:         10.244.2.3:8080" in kubectl("describe", "service", "web").stdout
    node = kubectl("describe", "node", "node-1").stdout
    assert "Non-terminated Pods:          (3 in total)" in node and "-9223372036854775808" not in node
    missing = kubectl("get", "pod", "nope", check=False)
    assert missing.returncode != 0 and 'Error from server (NotFound): pods "nope" not found' in missing.stderr
    assert kubectl("auth", "can-i", "create", "pods", "--subresource=exec", "-n", "podtrace").stdout == "yes\n"
    api.forbidden.add("pods/exec")
    no = kubectl("auth", "can-i", "create", "pods", "--subresource=exec", "-n", "podtrace", check=False)
    assert (no.returncode, no.stdout.split()[0]) == (1, "no")
    unknown = kubectl("get", "--raw", "/apis/apps/v1/deployments", check=False)
    assert unknown.returncode != 0 and "Error from server (NotFound)" in unknown.stderr   # a Status, not a page
    delete = kubectl("delete", "pod", "pod-1-1", check=False)
    assert delete.returncode != 0 and "Error from server (MethodNotAllowed)" in delete.stderr
