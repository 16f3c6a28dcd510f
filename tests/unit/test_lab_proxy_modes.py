"""kube-proxy's nftables and ipvs modes in the lab, planned without privileges; the
nftables facts podtrace reads from kube-proxy's table."""

from __future__ import annotations

import pytest

from tracer.errors import BadInput
from tracer.lab import kubeproxy_ipvs as V
from tracer.lab import kubeproxy_nft as N
from tracer.lab import topology as T
from tracer.lab.build import proxy_step
from tracer.node import nftfacts


def _plan(**kw):
    return T.plan(T.LabConfig(prefix="px", **kw))


def test_proxy_mode_is_validated_and_defaults_to_iptables():
    assert T.LabConfig(prefix="px").proxy == "iptables"
    with pytest.raises(BadInput, match="unknown kube-proxy mode 'userspace'"):
        T.LabConfig(prefix="px", proxy="userspace")
    doc = T.status_document(_plan(proxy="nftables"))
    assert doc["proxy"] == "nftables"
    assert "nftables" in proxy_step(_plan(proxy="nftables"), "x")
    assert proxy_step(_plan(), "x") == "x"


def test_chain_names_are_kube_proxys():
    # kube-proxy's own examples (pkg/proxy/nftables/proxier.go)
    assert N.service_chain("ns1", "svc1", "TCP", "p80") == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert (N.endpoint_chain("ns1", "svc1", "tcp", "p80", "10.180.0.1", 80)
            == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80")
    assert N.endpoint_chain("a", "b", "udp", "p", "fd00:10:244:2::3", 8080).endswith("__fd00.10.244.2..3/8080")


def test_ruleset_has_the_table_maps_and_one_chain_per_port_and_endpoint():
    topo = _plan()
    text = N.ruleset(topo, 4)
    assert text.startswith("table ip kube-proxy {")
    web = next(s for s in topo.services if s.name == "web")
    backend = web.backends[0].ip
    for needle in ("map service-ips", "map no-endpoint-services", "set cluster-ips",
                   "type filter hook forward priority -110", "type nat hook prerouting priority -100",
                   "counter reject", f"10.96.0.10 . tcp . 80 : goto {N.service_chain('default', 'web', 'TCP', 'http')}",
                   f"meta l4proto tcp dnat to {backend}:8080", "masquerade fully-random"):
        assert needle in text, needle
    six = N.ruleset(_plan(ip_family="dual"), 6)
    assert six.startswith("table ip6 kube-proxy {") and "dnat to [fd00:10:244:2::3]:8080" in six


def test_without_endpoints_moves_the_service_and_back():
    doc = T.status_document(_plan())
    web = next(s for s in doc["services"] if s["name"] == "web")
    gone, back = N.without_endpoints(web, 4)
    assert "delete element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80, 10.96.0.10 . udp . 80 }" in gone
    assert 'comment "default/web:http" : goto reject-chain' in gone
    assert gone.count("delete chain") == 4
    assert "delete element ip kube-proxy no-endpoint-services" in back
    assert back.count("  chain ") == 4 and "add element ip kube-proxy service-ips" in back


def test_reject_chain_hit_names_the_services_without_endpoints():
    listing = {"nftables": [
        {"map": {"family": "ip", "name": "no-endpoint-services", "table": "kube-proxy", "map": "verdict",
                 "elem": [[{"elem": {"val": {"concat": ["10.96.0.10", "tcp", 80]}, "comment": "default/web:http"}},
                           {"goto": {"target": "reject-chain"}}],
                          [{"elem": {"val": {"concat": ["10.96.0.10", "udp", 80]}, "comment": "default/web:udp"}},
                           {"goto": {"target": "reject-chain"}}]]}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "reject-chain", "handle": 3}},
        {"rule": {"family": "ip", "table": "kube-proxy", "chain": "reject-chain", "handle": 59,
                  "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"reject": None}]}},
    ]}
    before = nftfacts.rules(listing)
    listing["nftables"][2]["rule"]["expr"][0]["counter"]["packets"] = 3
    hits = nftfacts.hits(before, nftfacts.rules(listing))
    assert len(hits) == 1
    h = hits[0]
    assert (h["table"], h["chain"], h["target"], h["packets"]) == ("ip kube-proxy", "reject-chain", "REJECT", 3)
    assert h["comment"] == "default/web has no endpoints"


def test_ipvs_mode_programs_virtual_servers_ipsets_and_kube_ipvs0():
    topo = _plan(proxy="ipvs")
    vs = V.virtual_servers(topo, 4)
    backend = next(s for s in topo.services if s.name == "web").backends[0].ip
    assert "-A -t 10.96.0.10:80 -s rr" in vs
    assert f"-a -u 10.96.0.10:80 -r {backend}:8080 -m -w 1" in vs
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80 -exist" in V.ipsets(topo, 4)
    assert "addr add 10.96.0.10/32 dev kube-ipvs0" in V.device_batch(topo)
    rules = V.iptables_rules(topo, 4)
    assert "--match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT" in rules and "KUBE-SVC-" not in rules


PROC_IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60000A:0050 rr
UDP  0A60000A:0050 rr
  -> 0AF40203:1F90      Masq    0      0          1
TCP  0A600014:0050 rr
  -> 0AF40102:1F90      Masq    1      0          0
TCP  [fd00:0010:0096:0000:0000:0000:0000:0010]:0050 rr
"""


def test_proc_ip_vs_parsed_and_unserved_virtual_servers_found():
    from tracer.node import ipvsfacts

    vs = ipvsfacts.parse(PROC_IP_VS)
    assert [(v["proto"], v["vip"], v["port"], len(v["reals"])) for v in vs] == [
        ("tcp", "10.96.0.10", 80, 0), ("udp", "10.96.0.10", 80, 1), ("tcp", "10.96.0.20", 80, 1),
        ("tcp", "fd00:10:96::10", 80, 0)]
    assert vs[1]["reals"][0] == {"ip": "10.244.2.3", "port": 8080, "forward": "Masq", "weight": 0,
                                 "active": 0, "inactive": 1}
    assert ipvsfacts.unserved(vs, "10.96.0.10", 80, "tcp")["reals"] == []        # no real server
    assert ipvsfacts.unserved(vs, "10.96.0.10", 80, "udp") is not None           # weight 0 only
    assert ipvsfacts.unserved(vs, "10.96.0.20", 80, "tcp") is None               # served
    assert ipvsfacts.unserved(None, "10.96.0.10", 80, "tcp") is None             # no IPVS


def test_ipvs_virtual_server_without_real_servers_is_service_no_endpoints():
    from tests.unit.test_diagnose import bind, facts, hop
    from tracer.node import ipvsfacts
    from tracer.reconstruct import diagnose
    from tracer.reconstruct.model import FiveTuple, Packet, Verdict

    hops = (hop("node-1", "eth0", "tx", pod="default/a", dst="10.96.0.10"), hop("node-1", "cni0", "rx", dst="10.96.0.10"))
    v = Verdict("dropped", "node-1", "cni0", "drop", "NETFILTER_DROP", "nf_hook_slow", "generic", None)
    p = Packet("request", 1, FiveTuple("udp", "10.244.1.2", "10.96.0.10", 40000, 80), 1, 60, False, 0, None, hops, v)
    got = diagnose.explain(p, bind(p, (facts(ipvs=ipvsfacts.parse(PROC_IP_VS)), {})))
    assert got.cause == "service-no-endpoints" and got.runbook.endswith("service-no-endpoints.md")
    assert "IPVS virtual server 10.96.0.10:80/udp on node-1 has only real servers of weight 0" in got.hint
    tcp = Packet("request", 1, FiveTuple("tcp", "10.244.1.2", "10.96.0.10", 40000, 80), 1, 60, False, 0, None, hops, v)
    got = diagnose.explain(tcp, bind(tcp, (facts(ipvs=ipvsfacts.parse(PROC_IP_VS)), {})))
    assert "has no real servers" in got.hint
