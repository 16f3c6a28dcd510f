"""Endpoint resolution from a Kubernetes v1 List (no privileges)."""

import json

import pytest

from tracer.cluster import inventory as k8s
from tracer.errors import BadInput
from tracer.lab import topology as T


@pytest.fixture
def inv(tmp_path):
    doc = T.inventory(T.plan(T.LabConfig(prefix="ptunit")))
    f = tmp_path / "inv.json"
    f.write_text(json.dumps(doc))
    return k8s.load_list(f)


def test_forms(inv):
    assert k8s.resolve("pod-1-1", inv).ip == "10.244.1.2"
    assert k8s.resolve("default/pod-2-1", inv).pod.node == "node-2"
    svc = k8s.resolve("svc/default/web", inv)
    assert svc.ip == "10.96.0.10" and svc.service.backend_ips == ["10.244.2.3"]
    assert svc.addresses() == ["10.96.0.10", "10.244.2.3"]
    assert k8s.resolve("node/node-1", inv).ip == "172.30.0.11"
    assert k8s.resolve("10.244.2.2", inv).pod.key == "default/pod-2-1"
    assert k8s.resolve("10.96.0.20", inv).service.key == "default/echo"
    assert k8s.resolve("192.0.2.7", inv).pod is None


@pytest.mark.parametrize("spec,needle", [
    ("pod-1-9", "did you mean"), ("default/nope", "no pod"), ("svc/default/wbe", "did you mean default/web"),
    ("node/node-9", "no node"), ("a/b/c/d", "cannot parse"), ("", "empty"), ("999.1.1.1", "not a valid IPv4 address"),
])
def test_bad_specs(inv, spec, needle):
    with pytest.raises(BadInput) as e:
        k8s.resolve(spec, inv)
    assert needle in e.value.line()
    assert "\n" not in e.value.line()


def test_bad_files(tmp_path):
    with pytest.raises(BadInput):
        k8s.load_list(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BadInput):
        k8s.load_list(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"kind": "Pod"}')
    with pytest.raises(BadInput):
        k8s.load_list(tmp_path / "y.json")
