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


def _rules(kind: str, name: str) -> set[tuple]:
    """(group, resource, verbs) of each rule; (group, resource, verbs, names) with resourceNames."""
    out = set()
    for r in _by(kind, name)["rules"]:
        assert "nonResourceURLs" not in r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.add((g, res, tuple(r["verbs"])) + ((tuple(r["resourceNames"]),) if "resourceNames" in r else ()))
    return out


def test_agent_cluster_role_is_read_only_on_four_kinds():
    want = {("", "pods", tuple(READ)), ("", "nodes", tuple(READ)), ("", "services", tuple(READ)),
            ("discovery.k8s.io", "endpointslices", tuple(READ))}
    assert _rules("ClusterRole", "podtrace-agent") == want
    assert _rules("ClusterRole", "podtrace-reader") == want


def test_user_role_port_forwards_to_the_agents_and_reads_their_token_only():
    role = _by("Role", "podtrace-user")
    assert role["metadata"]["namespace"] == "podtrace"
    assert _rules("Role", "podtrace-user") == {
        ("", "pods", ("get", "list")), ("", "pods/portforward", ("get", "create")),
        ("", "secrets", ("get",), ("podtrace-agent-token",))}
    assert not any(res.endswith(("/exec", "/attach", "/proxy", "/ephemeralcontainers"))
                   for _, res, *_ in _rules("Role", "podtrace-user"))


def test_exec_is_a_separate_role_bound_to_nobody():
    assert _rules("Role", "podtrace-exec") == {("", "pods", ("get", "list")), ("", "pods/exec", ("get", "create"))}
    for _, d in DOCS:
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert d["roleRef"]["name"] != "podtrace-exec", d["metadata"]["name"]


def test_no_secrets_no_wildcards_no_exec_for_the_agent():
    for _, d in DOCS:
        for r in d.get("rules") or []:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
            assert not {"configmaps", "serviceaccounts/token"} & set(r["resources"])
            if "secrets" in r["resources"]:   # the token Secret, by name, read only, for the user only
                assert d["metadata"]["name"] == "podtrace-user" and r["resources"] == ["secrets"]
                assert r["resourceNames"] == ["podtrace-agent-token"] and r["verbs"] == ["get"]
            assert not {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind",
                        "impersonate"} & set(r["verbs"]) or d["kind"] == "Role"
    agent = {res for _, res, *_ in _rules("ClusterRole", "podtrace-agent")}
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
    # its defaults: 127.0.0.1:7463 (the port `flow` reads from this annotation) and the token's mount
    assert pod["metadata"]["annotations"] == {"podtrace.io/agent-port": "7463"}
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
    # The agent's token: the Secret, read-only, readable by the agent's user alone.
    secrets = {n: v["secret"] for n, v in vols.items() if "secret" in v}
    assert secrets == {"agent-token": {"secretName": "podtrace-agent-token", "defaultMode": 0o400,
                                       "items": [{"key": "token", "path": "token"}]}}
    assert mounts["agent-token"]["readOnly"] is True
    assert mounts["agent-token"]["mountPath"] == "/var/run/secrets/podtrace"
    assert not any(v["hostPath"]["path"].endswith(".sock") for v in vols.values() if "hostPath" in v)


# ---- manifests/Dockerfile, through the interpreter scripts/image-rootfs.sh builds it with

REPO = MANIFESTS.parent


def _image_rootfs():
    import importlib.util
    import sys

    if "image_rootfs" in sys.modules:
        return sys.modules["image_rootfs"]

    spec = importlib.util.spec_from_file_location("image_rootfs", REPO / "scripts" / "image_rootfs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("image_rootfs", mod)    # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return sys.modules["image_rootfs"]


def test_the_image_interpreter_understands_every_dockerfile_instruction():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "image_rootfs.py"), "check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ir = _image_rootfs()
    instrs = ir.parse((MANIFESTS / "Dockerfile").read_text())
    assert len(r.stdout.splitlines()) == len(instrs) and all(ln.startswith("ok ") for ln in r.stdout.splitlines())
    assert instrs[0].op == "FROM" and instrs[0].args in ir.BASES
    assert {i.op for i in instrs} <= ir.KNOWN


def test_every_dockerfile_copy_source_exists_and_is_not_dockerignored():
    ir = _image_rootfs()
    ignore = ir.Ignore(REPO)
    copies = [i for i in ir.parse((MANIFESTS / "Dockerfile").read_text()) if i.op == "COPY"]
    assert copies
    for i in copies:
        srcs, _ = ir.copy_sources(i, REPO, ignore)      # raises Refused for a missing source
        assert srcs and all(s.exists() for s in srcs)
    # The build context leaves out the venv, git and bytecode, and keeps what the image needs.
    assert ignore.ignored(".venv/bin/python") and ignore.ignored(".git/HEAD")
    assert ignore.ignored("tracer/__pycache__/cli.cpython-311.pyc")
    assert not ignore.ignored("tracer/cli/main.py") and not ignore.ignored("bpf/podtrace.c")


@pytest.mark.parametrize("text,why", [
    ("FROM debian:12-slim\nADD x.tar /x\n", "instruction ADD"),
    ("FROM debian:12-slim\nARG V=1\n", "instruction ARG"),
    ("FROM alpine:3\n", "only debian:12-slim"),
    ("FROM debian:12-slim\nFROM debian:12-slim\n", "multi-stage"),
    ("FROM debian:12-slim\nCOPY --chown=1:1 tracer /t\n", "flags"),
    ("FROM debian:12-slim\nCOPY no-such-file /x\n", "does not exist"),
    ("FROM debian:12-slim\nRUN <<EOF\necho\nEOF\n", "heredocs"),
    ("FROM debian:12-slim\nWORKDIR $HOME\n", "variable substitution"),
    ("FROM debian:12-slim\nUSER nobody\n", "only root"),
    ("FROM debian:12-slim\nRUN true \\\n", "continuation"),
])
def test_the_image_interpreter_refuses_what_it_cannot_follow_in_one_line(tmp_path, text, why):
    import subprocess
    import sys

    (tmp_path / "Dockerfile").write_text(text)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "image_rootfs.py"), "check",
                        "--dockerfile", str(tmp_path / "Dockerfile"), "--context", str(REPO)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr


def test_the_image_interpreter_joins_continuations_like_docker():
    ir = _image_rootfs()
    (run,) = [i for i in ir.parse("FROM debian:12-slim\nRUN a \\\n# a comment\n  && b \\\n\n  && c\n") if i.op == "RUN"]
    assert run.args == "a   && b   && c"
    (env,) = [i for i in ir.parse("FROM debian:12-slim\nENV A=1 \\\n    B='x y'\n") if i.op == "ENV"]
    assert ir.parse_env(env.args, env) == [("A", "1"), ("B", "x y")]
    assert ir.parse_env("LEGACY some words", run) == [("LEGACY", "some words")]
