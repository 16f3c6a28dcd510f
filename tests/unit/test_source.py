"""The source diagnosis on hand-built facts: a probe that never left its pod is explained
from the pod's own route, MTU, neighbour entry, device and send error, or said to have
never left with what was checked; a probe that left, or was answered, is not touched."""

from __future__ import annotations

from bench.analysis import synth_flow
from tracer import analysis
from tracer.node.prober import ProbeResult
from tracer.reconstruct import source
from tracer.reconstruct import verdict as verdicts
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import FiveTuple, Hop, Packet, Verdict

A = "default/pod-1-1"
SRC, DST, GW = "10.244.1.2", "10.244.2.2", "10.244.1.1"
ETH0 = {"name": "eth0", "up": True, "operstate": "UP", "carrier": 1, "mtu": 1450, "noarp": False}


def pod_facts(route=None, neigh=("REACHABLE",), lladdr="0a:58:0a:f4:01:01", device=ETH0):
    route = route if route is not None else {"dst": DST, "dev": "eth0", "gateway": GW, "prefsrc": SRC,
                                             "type": 1, "mtu": None, "mtu_locked": False}
    nb = None if neigh is None else {"ip": GW, "lladdr": lladdr, "state": list(neigh)}
    nh = None if route.get("error") else {"ip": GW, "dev": "eth0", "neigh": nb, "noarp": False}
    return {"of": "pod", "route": route, "links": {"lo": {**ETH0, "name": "lo"}, "eth0": device},
            "device": None if route.get("error") else device, "next_hop": nh}


def evidence(f: dict, size: int | None = None) -> Evidence:
    q = source.query(A, SRC, DST, size)
    return Evidence(answers={"node-1": [{"query": q, "facts": f}]})


def probe(outcome="timeout", detail=None, reply_from=None) -> ProbeResult:
    return ProbeResult(1, "icmp", SRC, DST, 7, 1, 1000, outcome, reply_from, None, detail)


def flow(probes: list[ProbeResult], packets=(), ev: Evidence | None = None):
    _, meta = synth_flow(probes=1)
    meta["probes"] = [p.as_json() for p in probes]
    fi = analysis._flow_input(meta)
    return verdicts.flow_verdict(list(packets), fi, True, ev)


def test_no_route_at_source():
    f = pod_facts(route={"dst": DST, "error": "Network is unreachable"})
    verdict, (pr,) = flow([probe("error", "Network is unreachable")], ev=evidence(f))
    assert verdict.status == "failed"
    assert verdict.problems == ("probe 1: never left pod-1-1: pod-1-1 has no route to 10.244.2.2 "
                                "(Network is unreachable) (the send failed with ENETUNREACH).",)
    assert pr.source["cause"] == "no-route" and pr.source["errno"] == "ENETUNREACH"
    assert pr.source["runbook"] == "docs/runbooks/no-route.md" and pr.source["node"] == "node-1"
    assert pr.as_json()["source"]["status"] == "never-left"


def test_locked_route_mtu_at_source():
    f = pod_facts(route={"dst": DST, "dev": "eth0", "gateway": GW, "type": 1, "mtu": 1000, "mtu_locked": True})
    verdict, (pr,) = flow([probe("error", "Message too long")], ev=evidence(f, 1400))
    assert pr.source["cause"] == "mtu" and pr.source["errno"] == "EMSGSIZE"
    assert verdict.problems[0] == ("probe 1: never left pod-1-1: pod-1-1 has a locked route MTU of 1000 for "
                                   "10.244.2.2; a 1400-byte DF probe cannot leave (the send failed with EMSGSIZE).")


def test_cached_path_mtu_at_source():
    f = pod_facts(route={"dst": DST, "dev": "eth0", "gateway": GW, "type": 1, "mtu": 1000, "mtu_locked": False})
    _, (pr,) = flow([probe("error", "Message too long")], ev=evidence(f, 1400))
    assert "has a path MTU of 1000 cached for 10.244.2.2; a 1400-byte DF probe cannot leave" in pr.source["hint"]
    # the same route with a probe that fits: the MTU explains nothing
    _, (pr,) = flow([probe("timeout")], ev=evidence(f, 900))
    assert pr.source["cause"] is None


def test_gateway_neighbour_failed_at_source():
    for state in (["FAILED"], ["INCOMPLETE"], None):
        verdict, (pr,) = flow([probe("timeout")], ev=evidence(pod_facts(neigh=state, lladdr=None)))
        assert pr.source["cause"] == "neighbour-missing", pr.source
        want = ", ".join(state) if state else "NONE"
        assert verdict.problems == (f"probe 1: never left pod-1-1: pod-1-1 cannot resolve its gateway "
                                    f"10.244.1.1 on eth0: neighbour {want}.",)


def test_request_seen_only_inside_the_pod_never_left():
    h = Hop("node-1", A, "eth0", "tx", SRC, DST)
    p = Packet("request", 1, FiveTuple("icmp", SRC, DST, None, None), 5, 84, True, 0, None, (h,),
               Verdict("lost", "node-1", "eth0", "tx"))
    verdict, (pr,) = flow([probe("timeout")], [p], evidence(pod_facts(neigh=["FAILED"], lladdr=None)))
    assert pr.source["cause"] == "neighbour-missing"
    assert verdict.problems[0].startswith("probe 1: never left pod-1-1: ")


def test_nothing_explains_it_lists_what_was_checked():
    verdict, (pr,) = flow([probe("timeout")], ev=evidence(pod_facts()))
    assert pr.source["cause"] is None and pr.source["runbook"] == "docs/runbooks/packet-lost.md"
    assert verdict.problems == ("probe 1: never left pod-1-1: nothing read in the pod explains it (checked: "
                                "route to 10.244.2.2 via 10.244.1.1 on eth0; neighbour 10.244.1.1 REACHABLE at "
                                "0a:58:0a:f4:01:01; eth0 up (MTU 1450); the send succeeded)",)


def test_device_down_at_source():
    _, (pr,) = flow([probe("timeout")], ev=evidence(pod_facts(device={**ETH0, "up": False, "operstate": "DOWN"})))
    assert pr.source["cause"] == "no-route" and "eth0 is down" in pr.source["hint"]


def test_no_facts_says_so():
    verdict, (pr,) = flow([probe("error", "No buffer space available")])
    assert pr.source["errno"] == "ENOBUFS" and pr.source["cause"] is None
    assert "could not be read" in verdict.problems[0]


def test_a_probe_that_left_or_was_answered_is_not_a_source_problem():
    h1 = Hop("node-1", A, "eth0", "tx", SRC, DST)
    h2 = Hop("node-1", None, "veth11111111", "rx", SRC, DST)
    p = Packet("request", 1, FiveTuple("icmp", SRC, DST, None, None), 5, 84, True, 0, None, (h1, h2),
               Verdict("lost", "node-1", "veth11111111", "rx"))
    ev = evidence(pod_facts(neigh=["FAILED"], lladdr=None))
    verdict, (pr,) = flow([probe("timeout")], [p], ev)
    assert pr.source is None and not verdict.problems[0].startswith("probe 1: never left")
    verdict, (pr,) = flow([probe("answered", reply_from=DST)], (), ev)
    assert pr.source is None and verdict.problems[0] == "probe 1: request never seen by the tracer"
    assert not source.needed([p], [probe("timeout")], A)
    assert source.needed([], [probe("error", "Network is unreachable")], A)
    assert not source.needed([], [probe("error", "Network is unreachable")], None)


def test_saved_evidence_round_trips():
    ev = evidence(pod_facts(neigh=["FAILED"], lladdr=None))
    again = Evidence.from_json(ev.as_json())
    _, (pr,) = flow([probe("timeout")], ev=again)
    assert pr.source["cause"] == "neighbour-missing"


def test_refused_by_the_pods_own_host_unreachable_never_left():
    # with a long timeout the pod's kernel gives up on ARP and answers the probe itself
    pr = probe("refused", "host unreachable (ICMP 3/1) from 10.244.1.2", reply_from=SRC)
    _, (judged,) = flow([pr], ev=evidence(pod_facts(neigh=["FAILED"], lladdr=None)))
    assert judged.source["cause"] == "neighbour-missing" and judged.source["errno"] is None
    # refused by someone else: it left
    pr = probe("refused", "host unreachable (ICMP 3/1) from 10.244.2.1", reply_from="10.244.2.1")
    _, (judged,) = flow([pr], ev=evidence(pod_facts(neigh=["FAILED"], lladdr=None)))
    assert judged.source is None


def test_a_packet_seen_only_inside_the_pod_gets_the_pods_cause_not_its_nodes():
    from tracer.reconstruct import diagnose

    h = Hop("node-1", A, "eth0", "tx", SRC, DST)
    p = Packet("request", 1, FiveTuple("icmp", SRC, DST, None, None), 5, 84, True, 0, None, (h,),
               Verdict("lost", "node-1", "eth0", "tx"))
    ev = evidence(pod_facts(neigh=["FAILED"], lladdr=None))
    assert diagnose.facts_needed([p], ev) == {}          # no node is asked about it
    (judged,) = diagnose.judge([p], ev)
    v = judged.verdict
    assert (v.status, v.node, v.cause) == ("lost", "node-1", "neighbour-missing")
    assert v.hint.startswith("Never left pod-1-1: pod-1-1 cannot resolve its gateway 10.244.1.1")
    # without the pod's facts, or with nothing wrong in them: the verdict as it was
    (same,) = diagnose.judge([p], Evidence())
    assert same.verdict == p.verdict
    (same,) = diagnose.judge([p], evidence(pod_facts()))
    assert same.verdict == p.verdict


def test_an_answer_that_is_not_the_pods_view_is_not_used():
    f = pod_facts(route={"dst": DST, "error": "Network is unreachable"})
    f.pop("of")    # an older agent answered with its node's facts
    _, (pr,) = flow([probe("error", "Network is unreachable")], ev=evidence(f))
    assert pr.source["cause"] is None and "could not be read" in pr.source["hint"]


V6SRC, V6DST, V6GW = "fd00:10:244:1::2", "fd00:10:244:2::2", "fd00:10:244:1::1"


def test_ipv6_emsgsize_with_path_mtu_at_source():
    """An IPv6 send's EMSGSIZE carries the path MTU the kernel knows; the errno is still EMSGSIZE
    and a probe larger than the pod's device MTU is an MTU cause."""
    dev = {**ETH0, "mtu": 1430}
    f = pod_facts(route={"dst": V6DST, "dev": "eth0", "gateway": V6GW, "prefsrc": V6SRC, "type": 1,
                         "mtu": None, "mtu_locked": False}, device=dev)
    pr = ProbeResult(1, "icmp", V6SRC, V6DST, 7, 1, 1000, "error", None, None, "Message too long (path MTU 1430)")
    assert source.errno_name(pr) == "EMSGSIZE" and source.path_mtu(pr) == 1430
    q = source.query(A, V6SRC, V6DST, 1450)
    got = source.judge(pr, [], A, "node-1", Evidence(answers={"node-1": [{"query": q, "facts": f}]}))
    assert got["cause"] == "mtu" and got["errno"] == "EMSGSIZE" and got["runbook"] == "docs/runbooks/mtu.md"
    assert "eth0 has an MTU of 1430; a 1450-byte DF probe cannot leave" in got["hint"]
    # the device fits the probe, the path MTU the kernel learnt does not
    f = pod_facts(route={"dst": V6DST, "dev": "eth0", "gateway": V6GW, "type": 1, "mtu": None, "mtu_locked": False},
                  device={**ETH0, "mtu": 1500})
    pr = ProbeResult(1, "icmp", V6SRC, V6DST, 7, 1, 1000, "error", None, None, "Message too long (path MTU 1280)")
    q = source.query(A, V6SRC, V6DST, 1400)
    got = source.judge(pr, [], A, "node-1", Evidence(answers={"node-1": [{"query": q, "facts": f}]}))
    assert got["cause"] == "mtu" and "knows a path MTU of 1280 for fd00:10:244:2::2" in got["hint"], got
