"""IPv6 and dual-stack resolution: literals typed as SRC/DST (normalised, or refused in one
line), an inventory that keeps podIPs/clusterIPs/InternalIPs and EndpointSlices of both
families, the family a flow takes (--ip-family), and capture selections of IPv6 addresses."""

from __future__ import annotations

import pytest

from tracer.cluster import endpoints, inventory, names
from tracer.cluster.inventory import Inventory
from tracer.errors import BadInput
from tracer.runs import selection


@pytest.mark.parametrize("spec,key", [
    ("fd00:10:244:1::2", "fd00:10:244:1::2"),
    ("FD00:0010:0244:0001:0000:0000:0000:0002", "fd00:10:244:1::2"),
    (" 2001:db8::1 ", "2001:db8::1"),
    ("::1", "::1"),
    ("10.244.1.2", "10.244.1.2"),
])
def test_address_literals_are_normalised(spec, key):
    assert names.parse(spec) == names.Name("ip", key)


@pytest.mark.parametrize("spec,says", [
    ("fd00::1::2", "not a valid IPv6 address"),
    ("fd00:10:244:1::zz", "not a valid IPv6 address"),
    ("1:2:3:4:5:6:7:8:9", "not a valid IPv6 address"),
    ("fe80::1%eth0", "scoped"),
    ("fd00::1%2", "scoped"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("::", "unspecified"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("999.1.1.1", "not a valid IPv4 address"),
    ("[fd00::1]:8080", "an address with a port"),
    ("10.244.1.2:8080", "an address with a port"),
])
def test_bad_address_literals_are_one_line(spec, says):
    with pytest.raises(BadInput) as exc:
        names.parse(spec)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_v4_mapped_is_the_ipv4_address_with_a_note(capsys):
    names._NOTED.clear()
    assert names.parse("::ffff:10.244.1.2") == names.Name("ip", "10.244.1.2")
    names.parse("::ffff:10.244.1.2")      # parsed again: noted once
    err = capsys.readouterr().err
    assert err.count("IPv4-mapped") == 1 and "10.244.1.2" in err
    notes: list[str] = []
    assert names.address("::ffff:a0a:101", notes=notes) == "10.10.1.1" and notes


def _dual_items() -> list[dict]:
    return [
        {"kind": "Node", "metadata": {"name": "node-1"},
         "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
         "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"},
                                  {"type": "InternalIP", "address": "fd00:172:30::11"},
                                  {"type": "Hostname", "address": "node-1"}]}},
        {"kind": "Pod", "metadata": {"name": "a", "namespace": "default"}, "spec": {"nodeName": "node-1"},
         "status": {"podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1:0::2"}]}},
        {"kind": "Pod", "metadata": {"name": "b", "namespace": "default"}, "spec": {"nodeName": "node-1"},
         "status": {"podIP": "10.244.1.3", "podIPs": [{"ip": "10.244.1.3"}, {"ip": "fd00:10:244:1::3"}]}},
        {"kind": "Pod", "metadata": {"name": "six", "namespace": "default"}, "spec": {"nodeName": "node-1"},
         "status": {"podIP": "fd00:10:244:1::9", "podIPs": [{"ip": "fd00:10:244:1::9"}]}},
        {"kind": "Pod", "metadata": {"name": "four", "namespace": "default"}, "spec": {"nodeName": "node-1"},
         "status": {"podIP": "10.244.1.8"}},
        {"kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
                  "ports": [{"port": 80, "protocol": "TCP"}], "selector": {"app": "web"}}},
        {"kind": "EndpointSlice", "metadata": {"name": "web-v4", "namespace": "default",
                                               "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.3"], "targetRef": {"kind": "Pod", "name": "b"}}]},
        {"kind": "EndpointSlice", "metadata": {"name": "web-v6", "namespace": "default",
                                               "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv6",
         "endpoints": [{"addresses": ["FD00:10:244:1::3"], "targetRef": {"kind": "Pod", "name": "b"}}]},
        {"kind": "EndpointSlice", "metadata": {"name": "web-fqdn", "namespace": "default",
                                               "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]},
    ]


@pytest.fixture
def dual() -> Inventory:
    return inventory.from_items(_dual_items(), source="test")


def test_inventory_keeps_every_family(dual):
    a = dual.pods["default/a"]
    assert a.ip == "10.244.1.2" and a.ips == ["10.244.1.2", "fd00:10:244:1::2"]
    web = dual.services["default/web"]
    assert web.cluster_ip == "10.96.0.10" and web.cluster_ips == ["10.96.0.10", "fd00:10:96::a"]
    assert web.backends == ["default/b"] and web.backend_ips == ["10.244.1.3", "fd00:10:244:1::3"]
    node = dual.nodes["node-1"]
    assert node.ip == "172.30.0.11" and node.internal_ips() == ["172.30.0.11", "fd00:172:30::11"]
    assert dual.pods["default/four"].ips == ["10.244.1.8"]      # no podIPs: podIP alone
    assert dual.lookup_ip("fd00:10:244:1::2") == ("pod", "default/a")
    assert dual.lookup_ip("fd00:10:96::a") == ("service", "default/web")
    assert dual.lookup_ip("fd00:172:30::11") == ("node", "node-1")
    assert dual.by_ip()["fd00:10:244:1::3"] == ("pod", "default/b")
    assert dual.cidr_owner("fd00:10:244:1::77").name == "node-1"


def test_watch_events_keep_the_secondary_address_indexed(dual):
    obj = _dual_items()[1]
    obj["status"] = {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}]}
    dual.apply("MODIFIED", obj)
    assert dual.lookup_ip("fd00:10:244:1::5") == ("pod", "default/a")
    assert dual.lookup_ip("fd00:10:244:1::2") == (None, None)
    dual.apply("DELETED", obj)
    assert dual.lookup_ip("fd00:10:244:1::5") == (None, None)


def test_a_stale_pod_ips_list_yields_to_pod_ip():
    pod = inventory.pod_from_obj({"metadata": {"name": "x"}, "status": {
        "podIP": "10.244.2.7", "podIPs": [{"ip": "10.244.1.2"}]}})
    assert pod.ips == ["10.244.2.7"]


def test_ipv4_inventory_is_unchanged(inv):
    for p in inv.pods.values():
        assert p.ips == ([p.ip] if p.ip else [])
    for s in inv.services.values():
        assert s.cluster_ips == ([s.cluster_ip] if s.cluster_ip else [])


def _flow_ends(inv, src, dst, wanted=None):
    s, d = endpoints.resolve(src, inv), endpoints.resolve(dst, inv)
    fam = endpoints.choose_family(s, d, wanted)
    return fam, endpoints.in_family(s, fam), endpoints.in_family(d, fam)


def test_family_default_is_the_source_pods_first(dual):
    fam, s, d = _flow_ends(dual, "a", "b")
    assert (fam, s.ip, d.ip) == (4, "10.244.1.2", "10.244.1.3")
    fam, s, d = _flow_ends(dual, "a", "six")        # DST has IPv6 only
    assert (fam, s.ip, d.ip) == (6, "fd00:10:244:1::2", "fd00:10:244:1::9")
    fam, s, d = _flow_ends(dual, "a", "fd00:10:244:1::3")   # a typed address fixes the family
    assert (fam, s.ip, d.pod.key) == (6, "fd00:10:244:1::2", "default/b")


def test_ip_family_picks_the_addresses_and_service_backends(dual):
    fam, s, d = _flow_ends(dual, "a", "svc/web", 6)
    assert (s.ip, d.ip) == ("fd00:10:244:1::2", "fd00:10:96::a")
    assert d.addresses() == ["fd00:10:96::a", "fd00:10:244:1::3"]
    _, _, d4 = _flow_ends(dual, "a", "svc/web", 4)
    assert d4.addresses() == ["10.96.0.10", "10.244.1.3"]
    _, s, d = _flow_ends(dual, "a", "node/node-1", 6)
    assert d.ip == "fd00:172:30::11"


@pytest.mark.parametrize("src,dst,wanted,says", [
    ("four", "six", None, "four (IPv4 only) and six (IPv6 only) share no address family"),
    ("four", "fd00:10:244:1::2", None, "share no address family"),
    ("four", "b", 6, "--ip-family 6: four has no IPv6 address (IPv4 only)"),
    ("a", "10.244.1.3", 6, "--ip-family 6: 10.244.1.3 has no IPv6 address"),
])
def test_no_common_family_is_one_line(dual, src, dst, wanted, says):
    with pytest.raises(BadInput) as exc:
        _flow_ends(dual, src, dst, wanted)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_capture_selection_takes_ipv6(dual):
    sel = selection.Selection(pods=["default/a"], cidrs=["FD00:10:244:2::/64", "fd00::5"])
    r = selection.resolve(sel, dual)
    assert r.addrs == ["10.244.1.2", "fd00:10:244:1::2"]
    assert r.cidrs == ["fd00::5/128", "fd00:10:244:2::/64"]
    r6 = selection.resolve(selection.Selection(services=["default/web"], family=6), dual)
    assert r6.addrs == ["fd00:10:96::a", "fd00:10:244:1::3"]
    r4 = selection.resolve(selection.Selection(nodes=["node-1"], family=4), dual)
    assert r4.cidrs == ["10.244.1.0/24"] and r4.addrs == ["172.30.0.11"]
    every = selection.resolve(selection.Selection(), dual)
    assert every.cidrs == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    all6 = selection.resolve(selection.Selection(all_traffic=True, family=6), dual)
    assert all6.cidrs == ["::/0"] and not all6.any_addr
    mapped = selection.resolve(selection.Selection(cidrs=["::ffff:10.244.1.0/120"]), dual)
    assert mapped.cidrs == ["10.244.1.0/24"]


@pytest.mark.parametrize("sel,says", [
    (selection.Selection(cidrs=["fe80::1%eth0"]), "scoped"),
    (selection.Selection(cidrs=["fd00::/129"]), "not an IPv4 or IPv6 address or CIDR"),
    (selection.Selection(cidrs=["fd00::/64"], family=4), "IPv6 CIDR and --ip-family is 4"),
    (selection.Selection(pods=["default/four"], family=6), "no IPv6 address"),
])
def test_capture_selection_refuses(dual, sel, says):
    with pytest.raises(BadInput) as exc:
        selection.resolve(sel, dual)
    assert says in str(exc.value)


def _v6_plan(dual, src, dst, **kw):
    from tracer.config import FlowConfig
    from tracer.reconstruct import packets
    from tracer.runs import plan as planner

    cfg = FlowConfig(src=src, dst=dst, **kw)
    s, d, _fam = planner.resolve_ends(cfg, dual)
    proto, port, notes = planner.choose_proto(cfg, d)
    return planner.Plan(cfg, dual, None, object(), s, d, proto, port, notes, packets.Placement(), {}, {},
                        sorted(set(s.addresses() + d.addresses())), 0.0)


def test_plan_of_an_ipv6_flow_asks_for_ipv6_addresses(dual):
    from tracer.runs import plan as planner

    p = _v6_plan(dual, "a", "svc/web", ip_family=6)
    assert p.addrs == sorted(["fd00:10:244:1::2", "fd00:10:96::a", "fd00:10:244:1::3"])
    reqs = planner.agent_requests(p)
    assert reqs[0].probe.src == "fd00:10:244:1::2" and reqs[0].probe.dst == "fd00:10:96::a"
    assert reqs[0].probe.proto == "tcp" and reqs[0].probe.port == 80
    assert set(reqs[0].discover.pod_ips) == {"10.244.1.2", "fd00:10:244:1::2", "10.244.1.3", "fd00:10:244:1::3"}
    assert "fd00:172:30::11" in reqs[0].discover.node_ips
    p4 = _v6_plan(dual, "a", "svc/web")
    assert p4.addrs == ["10.244.1.2", "10.244.1.3", "10.96.0.10"]


def test_ipv6_size_floor(dual):
    with pytest.raises(BadInput, match="below an IPv6 probe's headers"):
        _v6_plan(dual, "a", "six", size=50)


def test_ip_family_option_reads_4_6_ipv4_ipv6():
    from click.testing import CliRunner
    import click

    from tracer.cli.options import ip_family_option

    @click.command()
    @ip_family_option("x")
    def cmd(ip_family):
        click.echo(repr(ip_family))

    r = CliRunner()
    assert [r.invoke(cmd, a).output.strip() for a in ([], ["--ip-family", "6"], ["--ip-family", "IPv4"])] \
        == ["None", "6", "4"]
    assert r.invoke(cmd, ["--ip-family", "5"]).exit_code == 2


def test_the_api_finds_a_dual_stack_objects_second_address(tmp_path):
    """status.podIP / spec.clusterIP selectors match the first address only: an IPv6 second
    address is found in podIPs / clusterIPs."""
    from tests.fakeapi import FakeApi
    from tracer.cluster import api as kube
    from tracer.cluster import fetch

    with FakeApi(_dual_items()) as fake:
        conn = kube.connect(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        inv, streams = fetch.inventory_for(conn, ["fd00:10:244:1::2"])
        assert inv.lookup_ip("fd00:10:244:1::2") == ("pod", "default/a")
        assert endpoints.resolve("fd00:10:244:1::2", inv).pod.key == "default/a"
        assert any(s.field_selector == "metadata.name=a" for s in streams)
        inv, _ = fetch.inventory_for(conn, ["fd00:10:96::a"])
        ep = endpoints.resolve("fd00:10:96::a", inv)
        assert ep.service.key == "default/web" and ep.addresses() == ["fd00:10:96::a", "fd00:10:244:1::3"]
        inv, _ = fetch.inventory_for(conn, ["fd00:10:244:1::9"])     # IPv6 first: the selector finds it
        assert endpoints.resolve("fd00:10:244:1::9", inv).pod.key == "default/six"


def test_a_headless_service_has_no_address_whatever_clusterips_says():
    svc = inventory.service_from_obj({"metadata": {"name": "h"}, "spec": {"clusterIP": "None",
                                                                          "clusterIPs": ["10.96.0.10"]}})
    assert svc.cluster_ip is None and svc.cluster_ips == []
    svc = inventory.service_from_obj({"metadata": {"name": "h"}, "spec": {"clusterIPs": ["fd00:10:96::1"]}})
    assert svc.cluster_ip == "fd00:10:96::1"


@pytest.mark.parametrize("argv", [["flow", "a", "b", "--ip-family", "5"],
                                  ["capture", "--ip-family", "ipv5", "-d", "1"]])
def test_a_bad_ip_family_is_one_line(argv):
    from click.testing import CliRunner

    from tracer.cli import main

    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2 and len(res.output.splitlines()) == 1, res.output
    assert res.output.startswith("podtrace: ") and "--ip-family" in res.output
