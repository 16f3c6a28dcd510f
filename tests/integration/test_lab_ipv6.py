"""`podtrace lab up --ip-family ipv6` on a real kernel: IPv6-only pods over VXLAN on an IPv6
underlay, ip6tables Services, the status document, and every IPv6 `lab break` scenario
breaking traffic and `fix` putting the lab back exactly as it was.

One flannel and one cilium lab, each built once for the module (prefixes `pttest6`,
`pttest6c`) and removed at its end, also when a test fails. The helpers here (ICMPv6 echo,
TCP/UDP over IPv6, snapshots of the IPv6 state) serve test_lab_dual.py too.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess

import pytest

from tests.integration.lab_fixture import node, pod, private_lab, run_cli, service
from tracer.lab import scenarios
from tracer.node import netns

pytestmark = pytest.mark.integration

PREFIX = "pttest6"
CIL_PREFIX = "pttest6c"
OK = 2.0
FAIL = 0.5
V6_SCENARIOS = ("netpol-drop", "ip-forward-off", "no-route", "mtu-blackhole", "neigh-wrong")
_seq = iter(range(1, 1 << 16))


@pytest.fixture(scope="module")
def lab6():
    with private_lab(PREFIX, ip_family="ipv6") as doc:
        yield doc


@pytest.fixture(scope="module")
def cil6():
    with private_lab(CIL_PREFIX, cni="cilium", ip_family="ipv6") as doc:
        yield doc


# ---------------------------------------------------------------------------------------
# IPv6 traffic from inside a namespace

def ping6(ns: str, ip: str, timeout: float = OK, size: int = 0) -> str | None:
    """One ICMPv6 echo from inside `ns` (a `size`-byte IPv6 packet when given, never
    fragmented): the reply's source address, or None when no reply came."""
    sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.settimeout(timeout)
    # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO: too big for the route is an error, not fragments.
    sock.setsockopt(socket.IPPROTO_IPV6, 23, 2)
    ident, seq = (os.getpid() + next(_seq)) & 0xFFFF, next(_seq)
    payload = b"podtrace-lab-test"
    if size:
        payload = payload.ljust(size - 48, b".")
    # The kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket.
    packet = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
    try:
        sock.sendto(packet, (ip, 0))
        while True:
            data, addr = sock.recvfrom(65535)
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if typ == 129 and rid == ident and rseq == seq:
                return addr[0]
    except (socket.timeout, TimeoutError, OSError):
        return None
    finally:
        sock.close()


def tcp6_ask(ns: str, ip: str, port: int, timeout: float = OK) -> str:
    sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
        data = b""
        while chunk := sock.recv(256):
            data += chunk
        return data.decode().strip()
    finally:
        sock.close()


def udp6_ask(ns: str, ip: str, port: int, timeout: float = OK) -> tuple[str, str]:
    """(the answer, the address it came from)."""
    sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(b"who are you?", (ip, port))
        data, peer = sock.recvfrom(256)
        return data.decode().strip(), peer[0]
    finally:
        sock.close()


def curl6(ns: str, ip: str, port: int) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-g", "-s", "-m", str(OK),
                          f"http://[{ip}]:{port}/"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def v6(addrs: list[str]) -> str:
    return next(a for a in addrs if ":" in a)


# ---------------------------------------------------------------------------------------
# What an IPv6 scenario may touch, to compare before the break and after the fix

def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def _sysctls(ns: str) -> dict:
    with netns.entered(ns):
        base = "/proc/sys/net/ipv6/conf"
        return {c: open(f"{base}/{c}/forwarding").read().strip() for c in sorted(os.listdir(base))}


def snapshot6(doc: dict) -> dict:
    snap = {}
    for n in doc["nodes"]:
        ns = n["netns"]
        save = _out(["ip", "netns", "exec", ns, "ip6tables-save"])
        snap[ns] = {
            "ip6tables": [line for line in save.splitlines() if line[:1] in ("*", ":", "-")
                          and not line.startswith("#")],
            # As a set: toggling forwarding re-adds the kernel's anycast routes in another order.
            "routes": sorted(_out(["ip", "-n", ns, "-6", "route", "show", "table", "all"]).splitlines()),
            "neigh": _out(["ip", "-n", ns, "-6", "neigh", "show", "nud", "permanent"]),
            "forwarding": _sysctls(ns),
        }
        snap[ns]["ip6tables"] = [line.split(" [")[0] if line.startswith(":") else line
                                 for line in snap[ns]["ip6tables"]]
    links = json.loads(_out(["ip", "-n", doc["fabric_netns"], "-j", "link", "show"]))
    snap["fabric"] = {link["ifname"]: link["mtu"] for link in links}
    return snap


def probe_for(doc: dict, name: str, family_of_pods=v6):
    """The traffic a scenario breaks: from pod-1-1 to pod-2-1 (full size for mtu-blackhole)."""
    src = pod(doc, "pod-1-1")["netns"]
    dst = family_of_pods(pod(doc, "pod-2-1")["ips"])
    size = doc["pod_mtu"] if name == "mtu-blackhole" else 0
    return lambda timeout: ping6(src, dst, timeout, size) is not None


def break_check_fix6(doc: dict, prefix: str, name: str, family: int | None = None) -> None:
    probe = probe_for(doc, name)
    assert probe(OK), f"{name}: IPv6 traffic does not work before the break"
    before = snapshot6(doc)
    out = scenarios.break_scenario(name, prefix=prefix, family=family)
    try:
        assert out.changed and out.changes, out
        assert name in scenarios.broken(prefix)
        assert not probe(FAIL), f"{name}: IPv6 traffic still works while broken"
        if name == "mtu-blackhole":   # small packets still pass
            src, dst = pod(doc, "pod-1-1")["netns"], v6(pod(doc, "pod-2-1")["ips"])
            assert ping6(src, dst) is not None
    finally:
        fixed = scenarios.fix_scenario(name, prefix=prefix)
    assert fixed.changed
    assert name not in scenarios.broken(prefix)
    assert snapshot6(doc) == before
    assert probe(OK), f"{name}: IPv6 traffic does not work after the fix"


# ---------------------------------------------------------------------------------------
# The flannel ipv6 lab

def test_status_document_ipv6(lab6):
    assert lab6["ip_family"] == "ipv6" and lab6["ip_families"] == ["ipv6"]
    assert lab6["underlay_cidr"] == "fd00:172:30::/64"
    assert lab6["cluster_cidrs"] == ["fd00:10:244::/56"] and lab6["service_cidrs"] == ["fd00:10:96::/112"]
    assert lab6["pod_mtu"] == 1430
    for n in lab6["nodes"]:
        i = n["index"]
        assert n["ip"] == f"fd00:172:30::{i:x}" and n["pod_cidrs"] == [f"fd00:10:244:{i:x}::/64"]
    for p in lab6["pods"]:
        assert p["ips"] == [p["ip"]] and ":" in p["ip"]
    assert service(lab6, "web")["cluster_ips"] == ["fd00:10:96::10"] == [service(lab6, "web")["cluster_ip"]]
    res = run_cli("lab", "status", "-o", "json", prefix=PREFIX)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == lab6


def test_inventory_ipv6(lab6):
    inv = json.loads(open(lab6["inventory"]).read())
    pods = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Pod"}
    assert pods["pod-1-1"]["status"]["podIPs"] == [{"ip": "fd00:10:244:1::2"}]
    svc = next(i for i in inv["items"] if i["kind"] == "Service" and i["metadata"]["name"] == "web")
    assert svc["spec"]["clusterIPs"] == ["fd00:10:96::10"]
    assert svc["spec"]["ipFamilies"] == ["IPv6"] and svc["spec"]["ipFamilyPolicy"] == "SingleStack"
    slices = [i for i in inv["items"] if i["kind"] == "EndpointSlice"]
    assert {s["addressType"] for s in slices} == {"IPv6"} and len(slices) == 2


def test_underlay_is_ipv6(lab6):
    n1 = node(lab6, "node-1")
    link = json.loads(_out(["ip", "-n", n1["netns"], "-d", "-j", "link", "show", "flannel.1"]))[0]
    assert link["linkinfo"]["info_data"].get("local6", link["linkinfo"]["info_data"].get("local")) == n1["ip"]
    fdb = _out(["bridge", "-n", n1["netns"], "fdb", "show", "dev", "flannel.1"])
    assert f"dst {node(lab6, 'node-2')['ip']}" in fdb


@pytest.mark.parametrize("fixture", ["lab6", "cil6"])
def test_ipv6_traffic_across_nodes_and_to_services(fixture, request):
    doc = request.getfixturevalue(fixture)
    src = pod(doc, "pod-1-1")["netns"]
    for name in ("pod-1-2", "pod-2-1", "pod-2-2"):
        ip = pod(doc, name)["ip"]
        assert ping6(src, ip) == ip
        assert tcp6_ask(src, ip, 8080) == name
        assert udp6_ask(src, ip, 8080) == (name, ip)
        assert curl6(src, ip, 8080) == name
    web = service(doc, "web")["cluster_ip"]
    assert tcp6_ask(src, web, 80) == "pod-2-2"
    assert udp6_ask(src, web, 80) == ("pod-2-2", web)      # the reply is un-DNATed
    assert curl6(src, web, 80) == "pod-2-2"
    assert curl6(pod(doc, "pod-2-1")["netns"], web, 80) == "pod-2-2"   # same node
    echo = service(doc, "echo")["cluster_ip"]
    seen = {tcp6_ask(src, echo, 80) for _ in range(40)}
    assert seen == {p["name"] for p in doc["pods"]}


@pytest.mark.parametrize("name", V6_SCENARIOS)
def test_ipv6_scenario_breaks_and_fix_restores(lab6, name):
    break_check_fix6(lab6, PREFIX, name)


@pytest.mark.parametrize("name", [n for n in V6_SCENARIOS if n != "neigh-wrong"])
def test_ipv6_scenario_breaks_and_fix_restores_cilium(cil6, name):
    break_check_fix6(cil6, CIL_PREFIX, name)


def test_ipv4_only_scenarios_refuse_an_ipv6_lab_in_one_line(lab6):
    res = run_cli("lab", "break", "conntrack-full", prefix=PREFIX)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "IPv6" in lines[0], res.stderr
    res = run_cli("lab", "break", "no-route", "--ip-family", "4", prefix=PREFIX)
    assert res.returncode == 2 and "IPv6 pods only" in res.stderr
    assert not scenarios.broken(PREFIX)


def test_scenarios_listing_on_an_ipv6_lab(lab6):
    res = run_cli("lab", "scenarios", "-o", "json", prefix=PREFIX)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sorted(r["name"] for r in rows) == sorted(V6_SCENARIOS)
    assert all(r["families"] == ["ipv4", "ipv6"] and r["flow"] for r in rows)
