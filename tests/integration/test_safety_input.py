"""Bad input for every command: one line on stderr, the contract's exit code (2 bad input,
1 the environment cannot), never a traceback — `--debug` shows it.

Every case runs `python -m tracer.cli` as a subprocess; the cases are independent, so they
run concurrently (a pool of workers) and each test only checks its result.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fakeapi import FakeApi, tls
from tests.integration.test_safety_common import (
    SAFE_PREFIX, cli, nobody_python, one_line_error, safe_lab,  # noqa: F401  (fixture)
)
from tracer.agents import wire
from tests.conftest import subprocess_env

NO_LAB = "pttestsafe-none"          # a prefix with no lab: nothing may ever be built under it


def _cluster_files(lab: dict, d: Path) -> dict[str, str]:
    """--cluster files: the lab's own inventory plus the odd objects, and broken ones."""
    inv = json.loads(Path(lab["inventory"]).read_text())
    items = inv["items"]
    pod = copy.deepcopy(next(i for i in items if i["kind"] == "Pod"))
    pending = copy.deepcopy(pod)
    pending["metadata"]["name"] = "pending-1"
    pending["status"] = {"phase": "Pending"}
    svc = next(i for i in items if i["kind"] == "Service")
    headless = copy.deepcopy(svc)
    headless["metadata"]["name"] = "headless"
    headless["spec"]["clusterIP"] = "None"
    empty = copy.deepcopy(svc)
    empty["metadata"]["name"] = "empty"
    empty["spec"]["clusterIP"] = empty["spec"]["clusterIPs"][0] = "10.96.0.99"
    bare_node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-noip"}, "status": {}}
    good = dict(inv, items=items + [pending, headless, empty, bare_node])
    files = {
        "good": json.dumps(good),
        "not-json": "this is not json {",
        "binary": b"\xff\xfe\x00\x01garbage\x80",
        "empty": "",
        "json-list": json.dumps([1, 2, 3]),
        "items-not-list": json.dumps({"kind": "List", "items": "pods"}),
        "items-wrong-types": json.dumps({"items": [1, "x", None]}),
        "object-without-name": json.dumps({"items": [{"kind": "Pod", "metadata": {}}]}),
        "metadata-not-object": json.dumps({"items": [{"kind": "Pod", "metadata": "x", "spec": []}]}),
        "service-ports-wrong": json.dumps({"items": [{"kind": "Service", "metadata": {"name": "s"},
                                                      "spec": {"ports": "80"}}]}),
    }
    out = {}
    for name, text in files.items():
        p = d / f"{name}.json"
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        out[name] = str(p)
    out.update(_trace_files(d))
    out["capture-out"] = str(d / "capture.parquet")
    out["missing"] = str(d / "missing.json")
    out["directory"] = str(d)
    out["under-a-file"] = str(d / "good.json" / "x")        # ENOTDIR
    out["eio"] = "/proc/self/mem"                           # read() fails with EIO
    return out


def _trace_files(d: Path) -> dict[str, str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tracer import tracefile
    from tracer.kernel import record

    arr = np.zeros(64, dtype=record.EVENT_DTYPE)
    arr["hook"], arr["ifname"] = 1, b"eth0"
    w = tracefile.Writer(d / "good.parquet")
    w.write_records(arr)
    good = w.close({"kind": "capture", "clock": {}, "inventory": "none"})
    raw = good.read_bytes()
    (d / "truncated.parquet").write_bytes(raw[: len(raw) // 2])
    (d / "not-parquet.parquet").write_bytes(b"\x89PNG\r\n" + bytes(range(256)))
    (d / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"a": [1, 2, 3]}), d / "foreign.parquet")
    return {"trace-good": str(good), "trace-truncated": str(d / "truncated.parquet"),
            "trace-not-parquet": str(d / "not-parquet.parquet"), "trace-empty": str(d / "empty.parquet"),
            "trace-foreign-parquet": str(d / "foreign.parquet"), "trace-missing": str(d / "missing.parquet"),
            "trace-directory": str(d)}


def _cases(f: dict[str, str], kube: dict[str, str]) -> list[tuple]:
    """(id, argv, exit code, regex the one line must match, extra env)"""
    F = "flow"
    ok_ends = ["pod-1-1", "pod-2-1"]
    c = [
        # ---- flow: endpoints that do not exist or cannot be traced
        ("flow-unknown-pod", [F, "pod-1-1", "pod-9-9"], 2, r"no pod default/pod-9-9.*did you mean", {}),
        ("flow-unknown-namespace", [F, "nosuchns/pod-1-1", "pod-2-1"], 2, r"no pod nosuchns/pod-1-1", {}),
        ("flow-unknown-service", [F, "pod-1-1", "svc/default/nope"], 2, r"no Service default/nope", {}),
        ("flow-unknown-node", [F, "node/node-9", "pod-2-1", "--no-probe"], 2, r"no node node-9", {}),
        ("flow-pending-pod", [F, "pod-1-1", "pending-1", "--cluster", f["good"]], 2, r"has no IP", {}),
        ("flow-headless-service", [F, "pod-1-1", "svc/default/headless", "--cluster", f["good"]], 2,
         r"headless", {}),
        ("flow-src-not-a-pod", [F, "node/node-1", "pod-2-1"], 2, r"not a pod", {}),
        # ---- flow: addresses
        # an IPv4 lab: its pods have no IPv6 address
        ("flow-ipv6", [F, "pod-1-1", "fd00::1"], 2,
         r"pod-1-1 \(IPv4 only\) and fd00::1 \(IPv6 only\) share no address family", {}),
        ("flow-ipv6-malformed", [F, "pod-1-1", "fd00::1::2"], 2, r"not a valid IPv6 address", {}),
        ("flow-ipv6-bad-group", [F, "pod-1-1", "fd00:10:244:1::zz"], 2, r"not a valid IPv6 address", {}),
        ("flow-ipv6-scoped", [F, "pod-1-1", "fe80::1%eth0"], 2, r"scoped", {}),
        ("flow-ipv6-link-local", [F, "pod-1-1", "fe80::1"], 2, r"link-local", {}),
        ("flow-ipv6-multicast", [F, "pod-1-1", "ff02::1"], 2, r"multicast", {}),
        ("flow-ipv6-unspecified", [F, "pod-1-1", "::"], 2, r"unspecified", {}),
        ("flow-ipv6-src", [F, "fd00::1", "pod-2-1", "--no-probe"], 2, r"share no address family", {}),
        ("flow-ip-family-6-ipv4-lab", [F, *ok_ends, "--ip-family", "6"], 2,
         r"--ip-family 6: pod-1-1 has no IPv6 address \(IPv4 only\)", {}),
        ("flow-v4-mapped-bad-octet", [F, "pod-1-1", "::ffff:999.1.1.1"], 2, r"not a valid IPv6 address", {}),
        ("flow-bad-octet", [F, "pod-1-1", "999.1.1.1"], 2, r"not a valid IPv4", {}),
        ("flow-cidr", [F, "pod-1-1", "10.0.0.1/24"], 2, r"no pod|cannot parse", {}),
        ("flow-too-many-parts", [F, "pod-1-1", "a/b/c/d"], 2, r"cannot parse", {}),
        ("flow-empty-endpoint", [F, "pod-1-1", ""], 2, r"empty endpoint", {}),
        # ---- flow: numbers out of range
        ("flow-port-0", [F, *ok_ends, "--proto", "tcp", "--port", "0"], 2, r"--port", {}),
        ("flow-port-65536", [F, *ok_ends, "--proto", "tcp", "--port", "65536"], 2, r"--port", {}),
        ("flow-count-0", [F, *ok_ends, "--count", "0"], 2, r"--count", {}),
        ("flow-duration-0", [F, *ok_ends, "--no-probe", "--duration", "0"], 2, r"--duration", {}),
        ("flow-size-small", [F, *ok_ends, "--size", "10"], 2, r"--size", {}),
        # ---- flow: flags that contradict each other
        ("flow-no-probe-with-count", [F, *ok_ends, "--no-probe", "--count", "5"], 2, r"--count.*--no-probe", {}),
        ("flow-duration-without-no-probe", [F, *ok_ends, "--duration", "5"], 2, r"--duration.*--no-probe", {}),
        ("flow-port-with-icmp", [F, *ok_ends, "--proto", "icmp", "--port", "80"], 2, r"--port.*ICMP", {}),
        ("flow-tcp-without-port", [F, *ok_ends, "--proto", "tcp"], 2, r"needs --port", {}),
        ("flow-sport-with-icmp", [F, *ok_ends, "--sport", "5"], 2, r"--sport", {}),
        ("flow-size-with-tcp", [F, *ok_ends, "--proto", "tcp", "--port", "8080", "--size", "100"], 2, r"--size", {}),
        ("flow-unknown-proto", [F, *ok_ends, "--proto", "sctp"], 2, r"--proto", {}),
        ("flow-missing-dst", [F, "pod-1-1"], 2, r"DST", {}),
        # ---- flow: files
        ("flow-save-dir-missing", [F, *ok_ends, "--save", "/nonexistent-dir/t.parquet"], 2, r"does not exist", {}),
        ("flow-save-is-directory", [F, *ok_ends, "--save", "/tmp"], 2, r"--save.*directory", {}),
        ("flow-no-metadata", [F, *ok_ends], 1, r"no cluster metadata", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("flow-bad-lab-prefix", [F, *ok_ends], 2, r"bad lab prefix", {"PODTRACE_LAB_PREFIX": "Bad Prefix!"}),
        # ---- lab
        ("lab-bad-prefix", ["lab", "--prefix", "BAD", "status"], 2, r"bad lab prefix", {}),
        ("lab-up-nodes-0", ["lab", "up", "--nodes", "0"], 2, r"--nodes", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-up-nodes-17", ["lab", "up", "--nodes", "17"], 2, r"--nodes", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-up-pods-9", ["lab", "up", "--pods-per-node", "9"], 2, r"--pods-per-node",
         {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-up-unknown-cni", ["lab", "up", "--cni", "weave"], 2, r"--cni", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-status-no-lab", ["lab", "status"], 1, r"no lab is up", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-status-bad-output", ["lab", "status", "-o", "yaml"], 2, r"--output|-o", {}),
        ("lab-break-unknown", ["lab", "break", "no-such-fault"], 2, r"unknown scenario", {}),
        ("lab-break-nothing", ["lab", "break"], 2, r"SCENARIO", {}),
        ("lab-break-unknown-node", ["lab", "break", "netpol-drop", "--node", "node-9"], 2, r"node-9", {}),
        ("lab-break-no-lab", ["lab", "break", "netpol-drop"], 1, r"no lab", {"PODTRACE_LAB_PREFIX": NO_LAB}),
        ("lab-fix-unknown", ["lab", "fix", "no-such-fault"], 2, r"unknown scenario", {}),
        ("lab-fix-nothing", ["lab", "fix"], 2, r"SCENARIO", {}),
        ("lab-unknown-command", ["lab", "explode"], 2, r"explode", {}),
        # ---- doctor, cleanup, the group
        ("doctor-bad-output", ["doctor", "-o", "yaml"], 2, r"--output|-o", {}),
        ("cleanup-extra-argument", ["cleanup", "everything"], 2, r"everything", {}),
        ("unknown-command", ["explode"], 2, r"explode", {}),
        ("unknown-global-option", ["--frobnicate", "flow"], 2, r"--frobnicate", {}),
    ]
    for name in ("missing", "directory", "not-json", "binary", "items-wrong-types", "object-without-name",
                 "service-ports-wrong", "under-a-file", "eio"):
        c.append((f"flow-cluster-{name}", [F, *ok_ends, "--cluster", f[name]], 2, r"cluster|--cluster", {}))
    # ---- a cluster through the API (kubeconfig): missing, broken, unreachable, forbidden
    c += [
        ("flow-kubeconfig-missing", [F, *ok_ends, "--kubeconfig", "/nonexistent/kubeconfig"], 2,
         r"does not exist", {}),
        ("flow-kubeconfig-corrupt", [F, *ok_ends, "--kubeconfig", kube["corrupt"]], 1, r"kubeconfig", {}),
        ("flow-kubeconfig-unknown-context", [F, *ok_ends, "--kubeconfig", kube["ok"], "--context", "prod"], 2,
         r"context", {}),
        ("flow-context-without-kubeconfig", [F, *ok_ends, "--context", "prod"], 2, r"--context", {}),
        ("flow-api-unreachable", [F, *ok_ends, "--kubeconfig", kube["unreachable"]], 1,
         r"127\.0\.0\.1|unreachable|connect", {}),
        ("flow-api-rejects-token", [F, *ok_ends, "--kubeconfig", kube["bad-token"]], 1, r"401", {}),
        ("flow-rbac-forbidden", [F, *ok_ends, "--kubeconfig", kube["forbidden"]], 1, r"403|[Ff]orbidden", {}),
        ("flow-api-wrong-ca", [F, *ok_ends, "--kubeconfig", kube["wrong-ca"]], 1,
         r"^podtrace: TLS with the Kubernetes API server https://127\.0\.0\.1:\d+ .*CERTIFICATE_VERIFY_FAILED", {}),
    ]
    # ---- capture: the same selections as flow's endpoints, and its own options
    w = ["-d", "1", "-w", f["capture-out"]]
    c += [
        ("capture-unknown-pod", ["capture", "--pod", "default/nope", *w], 2, r"no pod default/nope", {}),
        ("capture-unknown-namespace", ["capture", "-n", "nope", *w], 2, r"nope", {}),
        ("capture-unknown-service", ["capture", "--service", "default/nope", *w], 2, r"no Service", {}),
        ("capture-unknown-node", ["capture", "--node", "node-9", *w], 2, r"no node node-9", {}),
        ("capture-bad-cidr", ["capture", "10.0.0.0/33", *w], 2, r"10\.0\.0\.0/33", {}),
        ("capture-ipv6-cidr-other-family", ["capture", "--cidr", "fd00::/64", "--ip-family", "4", *w], 2,
         r"fd00::/64.*--ip-family is 4", {}),
        ("capture-ipv6-bad-cidr", ["capture", "--cidr", "fd00::/129", *w], 2, r"fd00::/129", {}),
        ("capture-ipv6-scoped", ["capture", "fe80::1%eth0", *w], 2, r"scoped", {}),
        ("capture-pod-no-ipv6", ["capture", "--pod", "default/pod-1-1", "--ip-family", "6", *w], 2,
         r"no IPv6 address", {}),
        ("capture-port-0", ["capture", "--port", "0", *w], 2, r"--port", {}),
        ("capture-write-dir-missing", ["capture", "-d", "1", "-w", "/nonexistent-dir/c.parquet"], 2,
         r"does not exist", {}),
        ("capture-cluster-corrupt", ["capture", "--cluster", f["binary"], *w], 2, r"cluster file", {}),
    ]
    # ---- analyze: trace files that are missing, foreign, damaged or of the wrong kind
    c += [(f"analyze-{name}", ["analyze", f[f"trace-{name}"]], 2, r"", {})
          for name in ("missing", "not-parquet", "empty", "truncated", "foreign-parquet")]
    c += [
        ("analyze-flow-mode-on-capture", ["analyze", f["trace-good"], "--mode", "flow"], 2, r"not a `flow --save`", {}),
    ]
    return c


@pytest.fixture(scope="module")
def results(safe_lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("badinput")
    files = _cluster_files(safe_lab, d)
    ok_api = FakeApi.from_lab(SAFE_PREFIX, token="secret").start()
    forbidden_api = FakeApi.from_lab(SAFE_PREFIX).start()
    forbidden_api.forbidden |= {"Pod", "Service", "Node", "EndpointSlice"}
    try:
        kube = {"ok": str(ok_api.write_kubeconfig(d / "kc-ok")),
                "bad-token": str(ok_api.write_kubeconfig(d / "kc-token", token="wrong")),
                "forbidden": str(forbidden_api.write_kubeconfig(d / "kc-forbidden")),
                "wrong-ca": str(ok_api.write_kubeconfig(d / "kc-wrong-ca", token="secret",
                                                        ca_pem=tls.authority("another-ca").ca_pem))}
        (d / "kc-corrupt").write_text("apiVersion: v1\nclusters: [ {name: x, cluster: {server: \n")
        kube["corrupt"] = str(d / "kc-corrupt")
        unreachable = json.loads(Path(kube["ok"]).read_text())
        unreachable["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
        (d / "kc-unreachable").write_text(json.dumps(unreachable))
        kube["unreachable"] = str(d / "kc-unreachable")
        cases = _cases(files, kube)
        with ThreadPoolExecutor(max_workers=6) as pool:
            futs = {cid: pool.submit(cli, *argv, timeout=60, **env) for cid, argv, _, _, env in cases}
            out = {cid: (futs[cid].result(), code, rx) for cid, _, code, rx, _ in cases}
        yield out
    finally:
        ok_api.stop()
        forbidden_api.stop()


def _case_ids():
    # ids only: the real cases need the lab's files, made in the fixture
    from collections import defaultdict

    f = defaultdict(str)
    return [c[0] for c in _cases(f, {k: "" for k in ("ok", "bad-token", "forbidden", "corrupt", "unreachable",
                                                     "wrong-ca")})]


@pytest.mark.parametrize("case", _case_ids())
def test_bad_input(results, case):
    res, code, rx = results[case]
    line = one_line_error(res, code)
    assert re.search(rx, line), f"{line!r} does not say {rx!r}"
    assert res.stdout == "", res.stdout


def test_v4_mapped_address_is_its_ipv4_address(safe_lab):
    """::ffff:a.b.c.d is the IPv4 address it maps (a note on stderr says so): the flow goes
    on as with the IPv4 address (here to the next bad input, a TCP probe without a port)."""
    res = cli("flow", "pod-1-1", "::ffff:10.244.2.2", "--proto", "tcp")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "podtrace: note: ::ffff:10.244.2.2 is an IPv4-mapped IPv6 address: tracing IPv4 10.244.2.2"
    assert lines[-1].startswith("podtrace: --proto tcp needs --port"), lines
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_debug_shows_the_traceback(safe_lab):
    res = cli("--debug", "flow", "pod-1-1", "pod-9-9")
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("podtrace: no pod default/pod-9-9")
    env = cli("flow", "pod-1-1", "--cluster", "/proc/self/mem", "pod-2-1", PODTRACE_DEBUG="1")
    assert env.returncode == 2 and "Traceback" in env.stderr


def test_service_without_endpoints_is_traced_and_says_so(safe_lab, tmp_path):
    """Not bad input: the probes go to a VIP nothing answers, the trace says where they died
    (exit 3) and the note says the Service has no endpoints."""
    files = _cluster_files(safe_lab, tmp_path)
    res = cli("flow", "pod-1-1", "svc/default/empty", "--cluster", files["good"], "--count", "1",
              "--timeout", "0.3", "-o", "json")
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    doc = json.loads(res.stdout)
    assert doc["verdict"]["status"] == "failed"
    assert any("default/empty has no ready endpoints" in n for n in doc["notes"]), doc["notes"]
    reqs = [p for p in doc["packets"] if p["direction"] == "request"]
    assert reqs and all(p["verdict"]["status"] in ("dropped", "lost") for p in reqs)


def test_agent_refuses_a_bad_request_on_its_stream(safe_lab):
    """`podtrace agent` answers on its framed stream, never with a traceback."""
    for request in ("this is not json\n", json.dumps({"version": 99}) + "\n", "\n"):
        res = subprocess.run([sys.executable, "-m", "tracer.cli", "agent"], input=request.encode(),
                             capture_output=True, timeout=60, cwd="/",
                             env=subprocess_env(PYTHONPATH=str(Path(__file__).parents[2])))
        assert res.returncode == 2, res.stderr
        assert b"Traceback" not in res.stderr
        frames = list(wire.read(io.BytesIO(res.stdout)))
        assert [f.kind for f in frames] == ["error"] and frames[0].json()["message"]


# ---------------------------------------------------------------------------------------
# Not root

NOBODY_CASES = [
    (["flow", "pod-1-1", "pod-2-1"], r"needs root.*sudo"),
    (["flow", "pod-1-1", "pod-9-9", "--no-probe"], r"needs root"),
    (["cleanup"], r"needs root"),
    (["lab", "up"], r"needs root"),
    (["lab", "down"], r"needs root"),
    (["lab", "break", "netpol-drop"], r"needs root"),
    (["lab", "fix", "netpol-drop"], r"needs root"),
    (["capture", "-d", "1"], r"needs root|root"),
]


def test_not_root_is_one_line_exit_1(safe_lab):
    argv0, env = nobody_python()
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda c: cli(*c[0], argv0=argv0, **env), NOBODY_CASES))
    for (args, rx), res in zip(NOBODY_CASES, runs):
        line = one_line_error(res, 1)
        assert re.search(rx, line), (args, line)
    doc = cli("doctor", "-o", "json", argv0=argv0, **env)
    assert doc.returncode == 1 and "Traceback" not in doc.stderr and doc.stderr == "", doc.stderr
    rep = json.loads(doc.stdout)
    assert rep["can_trace"] is False and any("root" in p["problem"] for p in rep["problems"])
    agent = subprocess.run([*argv0, "-m", "tracer.cli", "agent"], capture_output=True, timeout=60, cwd="/",
                           input=json.dumps({"version": 1, "node": "x", "addrs": ["10.0.0.1"]}).encode(),
                           env=subprocess_env(**env))
    assert agent.returncode == 1 and b"Traceback" not in agent.stderr, agent.stderr
