"""`podtrace lab up --cni cilium` on a real kernel: lxc devices, cilium_host/cilium_net with
the router IP, per-pod /32 routes, cilium_vxlan, kube-proxy Services; traffic, `podtrace
flow` through it, the `lab break` scenarios that apply, and up/down leaving nothing.

Every lab made here has a prefix starting with `pttestcil` and is removed at the end of the
module (or of its test), also when a test fails.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import todays_share
from tests.integration.lab_fixture import (
    _checksum, cli_argv, cli_env, machine_snapshot, node, ping, pod, private_lab, run_cli, service,
    tcp_ask, udp_ask,
)
from tests.integration.test_lab_scenarios import (
    OK, SCENARIOS, _ping, _ping_1_to_2, _sysctl, break_check_fix, snapshot,
)
from tracer.node import netns
from tracer.lab import build, scenarios
from tracer.lab import topology as T

pytestmark = pytest.mark.integration

PREFIX = "pttestcil"
UPDOWN_PREFIX = "pttestcil-ud"


@pytest.fixture(scope="module")
def cil():
    with private_lab(PREFIX, cni="cilium") as doc:
        yield doc


def _sh(ns: str | None, *argv: str) -> str:
    return netns.run(ns, *argv).stdout


def _ip_json(ns: str, *argv: str):
    return json.loads(_sh(None, "ip", "-n", ns, "-j", *argv) or "[]")


def _stat(ns: str, dev: str, counter: str) -> int:
    return int(_sh(ns, "cat", f"/sys/class/net/{dev}/statistics/{counter}"))


# ---------------------------------------------------------------------------------------
# The shape of the lab

def test_status_document(cil):
    assert cil["cni"] == "cilium" and cil["prefix"] == PREFIX
    assert cil["vxlan"] == {"vni": T.CILIUM_VNI, "port": T.VXLAN_PORT}
    for n in cil["nodes"]:
        assert (n["bridge"], n["overlay"], n["uplink"], n["cilium_net"]) == \
            ("cilium_host", "cilium_vxlan", "eth0", "cilium_net")
        assert n["router_ip"] == f"10.244.{n['index']}.1"
    for p in cil["pods"]:
        assert p["host_veth"].startswith("lxc") and len(p["host_veth"]) == 15
    res = run_cli("lab", "status", "-o", "json", prefix=PREFIX)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == cil
    table = run_cli("lab", "status", prefix=PREFIX)
    assert "(cilium)" in table.stdout and "cilium_vxlan" in table.stdout


def test_node_datapath_is_cilium_like(cil):
    for n in cil["nodes"]:
        ns = n["netns"]
        links = {link["ifname"]: link for link in _ip_json(ns, "-d", "link", "show")}
        assert not [name for name, link in links.items()
                    if link.get("linkinfo", {}).get("info_kind") == "bridge" or link.get("master")]
        host, net, vx = links["cilium_host"], links["cilium_net"], links["cilium_vxlan"]
        assert host["linkinfo"]["info_kind"] == net["linkinfo"]["info_kind"] == "veth"
        assert "NOARP" in host["flags"] and host["address"] == net["address"] == n["bridge_mac"]
        data = vx["linkinfo"]["info_data"]
        assert (data["id"], data["port"], data["local"], data["learning"]) == \
            (T.CILIUM_VNI, T.VXLAN_PORT, n["ip"], False)
        assert vx["address"] == n["mac"] and vx["mtu"] == T.POD_MTU
        addrs = {(a["ifname"], f"{i['local']}/{i['prefixlen']}", i.get("scope"))
                 for a in _ip_json(ns, "addr", "show") for i in a.get("addr_info", [])
                 if i["family"] == "inet"}
        assert ("cilium_host", f"{n['router_ip']}/32", "link") in addrs
        assert not [a for a in addrs if a[0] in ("cilium_net", "cilium_vxlan")]
        routes = {r["dst"]: r for r in _ip_json(ns, "route", "show")}
        mine = [p for p in cil["pods"] if p["node"] == n["name"]]
        for p in mine:
            lxc = links[p["host_veth"]]
            assert lxc["address"] == p["host_mac"] and not lxc.get("master")
            assert routes[p["ip"]]["dev"] == p["host_veth"] and routes[p["ip"]]["scope"] == "link"
            neigh = _ip_json(ns, "neigh", "show", p["ip"], "dev", p["host_veth"])
            assert neigh[0]["lladdr"] == p["mac"] and "PERMANENT" in neigh[0]["state"]
            assert _sh(ns, "cat", f"/proc/sys/net/ipv4/conf/{p['host_veth']}/rp_filter").strip() == "0"
        host_table = {r["dst"]: r for r in _ip_json(ns, "route", "show", "table", str(T.CILIUM_HOST_TABLE))}
        fdb = _sh(None, "bridge", "-n", ns, "fdb", "show", "dev", "cilium_vxlan")
        for k in cil["nodes"]:
            if k is n:
                continue
            r = routes[k["pod_cidr"]]
            assert (r["gateway"], r["dev"], r["prefsrc"]) == (k["router_ip"], "cilium_vxlan", n["router_ip"])
            assert "onlink" in r["flags"]
            neigh = _ip_json(ns, "neigh", "show", k["router_ip"], "dev", "cilium_vxlan")
            assert neigh[0]["lladdr"] == k["mac"] and "PERMANENT" in neigh[0]["state"]
            assert f"{k['mac']} dst {k['ip']}" in fdb
            h = host_table[k["pod_cidr"]]
            assert (h["gateway"], h["dev"], h["prefsrc"]) == (n["router_ip"], "cilium_host", n["router_ip"])
        rules = _ip_json(ns, "rule", "show")
        assert any(r.get("priority") == T.CILIUM_RULE_PREF and r.get("iif") == "lo"
                   and r.get("dst") == "10.244.0.0" and str(r.get("table")) == str(T.CILIUM_HOST_TABLE)
                   for r in rules), rules
        assert _sh(ns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert _sh(ns, "cat", "/proc/sys/net/ipv4/conf/cilium_net/accept_local").strip() == "1"
        filt = _sh(ns, "iptables-save", "-t", "filter")
        assert '-A FORWARD -m comment --comment "cilium-feeder: CILIUM_FORWARD" -j CILIUM_FORWARD' in filt
        assert "flanneld" not in filt


def test_pod_namespaces(cil):
    for p in cil["pods"]:
        links = {link["ifname"]: link for link in _ip_json(p["netns"], "link", "show")}
        assert set(links) == {"lo", "eth0"} and links["eth0"]["address"] == p["mac"]
        addrs = [f"{i['local']}/{i['prefixlen']}" for a in _ip_json(p["netns"], "addr", "show", "dev", "eth0")
                 for i in a["addr_info"] if i["family"] == "inet"]
        assert addrs == [f"{p['ip']}/32"]
        routes = {r["dst"]: r for r in _ip_json(p["netns"], "route", "show")}
        assert routes[p["gateway"]]["scope"] == "link"
        assert routes["default"]["gateway"] == p["gateway"] and routes["default"]["dev"] == "eth0"


def test_router_ip_is_answered_by_arp_with_the_lxc_mac(cil):
    """The pod's gateway (router) IP lives on cilium_host, yet ARP for it is answered on the
    pod's own lxc device, with the lxc MAC: the pod's packets go to lxc, never to cilium_host."""
    for p in cil["pods"]:
        subprocess.run(["ip", "-n", p["netns"], "neigh", "flush", "dev", "eth0"], check=True)
        assert ping(p["netns"], p["gateway"]) == p["gateway"]
        entry = _ip_json(p["netns"], "neigh", "show", p["gateway"], "dev", "eth0")[0]
        assert entry["lladdr"] == p["host_mac"]


def test_nothing_lab_made_is_in_the_root_namespace(cil):
    _, root_links, _ = machine_snapshot()
    ours = {p["host_veth"] for p in cil["pods"]} | {f"n{n['index']}" for n in cil["nodes"]}
    assert not ours & root_links
    lab_ns = [ns for ns in netns.list_names() if T.namespace_pattern(PREFIX).match(ns)]
    assert sorted(lab_ns) == sorted(T.plan(T.LabConfig(prefix=PREFIX, cni="cilium")).namespaces)


# ---------------------------------------------------------------------------------------
# Traffic

CROSS_NODE = [("pod-1-1", "pod-2-1"), ("pod-1-2", "pod-2-2"), ("pod-2-2", "pod-1-1")]
SAME_NODE = [("pod-1-1", "pod-1-2"), ("pod-2-1", "pod-2-2")]


@pytest.mark.parametrize("src,dst", CROSS_NODE + SAME_NODE)
def test_pod_to_pod(cil, src, dst):
    ns, ip = pod(cil, src)["netns"], pod(cil, dst)["ip"]
    assert ping(ns, ip) == ip
    assert tcp_ask(ns, ip, 8080) == dst
    assert udp_ask(ns, ip, 8080) == dst


def test_cross_node_goes_through_cilium_vxlan_not_cilium_host(cil):
    n1, n2 = node(cil, "node-1")["netns"], node(cil, "node-2")["netns"]
    before = (_stat(n2, "cilium_vxlan", "rx_packets"), _stat(n1, "cilium_host", "tx_packets"),
              _stat(n2, "cilium_host", "tx_packets"))
    for _ in range(3):
        assert tcp_ask(pod(cil, "pod-1-1")["netns"], pod(cil, "pod-2-1")["ip"], 8080) == "pod-2-1"
    after = (_stat(n2, "cilium_vxlan", "rx_packets"), _stat(n1, "cilium_host", "tx_packets"),
             _stat(n2, "cilium_host", "tx_packets"))
    assert after[0] - before[0] >= 6
    assert after[1:] == before[1:], "pod-to-pod traffic must not cross cilium_host"


def test_the_nodes_own_traffic_leaves_through_cilium_host(cil):
    """What a node sends to another node's pods follows Cilium's route: via cilium_host with
    the router IP as source, into cilium_vxlan."""
    n1 = node(cil, "node-1")
    target = pod(cil, "pod-2-1")["ip"]
    got = _sh(n1["netns"], "ip", "route", "get", target)
    assert "dev cilium_host" in got and f"src {n1['router_ip']}" in got
    fwd = _sh(n1["netns"], "ip", "route", "get", target, "from", pod(cil, "pod-1-1")["ip"],
              "iif", pod(cil, "pod-1-1")["host_veth"])
    assert "dev cilium_vxlan" in fwd
    before = _stat(n1["netns"], "cilium_host", "tx_packets"), _stat(n1["netns"], "cilium_net", "rx_packets")
    assert ping(n1["netns"], target) == target
    after = _stat(n1["netns"], "cilium_host", "tx_packets"), _stat(n1["netns"], "cilium_net", "rx_packets")
    assert after[0] > before[0] and after[1] > before[1]


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_service_vip_by_iptables_dnat(cil, proto):
    web = service(cil, "web")
    ask = tcp_ask if proto == "TCP" else udp_ask
    for src in ("pod-1-1", "pod-2-1", "pod-2-2"):   # cross-node, same node, hairpin
        assert ask(pod(cil, src)["netns"], web["cluster_ip"], 80) == "pod-2-2"
    echo = service(cil, "echo")
    seen = set()
    for _ in range(80):
        seen.add(ask(pod(cil, "pod-1-1")["netns"], echo["cluster_ip"], 80))
        if len(seen) == 4:
            break
    assert seen == {"pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"}


# ---------------------------------------------------------------------------------------
# podtrace flow through the cilium datapath

def _flow_json(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    res = run_cli("flow", *args, "-o", "json", prefix=PREFIX, timeout=timeout)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {}
    return res.returncode, doc, res.stderr


def _path(packet: dict) -> list[tuple]:
    return [(h["node"], h["pod"], h["dev"], h["point"]) for h in packet["hops"]]


def _in_order(path: list[tuple], wanted: list[tuple]) -> bool:
    it = iter(path)
    return all(any(step == w for step in it) for w in wanted)


def test_flow_pod_to_pod_across_nodes(cil):
    src, dst = pod(cil, "pod-1-1"), pod(cil, "pod-2-1")
    rc, doc, err = _flow_json("pod-1-1", "pod-2-1", "--count", "2")
    assert rc == 0, err
    assert doc["verdict"]["status"] == "ok"
    requests = [p for p in doc["packets"] if p["direction"] == "request"]
    replies = [p for p in doc["packets"] if p["direction"] == "reply"]
    assert len(requests) == 2 and len(replies) == 2
    want = [
        ("node-1", "default/pod-1-1", "eth0", "tx"),
        ("node-1", None, src["host_veth"], "rx"),
        ("node-1", None, "cilium_vxlan", "tx"),
        ("node-1", None, "eth0", "tx"),
        ("node-2", None, "eth0", "rx"),
        ("node-2", None, "cilium_vxlan", "rx"),
        ("node-2", None, dst["host_veth"], "tx"),
        ("node-2", "default/pod-2-1", "eth0", "rx"),
    ]
    for p in requests:
        assert p["verdict"]["status"] == "delivered"
        path = _path(p)
        assert _in_order(path, want), path
        # Pod to pod across nodes never touches cilium_host (nor cilium_net).
        assert not [h for h in path if h[2] in ("cilium_host", "cilium_net")], path
        outer = [h for h in p["hops"] if h["dev"] == "eth0" and h["pod"] is None and h["node"] == "node-1"]
        assert outer[0]["encap"]["vni"] == T.CILIUM_VNI
        assert (outer[0]["encap"]["src"], outer[0]["encap"]["dst"]) == \
            (node(cil, "node-1")["ip"], node(cil, "node-2")["ip"])
    back = [
        ("node-2", "default/pod-2-1", "eth0", "tx"),
        ("node-2", None, dst["host_veth"], "rx"),
        ("node-2", None, "cilium_vxlan", "tx"),
        ("node-2", None, "eth0", "tx"),
        ("node-1", None, "eth0", "rx"),
        ("node-1", None, "cilium_vxlan", "rx"),
        ("node-1", None, src["host_veth"], "tx"),
        ("node-1", "default/pod-1-1", "eth0", "rx"),
    ]
    for p in replies:
        assert p["verdict"]["status"] == "delivered"
        assert _in_order(_path(p), back), _path(p)


def test_flow_pod_to_service(cil):
    rc, doc, err = _flow_json("pod-1-1", "svc/default/web", "--count", "1")
    assert rc == 0, err
    req = next(p for p in doc["packets"] if p["direction"] == "request")
    assert req["verdict"]["status"] == "delivered"
    assert [h["dst"] for h in req["hops"]][0] == "10.96.0.10"
    assert [h["dst"] for h in req["hops"]][-1] == pod(cil, "pod-2-2")["ip"]   # kube-proxy's DNAT
    assert _in_order(_path(req), [("node-1", None, "cilium_vxlan", "tx"), ("node-2", None, "cilium_vxlan", "rx"),
                                  ("node-2", "default/pod-2-2", "eth0", "rx")])


def _ping_from(ns: str, src: str | None, dst: str, stop: threading.Event) -> None:
    """ICMP echoes from `src` (bound; None: the address the route gives) in `ns` every 0.2 s
    until `stop`."""
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if src:
        sock.bind((src, 0))
    try:
        seq = 0
        while not stop.is_set():
            seq += 1
            header = struct.pack("!BBHHH", 8, 0, 0, 0x4343, seq)
            payload = b"podtrace-cilium-host"
            sock.sendto(struct.pack("!BBHHH", 8, 0, _checksum(header + payload), 0x4343, seq) + payload,
                        (dst, 0))
            stop.wait(0.2)
    finally:
        sock.close()


def test_flow_shows_the_nodes_own_traffic_through_cilium_host(cil):
    """node-1 → pod-2-1 (real traffic, --no-probe): cilium_host tx, cilium_net rx, then the
    overlay, as a Cilium node's own traffic goes. The node sends it from its router IP (the
    address on cilium_host the route names), which `node/node-1` includes: every packet
    judged, the answer OK."""
    n1 = node(cil, "node-1")
    stop = threading.Event()
    pinger = threading.Thread(target=_ping_from, args=(n1["netns"], None, pod(cil, "pod-2-1")["ip"], stop))
    pinger.start()
    try:
        rc, doc, err = _flow_json("node/node-1", "pod-2-1", "--no-probe", "--duration", "6")
    finally:
        stop.set()
        pinger.join()
    assert doc, err
    want = [("node-1", None, "cilium_host", "tx"), ("node-1", None, "cilium_net", "rx"),
            ("node-1", None, "cilium_vxlan", "tx"), ("node-1", None, "eth0", "tx"),
            ("node-2", None, "cilium_vxlan", "rx"), ("node-2", "default/pod-2-1", "eth0", "rx")]
    full = [p for p in doc["packets"] if p["direction"] == "request" and _in_order(_path(p), want)]
    assert full, [_path(p) for p in doc["packets"][:4]]
    assert all(p["verdict"]["status"] == "delivered" for p in full)
    assert {p["hops"][0]["src"] for p in full} == {n1["router_ip"]}, full[0]["hops"][0]
    assert rc == 0, (doc["verdict"], err)


# ---------------------------------------------------------------------------------------
# lab break/fix on the cilium lab

def _ping_same_node_2(doc, timeout):
    return _ping(doc, "pod-2-1", "pod-2-2", timeout)


def check_ip_forward_cilium(doc):
    assert _sysctl(node(doc, "node-1")["netns"], "net/ipv4/ip_forward") == "0"
    # No bridge: even same-node pod traffic is routed, so only node-1 is hit.
    assert _ping_same_node_2(doc, OK)


# The flannel lab's scenarios that do not apply to cilium (its registry says why).
REFUSED = {name for name in scenarios.names() if scenarios.unsupported("cilium", name)}
# The flannel lab's probes and checks, but for what cilium does not have (refused) and
# ip_forward, which cilium's datapath needs on other devices.
CILIUM_SCENARIOS = {**{k: v for k, v in SCENARIOS.items() if k not in REFUSED},
                    "ip-forward-off": (_ping_1_to_2, check_ip_forward_cilium)}


def test_every_scenario_is_applicable_or_refused():
    refused = set(REFUSED)
    assert sorted(set(CILIUM_SCENARIOS) | refused) == sorted(scenarios.names())
    assert not set(CILIUM_SCENARIOS) & refused


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_flannel_only_scenarios_are_refused(cil, name):
    before = snapshot(cil, conntrack=False)
    res = run_cli("lab", "break", name, prefix=PREFIX)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name} does not apply to the cilium lab" in lines[0]
    assert scenarios.broken(PREFIX) == {}
    assert snapshot(cil, conntrack=False) == before


@pytest.mark.parametrize("name", todays_share(list(CILIUM_SCENARIOS), 2))    # half each day (tests/conftest.py)
def test_break_then_fix(cil, name):
    probe, check, *pre = CILIUM_SCENARIOS[name]
    break_check_fix(cil, PREFIX, name, probe, check, *pre)


# ---------------------------------------------------------------------------------------
# Lifecycle: nothing left behind

def test_up_twice_down_twice_leave_machine_as_found():
    build.down(UPDOWN_PREFIX)
    before = machine_snapshot(UPDOWN_PREFIX)
    try:
        started = time.monotonic()
        first = run_cli("lab", "up", "--cni", "cilium", prefix=UPDOWN_PREFIX)
        up_s = time.monotonic() - started
        assert first.returncode == 0, first.stderr
        assert f"lab {UPDOWN_PREFIX} is up" in first.stdout and "cilium" in first.stdout
        doc = build.status(UPDOWN_PREFIX)
        assert doc["cni"] == "cilium"
        second = run_cli("lab", "up", "--cni", "cilium", prefix=UPDOWN_PREFIX)
        assert second.returncode == 0 and "already up" in second.stdout
        assert build.status(UPDOWN_PREFIX) == doc
        assert tcp_ask(f"{UPDOWN_PREFIX}-pod-1-1", "10.96.0.10", 80) == "pod-2-2"
        third = run_cli("lab", "down", prefix=UPDOWN_PREFIX)
        assert third.returncode == 0 and "removed" in third.stdout, third.stderr
        assert machine_snapshot(UPDOWN_PREFIX) == before
        assert not (T.default_state_root() / UPDOWN_PREFIX).exists()
        fourth = run_cli("lab", "down", prefix=UPDOWN_PREFIX)
        assert fourth.returncode == 0 and "nothing to remove" in fourth.stdout
        assert machine_snapshot(UPDOWN_PREFIX) == before
        assert up_s < 30
    finally:
        build.down(UPDOWN_PREFIX)


def test_interrupted_cilium_up_rolls_back():
    """Ctrl-C right after the nodes are configured (the cilium-specific step) removes it all."""
    build.down(UPDOWN_PREFIX)
    before = machine_snapshot(UPDOWN_PREFIX)
    proc = subprocess.Popen(cli_argv("lab", "up", "--cni", "cilium"),
                            env=cli_env(UPDOWN_PREFIX, PODTRACE_LAB_PAUSE_AFTER="nodes"), cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or "paused after nodes" in line:
                break
        assert machine_snapshot(UPDOWN_PREFIX)[0]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert machine_snapshot(UPDOWN_PREFIX) == before
        assert not Path(T.default_state_root() / UPDOWN_PREFIX).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        build.down(UPDOWN_PREFIX)
