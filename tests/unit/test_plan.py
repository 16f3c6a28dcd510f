"""The flow planner on hand-built plans: which agents run, and what each is asked (no privileges)."""


import pytest

from tracer.agents.request import AgentRequest
from tracer.cluster import endpoints
from tracer.config import FlowConfig
from tracer.errors import BadInput
from tracer.reconstruct import packets
from tracer.runs import plan as planner


def _plan(inv, src, dst, **kw):
    cfg = FlowConfig(src=src, dst=dst, **kw)
    s, d = endpoints.resolve(src, inv), endpoints.resolve(dst, inv)
    proto, port, notes = planner.choose_proto(cfg, d)
    return planner.Plan(cfg, inv, None, object(), s, d, proto, port, notes, packets.Placement(), {}, {},
                        sorted(set(s.addresses() + d.addresses())), 0.0)


def test_a_real_cluster_gets_one_agent_per_node_of_the_flow_that_discovers_its_pods(inv):
    plan = _plan(inv, "pod-1-1", "svc/default/web")      # web's backend is pod-2-2 on node-2
    reqs = planner.agent_requests(plan)
    assert [r.node for r in reqs] == ["node-1", "node-2"]
    assert all(r.tc_devices == "auto" and r.node_netns is None and r.netns_filter is None for r in reqs)
    assert reqs[0].discover.pod_ips == sorted({"10.244.1.2", "10.244.2.3"})
    assert reqs[0].discover.node_ips == sorted(n.ip for n in inv.nodes.values())
    assert reqs[0].probe is not None and reqs[1].probe is None
    assert (reqs[0].probe.src, reqs[0].probe.dst, reqs[0].probe.proto) == ("10.244.1.2", "10.96.0.10", "tcp")
    assert reqs[0].probe.netns is None                     # the agent finds it by address
    wire = planner.agent_plans(plan)
    assert [AgentRequest.from_wire(p.wire) for p in wire] == reqs


def test_a_node_endpoint_gets_an_agent_too(inv):
    reqs = planner.agent_requests(_plan(inv, "pod-1-1", "node/node-2", tc=False))
    assert [r.node for r in reqs] == ["node-1", "node-2"]
    assert all(r.tc_devices == [] for r in reqs)


def test_a_probe_from_a_pod_without_a_node_is_refused(inv):
    plan = _plan(inv, "pod-1-1", "pod-2-1")
    plan.src.pod.node = None
    with pytest.raises(BadInput, match="no node"):
        planner.agent_requests(plan)
