"""manifests/: every object is what the official client's models accept (strictly: a round
trip through the model loses no field, so a misspelt key fails), and the security settings
are exactly the least-privilege ones documented in the files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes import client

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
MODELS = {
    "Namespace": "V1Namespace", "ServiceAccount": "V1ServiceAccount", "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding", "Role": "V1Role", "RoleBinding": "V1RoleBinding",
    "DaemonSet": "V1DaemonSet",
}
READ = ["get", "list", "watch"]
CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "NET_RAW"}


def _docs() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(MANIFESTS.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


DOCS = _docs()


def _by(kind: str, name: str) -> dict:
    return next(d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def _drop_none(x):
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


@pytest.mark.parametrize("fname,doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_every_manifest_deserializes_into_the_official_models(fname, doc):
    api = client.ApiClient()
    model = api._ApiClient__deserialize(copy.deepcopy(doc), MODELS[doc["kind"]])
    assert model is not None and model.metadata.name == doc["metadata"]["name"]
    assert _drop_none(api.sanitize_for_serialization(model)) == doc, "a field the model does not know"


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {f.name for f in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files
    assert k["namespace"] == "podtrace"
    assert (MANIFESTS / "Dockerfile").exists()


def test_namespaced_objects_live_in_podtrace():
    for _, d in DOCS:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "DaemonSet"):
            assert d["metadata"]["namespace"] == "podtrace", d["metadata"]["name"]
    assert _by("Namespace", "podtrace")


def _rules(kind: str, name: str) -> set[tuple[str, str, tuple]]:
    out = set()
    for r in _by(kind, name)["rules"]:
        assert "resourceNames" not in r and "nonResourceURLs" not in r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.add((g, res, tuple(r["verbs"])))
    return out


def test_agent_cluster_role_is_read_only_on_four_kinds():
    want = {("", "pods", tuple(READ)), ("", "nodes", tuple(READ)), ("", "services", tuple(READ)),
            ("discovery.k8s.io", "endpointslices", tuple(READ))}
    assert _rules("ClusterRole", "podtrace-agent") == want
    assert _rules("ClusterRole", "podtrace-reader") == want


def test_user_role_execs_into_the_agent_namespace_only():
    role = _by("Role", "podtrace-user")
    assert role["metadata"]["namespace"] == "podtrace"
    assert _rules("Role", "podtrace-user") == {("", "pods", ("get", "list")), ("", "pods/exec", ("get", "create"))}


def test_no_secrets_no_wildcards_no_exec_for_the_agent():
    for _, d in DOCS:
        for r in d.get("rules") or []:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
            assert not {"secrets", "configmaps", "serviceaccounts/token"} & set(r["resources"])
            assert not {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind",
                        "impersonate"} & set(r["verbs"]) or d["kind"] == "Role"
    agent = {res for _, res, _ in _rules("ClusterRole", "podtrace-agent")}
    assert not any(res.endswith(("/exec", "/attach", "/portforward", "/proxy")) for res in agent)


def test_bindings_point_at_the_right_subjects():
    crb = _by("ClusterRoleBinding", "podtrace-agent")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podtrace-agent"}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "podtrace-agent", "namespace": "podtrace"}]
    rb = _by("RoleBinding", "podtrace-user")
    assert rb["roleRef"]["kind"] == "Role" and rb["roleRef"]["name"] == "podtrace-user"
    assert _by("ServiceAccount", "podtrace-agent")


def _agent() -> dict:
    return _by("DaemonSet", "podtrace-agent")


def test_daemonset_shape():
    ds = _agent()
    label = {"app.kubernetes.io/name": "podtrace-agent"}
    assert ds["spec"]["selector"]["matchLabels"] == label
    pod = ds["spec"]["template"]
    assert label.items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["serviceAccountName"] == "podtrace-agent"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    (c,) = spec["containers"]
    assert c["command"] == ["podtrace", "agent", "--serve"]
    r = c["resources"]
    assert set(r["requests"]) == {"cpu", "memory"} and set(r["limits"]) == {"cpu", "memory"}
    assert not spec.get("initContainers")


def test_daemonset_security_context():
    c = _agent()["spec"]["template"]["spec"]["containers"][0]
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS and len(sc["capabilities"]["add"]) == len(CAPS)
    for _, d in DOCS:     # nothing anywhere asks for privileged
        assert "privileged: true" not in yaml.safe_dump(d)


def test_daemonset_host_mounts():
    spec = _agent()["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert set(vols) == set(mounts)
    host = {v["hostPath"]["path"]: mounts[n] for n, v in vols.items() if "hostPath" in v}
    assert set(host) == {"/sys/kernel/debug", "/sys/kernel/tracing", "/sys/fs/bpf", "/lib/modules",
                         "/usr/src", "/run/netns", "/proc"}
    assert all(m.get("readOnly") is True for m in host.values()), "every host path is read-only"
    assert host["/run/netns"]["mountPropagation"] == "HostToContainer"
    # The only writable places are memory-backed emptyDirs.
    for n, m in mounts.items():
        if not m.get("readOnly"):
            assert "emptyDir" in vols[n], n
    assert not any(v["hostPath"]["path"].endswith(".sock") for v in vols.values() if "hostPath" in v)
