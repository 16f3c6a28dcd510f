"""`podtrace lab up --ip-family dual` on a real kernel: every pod and Service has an IPv4 and
an IPv6 address (IPv4 first), one flannel.1 over the IPv4 underlay carries both families;
the status document and the inventory say so as Kubernetes does; `lab break --ip-family 6`
breaks the IPv6 side only and `fix` restores it.

One lab, built once for the module (prefix `pttestds`), removed at its end whatever happens.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.lab_fixture import node, ping, pod, private_lab, run_cli, service, tcp_ask, udp_ask
from tests.integration.test_lab_ipv6 import (FAIL, OK, V6_SCENARIOS, break_check_fix6, curl6, ping6,
                                             tcp6_ask, udp6_ask, v6)
from tracer.lab import scenarios

pytestmark = pytest.mark.integration

PREFIX = "pttestds"


@pytest.fixture(scope="module")
def dual():
    with private_lab(PREFIX, ip_family="dual") as doc:
        yield doc


def test_status_document_dual(dual):
    assert dual["ip_family"] == "dual" and dual["ip_families"] == ["ipv4", "ipv6"]
    assert dual["underlay_cidr"] == "172.30.0.0/24" and dual["cluster_cidr"] == "10.244.0.0/16"
    assert dual["cluster_cidrs"] == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert dual["service_cidrs"] == ["10.96.0.0/16", "fd00:10:96::/112"]
    assert dual["pod_mtu"] == 1450
    for p in dual["pods"]:
        i, j = int(p["name"].split("-")[1]), int(p["name"].split("-")[2])
        assert p["ips"] == [f"10.244.{i}.{1 + j}", f"fd00:10:244:{i:x}::{1 + j:x}"]
        assert p["ip"] == p["ips"][0]
    web = service(dual, "web")
    assert web["cluster_ips"] == ["10.96.0.10", "fd00:10:96::10"] and web["cluster_ip"] == "10.96.0.10"
    assert web["backend_ips_by_family"]["ipv6"] == ["fd00:10:244:2::3"]
    chains = web["ports"][0]["endpoint_chains_by_family"]
    assert chains["ipv4"] == web["ports"][0]["endpoint_chains"] and chains["ipv6"] != chains["ipv4"]
    res = run_cli("lab", "status", "-o", "json", prefix=PREFIX)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == dual
    table = run_cli("lab", "status", prefix=PREFIX).stdout
    assert "fd00:10:96::10" in table and "fd00:10:244:1::2" in table


def test_inventory_dual(dual):
    inv = json.loads(open(dual["inventory"]).read())
    pods = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Pod"}
    st = pods["pod-2-2"]["status"]
    assert st["podIP"] == "10.244.2.3"
    assert st["podIPs"] == [{"ip": "10.244.2.3"}, {"ip": "fd00:10:244:2::3"}]
    nodes = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Node"}
    assert nodes["node-1"]["spec"]["podCIDRs"] == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    svc = next(i for i in inv["items"] if i["kind"] == "Service" and i["metadata"]["name"] == "web")
    assert svc["spec"]["clusterIPs"] == ["10.96.0.10", "fd00:10:96::10"]
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert svc["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    slices = [i for i in inv["items"] if i["kind"] == "EndpointSlice"
              and i["metadata"]["labels"]["kubernetes.io/service-name"] == "web"]
    by_type = {s["addressType"]: s for s in slices}
    assert set(by_type) == {"IPv4", "IPv6"} and len(slices) == 2
    assert by_type["IPv6"]["endpoints"][0]["addresses"] == ["fd00:10:244:2::3"]
    assert by_type["IPv4"]["endpoints"][0]["addresses"] == ["10.244.2.3"]


def test_both_families_across_nodes_and_to_services(dual):
    src = pod(dual, "pod-1-1")["netns"]
    for name in ("pod-2-1", "pod-2-2"):
        ip4, ip6 = pod(dual, name)["ips"]
        assert ping(src, ip4) == ip4 and ping6(src, ip6) == ip6
        assert tcp_ask(src, ip4, 8080) == name and tcp6_ask(src, ip6, 8080) == name
        assert udp6_ask(src, ip6, 8080) == (name, ip6)
        assert curl6(src, ip6, 8080) == name
    web4, web6 = service(dual, "web")["cluster_ips"]
    assert tcp_ask(src, web4, 80) == "pod-2-2" and udp_ask(src, web4, 80) == "pod-2-2"
    assert tcp6_ask(src, web6, 80) == "pod-2-2" and udp6_ask(src, web6, 80) == ("pod-2-2", web6)
    assert curl6(src, web6, 80) == "pod-2-2"
    # Over the IPv4 underlay: the node's uplink has no global IPv6 address.
    n1 = node(dual, "node-1")
    assert n1["ips"] == [n1["ip"]] == ["172.30.0.11"]


def test_break_ipv6_side_leaves_ipv4_working(dual):
    src = pod(dual, "pod-1-1")["netns"]
    ip4, ip6 = pod(dual, "pod-2-1")["ips"]
    out = scenarios.break_scenario("no-route", prefix=PREFIX, family=6)
    try:
        assert "--ip-family 6" in out.show
        assert ping6(src, ip6, FAIL) is None
        assert ping(src, ip4, OK) == ip4
    finally:
        scenarios.fix_scenario("no-route", prefix=PREFIX)
    assert ping6(src, ip6) == ip6


@pytest.mark.parametrize("name", V6_SCENARIOS)
def test_ipv6_scenario_breaks_and_fix_restores(dual, name):
    break_check_fix6(dual, PREFIX, name, family=6)


def test_default_family_is_the_first_and_json_lists_families(dual):
    out = scenarios.break_scenario("netpol-drop", prefix=PREFIX)
    try:
        assert "10.244.2.2" in out.changes[0] and "--ip-family" not in out.show
        src = pod(dual, "pod-1-1")["netns"]
        assert ping6(src, v6(pod(dual, "pod-2-1")["ips"])) is not None
    finally:
        scenarios.fix_scenario("netpol-drop", prefix=PREFIX)
    rows = json.loads(run_cli("lab", "scenarios", "-o", "json", prefix=PREFIX).stdout)
    fams = {r["name"]: r["families"] for r in rows}
    assert fams["conntrack-full"] == ["ipv4"] and fams["no-route"] == ["ipv4", "ipv6"]
    res = run_cli("lab", "break", "conntrack-full", "--ip-family", "6", prefix=PREFIX)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
