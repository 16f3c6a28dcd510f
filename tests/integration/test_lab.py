"""The lab on a real kernel: real namespaces, devices, iptables and traffic.

Every lab made here has a prefix starting with `pttest` and is removed in a `finally` or by
the session fixture, also when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from tests.integration.lab_fixture import (  # noqa: F401  (lab is a fixture)
    cli_argv, cli_env, lab, machine_snapshot, node, ping, pod, run_cli, service, tcp_ask, udp_ask,
)
from tracer.node import netns
from tracer.errors import BadInput, EnvironmentProblem
from tracer.lab import build
from tracer.lab import topology as T

pytestmark = pytest.mark.integration


def _sh(ns: str | None, *argv: str) -> str:
    return netns.run(ns, *argv).stdout


def _ip_json(ns: str, *argv: str):
    return json.loads(_sh(None, "ip", "-n", ns, "-j", *argv) or "[]")


@pytest.fixture
def clean_prefix(request):
    """A fresh `pttest-…` prefix for one test, removed afterwards whatever happens."""
    prefix = "pttest-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    build.down(prefix)
    try:
        yield prefix
    finally:
        build.down(prefix)


# ---------------------------------------------------------------------------------------
# The shape of the lab

def test_status_has_contract_keys(lab):
    for key in ("cni", "inventory", "nodes", "pods", "services", "prefix", "fabric_netns",
                "underlay_cidr", "service_cidr"):
        assert key in lab, key
    assert lab["cni"] == "flannel" and lab["prefix"] == "pttest"
    assert [n["name"] for n in lab["nodes"]] == ["node-1", "node-2"]
    for n in lab["nodes"]:
        assert {"name", "netns", "ip", "pod_cidr", "uplink", "overlay", "bridge", "mac",
                "index"} <= n.keys()
        assert netns.exists(n["netns"])
    for p in lab["pods"]:
        assert {"namespace", "name", "node", "ip", "netns", "host_veth", "tcp_port", "udp_port",
                "mac"} <= p.keys()
        assert netns.exists(p["netns"])
    assert len(lab["pods"]) == 4
    web = service(lab, "web")
    assert web["backends"] == ["default/pod-2-2"] and web["backend_ips"] == ["10.244.2.3"]
    assert Path(lab["inventory"]).is_file()


def test_status_cli_json_matches(lab):
    res = run_cli("lab", "status", "-o", "json", prefix="pttest")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == lab
    table = run_cli("lab", "status", prefix="pttest")
    assert table.returncode == 0, table.stderr
    for name in ("node-2", "pod-2-2", "default/web", "10.96.0.10", "pttest-pod-1-1"):
        assert name in table.stdout


def test_node_datapath_is_flannel_like(lab):
    nodes = lab["nodes"]
    for n in nodes:
        ns = n["netns"]
        assert _sh(ns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert _sh(ns, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables").strip() == "1"
        links = {link["ifname"]: link for link in _ip_json(ns, "-d", "link", "show")}
        eth0, cni0, vx = links["eth0"], links["cni0"], links["flannel.1"]
        assert eth0["mtu"] == 1500 and cni0["mtu"] == 1450 and vx["mtu"] == 1450
        assert vx["address"] == n["mac"] == f"0e:00:00:00:00:{n['index']:02x}"
        data = vx["linkinfo"]["info_data"]
        assert data["id"] == 1 and data["port"] == 8472 and data["local"] == n["ip"]
        assert data["learning"] is False
        addrs = {(a["ifname"], f"{i['local']}/{i['prefixlen']}")
                 for a in _ip_json(ns, "addr", "show") for i in a.get("addr_info", [])
                 if i["family"] == "inet"}
        assert ("eth0", f"{n['ip']}/24") in addrs
        assert ("cni0", f"{n['gateway']}/24") in addrs
        assert ("flannel.1", f"{n['overlay_ip']}/32") in addrs
        routes = {r["dst"]: r for r in _ip_json(ns, "route", "show")}
        neighs = {x["dst"]: x for x in _ip_json(ns, "neigh", "show", "dev", "flannel.1")}
        fdb = _sh(None, "bridge", "-n", ns, "fdb", "show", "dev", "flannel.1")
        for k in nodes:
            if k is n:
                continue
            r = routes[k["pod_cidr"]]
            assert r["gateway"] == k["overlay_ip"] and r["dev"] == "flannel.1" and "onlink" in r["flags"]
            assert neighs[k["overlay_ip"]]["lladdr"] == k["mac"]
            assert "PERMANENT" in neighs[k["overlay_ip"]]["state"]
            assert f"{k['mac']} dst {k['ip']}" in fdb
        ports = {link["ifname"] for link in _ip_json(ns, "link", "show", "master", "cni0")}
        assert ports == {p["host_veth"] for p in lab["pods"] if p["node"] == n["name"]}
    fabric_ports = {link["ifname"] for link in _ip_json(lab["fabric_netns"], "link", "show", "master", "br0")}
    assert fabric_ports == {f"n{n['index']}" for n in nodes}


def test_pod_namespaces(lab):
    for p in lab["pods"]:
        links = {link["ifname"]: link for link in _ip_json(p["netns"], "link", "show")}
        assert set(links) == {"lo", "eth0"}
        assert links["eth0"]["mtu"] == 1450 and links["eth0"]["address"] == p["mac"]
        default = [r for r in _ip_json(p["netns"], "route", "show") if r["dst"] == "default"]
        assert default and default[0]["gateway"] == p["gateway"]
        assert p["host_veth"].startswith("veth") and len(p["host_veth"]) == 12


def test_nothing_lab_made_is_in_the_root_namespace(lab):
    _, root_links, _ = machine_snapshot()
    ours = {p["host_veth"] for p in lab["pods"]} | {f"n{n['index']}" for n in lab["nodes"]}
    assert not ours & root_links
    lab_ns = [ns for ns in netns.list_names() if T.namespace_pattern("pttest").match(ns)]
    assert sorted(lab_ns) == sorted(T.plan(T.LabConfig(prefix="pttest")).namespaces)


# ---------------------------------------------------------------------------------------
# Traffic

CROSS_NODE = [("pod-1-1", "pod-2-1"), ("pod-1-2", "pod-2-2"), ("pod-2-2", "pod-1-1")]
SAME_NODE = [("pod-1-1", "pod-1-2")]


@pytest.mark.parametrize("src,dst", CROSS_NODE + SAME_NODE)
def test_pod_to_pod_icmp(lab, src, dst):
    assert ping(pod(lab, src)["netns"], pod(lab, dst)["ip"]) == pod(lab, dst)["ip"]


@pytest.mark.parametrize("src,dst", CROSS_NODE + SAME_NODE)
def test_pod_to_pod_tcp_names_the_right_pod(lab, src, dst):
    assert tcp_ask(pod(lab, src)["netns"], pod(lab, dst)["ip"], 8080) == dst


@pytest.mark.parametrize("src,dst", CROSS_NODE + SAME_NODE)
def test_pod_to_pod_udp_names_the_right_pod(lab, src, dst):
    assert udp_ask(pod(lab, src)["netns"], pod(lab, dst)["ip"], 8080) == dst


def test_cross_node_traffic_really_goes_through_vxlan(lab):
    """The overlay, not some shortcut, carries pod-1-1 -> pod-2-1: node-2's flannel.1
    receive counter moves."""
    ns2 = node(lab, "node-2")["netns"]

    def rx_packets():
        return int(_sh(ns2, "cat", "/sys/class/net/flannel.1/statistics/rx_packets"))

    before = rx_packets()
    for _ in range(3):
        assert tcp_ask(pod(lab, "pod-1-1")["netns"], pod(lab, "pod-2-1")["ip"], 8080) == "pod-2-1"
    assert rx_packets() - before >= 6


def _sep_counters(ns: str, chain: str) -> int:
    out = _sh(ns, "iptables", "-w", "5", "-t", "nat", "-L", chain, "-v", "-x", "-n")
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "DNAT" in line)


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_service_vip_reaches_only_backend_on_last_node(lab, proto):
    web = service(lab, "web")
    port = next(p for p in web["ports"] if p["protocol"] == proto)
    sep = port["endpoint_chains"]["default/pod-2-2"]
    node1 = node(lab, "node-1")["netns"]
    before = _sep_counters(node1, sep)
    ask = tcp_ask if proto == "TCP" else udp_ask
    # Nothing listens on port 80 anywhere: only a DNAT to 10.244.2.3:8080 can answer.
    assert ask(pod(lab, "pod-1-1")["netns"], web["cluster_ip"], 80) == "pod-2-2"
    assert _sep_counters(node1, sep) > before, "the DNAT rule on node-1 did not see the flow"


def test_echo_service_reaches_every_backend(lab):
    """Random kube-proxy balancing across all pods, same-node backends included (their
    replies are bridged and need bridge-nf-call-iptables=1 to be un-DNATed)."""
    echo = service(lab, "echo")
    src = pod(lab, "pod-1-1")["netns"]
    seen = set()
    for _ in range(60):
        seen.add(tcp_ask(src, echo["cluster_ip"], 80))
        if len(seen) == 4:
            break
    assert seen == {"pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"}


# ---------------------------------------------------------------------------------------
# The inventory

DESERIALIZE = {"Node": "V1Node", "Pod": "V1Pod", "Service": "V1Service",
               "EndpointSlice": "V1EndpointSlice"}


def _attr(obj, *names):
    """Field names of plural acronyms differ between client versions (pod_cidrs/pod_cid_rs)."""
    for name in names:
        if name in type(obj).__dict__ or name in getattr(obj, "openapi_types", {}):
            return getattr(obj, name)
    raise AttributeError(names)


def test_inventory_deserializes_and_matches_status(lab):
    inv = json.loads(Path(lab["inventory"]).read_text())
    assert inv["apiVersion"] == "v1" and inv["kind"] == "List"
    api = ApiClient()
    objs = {}
    for item in inv["items"]:
        obj = api._ApiClient__deserialize(item, DESERIALIZE[item["kind"]])
        objs.setdefault(item["kind"], []).append(obj)
    assert set(objs) == set(DESERIALIZE)

    nodes = {n.metadata.name: n for n in objs["Node"]}
    assert set(nodes) == {n["name"] for n in lab["nodes"]}
    for n in lab["nodes"]:
        k = nodes[n["name"]]
        assert k.spec.pod_cidr == n["pod_cidr"] and _attr(k.spec, "pod_cidrs", "pod_cid_rs") == [n["pod_cidr"]]
        addrs = {a.type: a.address for a in k.status.addresses}
        assert addrs == {"InternalIP": n["ip"], "Hostname": n["name"]}
        assert k.metadata.labels["kubernetes.io/hostname"] == n["name"]
        assert [c.status for c in k.status.conditions if c.type == "Ready"] == ["True"]

    pods = {(p.metadata.namespace, p.metadata.name): p for p in objs["Pod"]}
    assert set(pods) == {(p["namespace"], p["name"]) for p in lab["pods"]}
    for p in lab["pods"]:
        k = pods[(p["namespace"], p["name"])]
        assert k.spec.node_name == p["node"]
        assert k.status.pod_ip == p["ip"] and [x.ip for x in _attr(k.status, "pod_ips", "pod_i_ps")] == [p["ip"]]
        assert k.status.host_ip == node(lab, p["node"])["ip"]
        assert k.status.phase == "Running"
        h = k.metadata.labels.pop("pod-template-hash")
        assert k.metadata.labels == {"app": p["name"], "podtrace-lab": "true"}
        # each lab pod is the one replica of a Deployment of its own name
        [owner] = k.metadata.owner_references
        assert (owner.kind, owner.name, owner.controller) == ("ReplicaSet", f"{p['name']}-{h}", True)
        ports = {(cp.container_port, cp.protocol) for c in k.spec.containers for cp in c.ports}
        assert ports == {(p["tcp_port"], "TCP"), (p["udp_port"], "UDP")}

    svcs = {(s.metadata.namespace, s.metadata.name): s for s in objs["Service"]}
    assert set(svcs) == {(s["namespace"], s["name"]) for s in lab["services"]}
    slices = {s.metadata.labels["kubernetes.io/service-name"]: s for s in objs["EndpointSlice"]}
    pod_uids = {(p.metadata.namespace, p.metadata.name): p.metadata.uid for p in objs["Pod"]}
    for s in lab["services"]:
        k = svcs[(s["namespace"], s["name"])]
        assert k.spec.type == "ClusterIP" and k.spec.cluster_ip == s["cluster_ip"]
        assert _attr(k.spec, "cluster_ips", "cluster_i_ps") == [s["cluster_ip"]]
        assert [(p.port, p.target_port, p.protocol) for p in k.spec.ports] == \
            [(p["port"], p["target_port"], p["protocol"]) for p in s["ports"]]
        selected = sorted(f"{ns}/{name}" for (ns, name), kp in pods.items()
                          if all(kp.metadata.labels.get(a) == b for a, b in k.spec.selector.items()))
        assert selected == sorted(s["backends"])
        es = slices[s["name"]]
        assert es.address_type == "IPv4"
        assert [e.addresses[0] for e in es.endpoints] == s["backend_ips"]
        assert [f"{e.target_ref.namespace}/{e.target_ref.name}" for e in es.endpoints] == s["backends"]
        for e in es.endpoints:
            assert e.conditions.ready is True and e.target_ref.kind == "Pod"
            assert e.node_name == pod(lab, e.target_ref.name)["node"]
            assert e.target_ref.uid == pod_uids[(e.target_ref.namespace, e.target_ref.name)]
        assert {(p.port, p.protocol) for p in es.ports} == {(8080, "TCP"), (8080, "UDP")}


# ---------------------------------------------------------------------------------------
# Lifecycle: idempotence, rollback, no leaks

def _responder_pids_of(doc):
    return sorted(p["responder_pid"] for p in doc["pods"])


def test_up_twice_down_twice_leave_machine_as_found(clean_prefix):
    before = machine_snapshot(clean_prefix)
    first = run_cli("lab", "up", prefix=clean_prefix)
    assert first.returncode == 0, first.stderr
    assert f"lab {clean_prefix} is up" in first.stdout
    doc = build.status(clean_prefix)
    inodes = {ns: netns.inode(ns) for ns in T.plan(T.LabConfig(prefix=clean_prefix)).namespaces}

    second = run_cli("lab", "up", prefix=clean_prefix)
    assert second.returncode == 0, second.stderr
    assert "already up" in second.stdout
    assert build.status(clean_prefix) == doc
    assert {ns: netns.inode(ns) for ns in inodes} == inodes, "second up touched the namespaces"
    assert machine_snapshot(clean_prefix)[2] == set(_responder_pids_of(doc))
    assert tcp_ask(f"{clean_prefix}-pod-1-1", "10.96.0.10", 80) == "pod-2-2"

    third = run_cli("lab", "down", prefix=clean_prefix)
    assert third.returncode == 0, third.stderr
    assert "removed" in third.stdout
    assert machine_snapshot(clean_prefix) == before
    assert not (T.default_state_root() / clean_prefix).exists()

    fourth = run_cli("lab", "down", prefix=clean_prefix)
    assert fourth.returncode == 0, fourth.stderr
    assert "nothing to remove" in fourth.stdout
    assert machine_snapshot(clean_prefix) == before


def test_up_with_a_custom_shape(clean_prefix):
    before = machine_snapshot(clean_prefix)
    doc, created = build.up(T.LabConfig(prefix=clean_prefix, nodes=3, pods_per_node=1))
    assert created
    assert [p["name"] for p in doc["pods"]] == ["pod-1-1", "pod-2-1", "pod-3-1"]
    assert service(doc, "web")["backends"] == ["default/pod-3-1"]
    assert tcp_ask(f"{clean_prefix}-pod-1-1", "10.96.0.10", 80) == "pod-3-1"
    assert udp_ask(f"{clean_prefix}-pod-2-1", "10.244.3.2", 8080) == "pod-3-1"
    again, created = build.up(T.LabConfig(prefix=clean_prefix))
    assert not created and again == doc
    build.down(clean_prefix)
    assert machine_snapshot(clean_prefix) == before


def test_down_works_without_the_state_file(clean_prefix):
    before = machine_snapshot(clean_prefix)
    build.up(T.LabConfig(prefix=clean_prefix))
    # The state is lost (e.g. someone removed /run/podtrace): namespaces and processes
    # are still found on the machine itself.
    shutil.rmtree(T.default_state_root() / clean_prefix)
    removed = build.down(clean_prefix)
    assert sum(r.startswith("netns ") for r in removed) == 7
    assert sum(r.startswith("process ") for r in removed) == 4
    assert machine_snapshot(clean_prefix) == before


def test_incomplete_lab_is_rebuilt(clean_prefix):
    doc, _ = build.up(T.LabConfig(prefix=clean_prefix))
    os.kill(doc["pods"][0]["responder_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while build.missing_parts(doc) == [] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert build.missing_parts(doc)
    again, created = build.up(T.LabConfig(prefix=clean_prefix))
    assert created and not build.missing_parts(again)
    assert tcp_ask(f"{clean_prefix}-pod-2-1", "10.244.1.2", 8080) == "pod-1-1"


def test_failure_half_way_rolls_back(clean_prefix, monkeypatch):
    before = machine_snapshot(clean_prefix)
    # A real failure of a real step: iptables-restore rejects the rules.
    monkeypatch.setattr(T, "iptables_rules", lambda topo: "*nat\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n")
    with pytest.raises(EnvironmentProblem) as err:
        build.up(T.LabConfig(prefix=clean_prefix))
    assert "iptables" in err.value.message
    assert machine_snapshot(clean_prefix) == before
    assert build.status(clean_prefix) is None
    assert not (T.default_state_root() / clean_prefix).exists()


def _start_up(prefix: str, **env: str) -> subprocess.Popen:
    # SIGINT may be ignored by whoever started pytest (a background job); the child must
    # get Python's usual Ctrl-C handling, as in a terminal.
    return subprocess.Popen(
        cli_argv("lab", "up"), env=cli_env(prefix, **env), cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; stderr so far: {''.join(lines)}")


@pytest.mark.parametrize("step", build.STEPS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupted_up_rolls_back(clean_prefix, step, sig):
    before = machine_snapshot(clean_prefix)
    proc = _start_up(clean_prefix, PODTRACE_LAB_PAUSE_AFTER=step)
    try:
        _wait_for_line(proc, f"paused after {step}")
        assert machine_snapshot(clean_prefix)[0], "nothing was built before the pause"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert machine_snapshot(clean_prefix) == before
    assert not (T.default_state_root() / clean_prefix).exists()


def test_interrupt_at_arbitrary_moments_leaves_all_or_nothing(clean_prefix):
    """Ctrl-C with no pause, at moments spread over a whole `lab up`: afterwards the lab is
    either completely up (the interrupt came too late) or completely gone."""
    before = machine_snapshot(clean_prefix)
    rng = random.Random(1234)
    outcomes = []
    for delay in [0.0, 0.05, 0.1, 0.15] + [rng.uniform(0.1, 0.4) for _ in range(6)]:
        proc = _start_up(clean_prefix)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        doc = build.status(clean_prefix)
        if doc is not None:
            assert not build.missing_parts(doc)
            outcomes.append("up")
            build.down(clean_prefix)
        else:
            outcomes.append(f"rc={proc.returncode}")
        assert machine_snapshot(clean_prefix) == before, f"after an interrupt at {delay:.2f} s"
    assert any(o != "up" for o in outcomes), outcomes


def test_non_root_gets_one_line_and_exit_1(clean_prefix):
    for args in (["lab", "up"], ["lab", "down"]):
        res = run_cli(*args, prefix=clean_prefix, user_nobody=True)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs root" in lines[0] and "sudo" in lines[0], res.stderr
        assert res.stdout == ""
    assert machine_snapshot(clean_prefix)[0] == set()


def test_status_without_a_lab_is_one_line_exit_1(clean_prefix):
    res = run_cli("lab", "status", prefix=clean_prefix)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"podtrace: no lab is up; run: podtrace lab --prefix {clean_prefix} up"]


def test_bad_input_exit_2(clean_prefix):
    res = run_cli("lab", "up", "--cni", "weave", prefix=clean_prefix)
    assert res.returncode == 2 and "--cni" in res.stderr
    res = run_cli("lab", "up", "--nodes", "17", prefix=clean_prefix)
    assert res.returncode == 2 and "--nodes" in res.stderr
    with pytest.raises(BadInput):
        build.down("Not A Prefix")
    assert machine_snapshot(clean_prefix)[0] == set()


def test_up_clears_leftovers_of_a_killed_run(clean_prefix):
    """A `lab up` killed with SIGKILL leaves pieces and maybe a corrupt state file; the next
    `lab up` removes them and builds a working lab."""
    before = machine_snapshot(clean_prefix)
    netns.run(None, "ip", "netns", "add", f"{clean_prefix}-node-1")
    lab_dir = T.default_state_root() / clean_prefix
    lab_dir.mkdir(parents=True)
    (lab_dir / "lab.json").write_text("{not json")
    doc, created = build.up(T.LabConfig(prefix=clean_prefix))
    assert created and not build.missing_parts(doc)
    assert tcp_ask(f"{clean_prefix}-pod-1-2", "10.244.2.2", 8080) == "pod-2-1"
    build.down(clean_prefix)
    assert machine_snapshot(clean_prefix) == before
