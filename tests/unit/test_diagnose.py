"""Diagnosis rules: verdict causes decided from evidence alone (no privileges).

The evidence here is written by hand in the shape nodecheck.facts() returns; the end-to-end
scenario tests feed the same rules with evidence read from real namespaces.
"""

import copy
import re
from dataclasses import replace
from pathlib import Path

from tracer.reconstruct import diagnose
from tracer.reconstruct.evidence import Evidence, fact_query
from tracer.reconstruct.model import Addr, ConntrackView, FiveTuple, Hop, Packet, Verdict

ROOT = Path(__file__).resolve().parents[2]


def hop(node, dev, point, src="10.244.1.2", dst="10.244.2.2", pod=None, ct=None):
    return Hop(node=node, pod=pod, dev=dev, point=point, src=src, dst=dst, len=84, ct=ct)


def packet(status="lost", node="node-1", dev="cni0", reason=None, hops=None, direction="request", **kw):
    hops = hops or [hop("node-1", "eth0", "tx", pod="default/a"), hop("node-1", "cni0", "rx")]
    v = Verdict(status, node, dev, hops[-1].point, reason, None, "generic", "docs/runbooks/packet-lost.md")
    return Packet(direction, None, FiveTuple("icmp", hops[0].src, hops[0].dst, None, None), 1,
                  kw.get("ip_len", 84), kw.get("df", False), 0, None, tuple(hops), v)


def facts(**over):
    f = {"ip_forward": 1, "rp_filter": {"all": 0, "default": 0, "cni0": 0},
         "bridge_nf_call_iptables": 1, "conntrack": {"count": 10, "max": 1000},
         "mtu": {"cni0": 1450}, "links": {"flannel.1": {"mtu": 1450, "kind": "vxlan"}},
         "route": {"dst": "10.244.2.2", "gateway": "10.244.2.0", "dev": "flannel.1"},
         "route_back": {"dst": "10.244.1.2", "dev": "cni0"},
         "next_hop": {"ip": "10.244.2.0", "dev": "flannel.1",
                      "neigh": {"lladdr": "0e:00:00:00:00:02", "state": ["PERMANENT"]},
                      "fdb": {"mac": "0e:00:00:00:00:02", "dst": "172.30.0.12"}, "vxlan": {"id": 1}}}
    f.update(over)
    return f


def ev(f=None, **kw):
    """Evidence whose every node answers `f` (bound to a packet by `cause`)."""
    return f, kw


def bind(p, e):
    f, kw = e
    nodes = {h.node for h in p.hops} | {p.verdict.node}
    answers = {n: [{"query": fact_query(n, p), "facts": f}] for n in nodes if n and f is not None}
    return Evidence(answers=answers, **kw)


VTEP = {"10.244.2.0": {"node": "node-2", "mac": "0e:00:00:00:00:02", "ip": "172.30.0.12"}}


class Recording(Evidence):
    """Evidence that notes every fact lookup, to hold facts_needed to what explain asks."""

    def facts(self, node, packet):
        ASKED.setdefault(node, []).append(fact_query(node, packet))
        return super().facts(node, packet)


ASKED: dict = {}


JUDGED: dict = {}


def cause(p, e):
    """The cause explain finds for packet p; the judged packet is kept in JUDGED["p"]."""
    before = copy.deepcopy(p)
    evidence = bind(p, e)
    ASKED.clear()
    v = diagnose.explain(p, Recording(**vars(evidence)))
    assert p == before, "explain changed its input"
    assert ASKED == diagnose.facts_needed([p], evidence)
    JUDGED["p"] = replace(p, verdict=v)
    return v.cause


def judged():
    return JUDGED["p"].verdict


def test_ip_forward_off():
    p = packet(reason="IP_INADDRERRORS", status="dropped")
    assert cause(p, ev(facts(ip_forward=0))) == "ip-forward-off"
    assert "ip_forward is off on node-1" in judged().hint


def test_netfilter_rule_named_with_base_chain():
    hit = {"table": "filter", "chain": "KUBE-NWPLCY-X", "base_chain": "FORWARD", "index": 1,
           "rule": "-A KUBE-NWPLCY-X -d 10.244.2.2/32 -j DROP", "target": "DROP", "packets": 3, "comment": None}
    p = packet(status="dropped", reason="NETFILTER_DROP", node="node-2")
    assert cause(p, ev(facts(), rule_hits={"node-2": [hit]})) == "netfilter-rule"
    assert "KUBE-NWPLCY-X chain of the filter table (reached from FORWARD)" in judged().hint
    assert judged().runbook == "docs/runbooks/netfilter-drop.md"


def test_invalid_and_no_endpoints_rules():
    inv = {"table": "filter", "chain": "FORWARD", "base_chain": "FORWARD", "index": 1, "target": "DROP",
           "rule": "-A FORWARD -m conntrack --ctstate INVALID -j DROP", "packets": 1, "comment": None}
    assert cause(packet(status="dropped", reason="NETFILTER_DROP"),
                 ev(facts(), rule_hits={"node-1": [inv]})) == "conntrack-invalid"
    rej = {"table": "filter", "chain": "KUBE-SERVICES", "base_chain": "FORWARD", "index": 1, "target": "REJECT",
           "rule": '-A KUBE-SERVICES -d 10.96.0.10/32 -m comment --comment "default/web:http has no endpoints" -j REJECT',
           "packets": 1, "comment": "default/web:http has no endpoints"}
    p = packet(status="dropped", reason="NETFILTER_DROP")
    assert cause(p, ev(facts(), rule_hits={"node-1": [rej]})) == "service-no-endpoints"
    assert "default/web:http" in judged().hint


def test_conntrack_full():
    assert cause(packet(status="dropped", reason="NETFILTER_DROP"),
                 ev(facts(conntrack={"count": 1000, "max": 1000}))) == "conntrack-full"


def test_rp_filter_strict_asymmetric():
    f = facts(rp_filter={"all": 1, "default": 1, "cni0": 1}, route_back={"dst": "10.244.1.2", "dev": "eth0"})
    p = packet(status="dropped", reason="IP_RPFILTER")
    assert cause(p, ev(f)) == "rp-filter"
    assert "leaves via eth0, not cni0" in judged().hint


def test_no_route():
    f = facts(route={"dst": "10.244.2.2", "error": "RTNETLINK answers: Network is unreachable"}, next_hop=None)
    assert cause(packet(status="dropped", reason="IP_INNOROUTES"), ev(f)) == "no-route"


def test_mtu_df():
    f = facts(route={"dst": "10.244.2.2", "gateway": "10.244.2.0", "dev": "flannel.1"})
    p = packet(status="lost", ip_len=1500, df=True)
    assert cause(p, ev(f)) == "mtu"
    assert "1500-byte" in judged().hint and "MTU 1450" in judged().hint
    assert cause(packet(status="lost", ip_len=1500, df=False), ev(f)) != "mtu"


def test_overlay_neighbour_and_fdb():
    wrong = facts(next_hop={**facts()["next_hop"], "neigh": {"lladdr": "0e:00:00:00:00:99", "state": ["PERMANENT"]},
                            "fdb": None})
    assert cause(packet(), ev(wrong, vtep=VTEP)) == "neighbour-wrong"
    missing_fdb = facts(next_hop={**facts()["next_hop"], "fdb": None})
    assert cause(packet(), ev(missing_fdb, vtep=VTEP)) == "fdb-missing"
    no_neigh = facts(next_hop={**facts()["next_hop"], "neigh": None})
    assert cause(packet(), ev(no_neigh, vtep=VTEP)) == "neighbour-missing"
    assert cause(packet(), ev(facts(), vtep=VTEP)) is None   # nothing wrong found: keep the generic hint


def test_stale_conntrack_dnat():
    ct = ConntrackView("established", "original", (), "dnat", None,
                       Addr("10.244.1.2", 40000, "10.96.0.10", 80), Addr("10.244.2.99", 8080, "10.244.1.2", 40000))
    hops = [hop("node-1", "eth0", "tx", pod="default/a", dst="10.96.0.10"),
            hop("node-1", "cni0", "rx", dst="10.244.2.99", ct=ct)]
    p = packet(hops=hops)
    assert cause(p, ev(facts(), vip="10.96.0.10", service="default/web", backends=["10.244.2.3"])) == "stale-conntrack"
    assert "10.244.2.99" in judged().hint and "default/web" in judged().hint


def test_unreversed_reply_names_bridge_nf():
    hops = [hop("node-2", "eth0", "tx", src="10.244.2.3", dst="10.244.2.2", pod="default/b"),
            hop("node-2", "veth1", "rx", src="10.244.2.3", dst="10.244.2.2"),
            hop("node-2", "eth0", "rx", src="10.244.2.3", dst="10.244.2.2", pod="default/a")]
    p = packet(status="delivered", hops=hops, direction="reply")
    e = ev(facts(bridge_nf_call_iptables=0), vip="10.96.0.10", service="default/web", backends=["10.244.2.3"])
    assert cause(p, e) == "unreversed-reply"
    assert "bridge-nf-call-iptables is 0" in judged().hint
    assert judged().status == "delivered" and judged().problem is True


def test_every_runbook_named_in_code_exists():
    text = (ROOT / "tracer" / "reconstruct" / "diagnose.py").read_text()
    names = set(re.findall(r'"([a-z0-9-]+\.md)"', text))
    assert names, "no runbook found in diagnose.py"
    missing = [n for n in sorted(names) if not (ROOT / "docs" / "runbooks" / n).exists()]
    assert not missing, f"runbooks named by verdicts but missing: {missing}"
