"""The served agent's bounds (tracer/agents/validate.py): what a coordinator sends passes
unchanged, each bound of the command line holds, and the listener is loopback only."""

from __future__ import annotations

import json

import pytest

from tracer.agents import server, validate
from tracer.agents.request import AgentRequest, Discovery, ProbeRequest
from tracer.errors import BadInput


def _wire(req: AgentRequest) -> dict:
    return json.loads(json.dumps(req.to_wire()))


def test_a_coordinators_cluster_request_passes_unchanged():
    req = AgentRequest(node="node-1", addrs=["10.244.1.2", "10.96.0.10", "fd00::5"], tc_devices="auto",
                       discover=Discovery(pod_ips=["10.244.1.2"], node_ips=["172.30.0.11"]),
                       probe=ProbeRequest(netns=None, src="10.244.1.2", dst="10.96.0.10", proto="tcp", port=80,
                                          count=1000, timeout=30.0, interval=0.05, size=None, sport=40000),
                       sample=65536, budget=10_000_000, max_seconds=1000 * 30.05 + 60)
    assert validate.trace_request(_wire(req), "node-1") == req


@pytest.mark.parametrize("change,needle", [
    ({"node": "node-2"}, "reached the agent of"),
    ({"node_netns": "ptlab-node-1"}, "node_netns"),
    ({"tc_devices": [["cni-x", "eth0"]]}, "another namespace"),
    ({"tc_devices": [[None, "a/b"]]}, "interface name"),
    ({"tc_devices": [[None, "-all"]]}, "interface name"),
    ({"sample": 0}, "sample"),
    ({"max_seconds": 1e9}, "max_seconds"),
    ({"addrs": ["::ffff:1.2.3.4x"]}, "not an IP address"),
    ({"extra": 1}, "unknown field"),
])
def test_each_bound_is_named(change, needle):
    doc = dict(_wire(AgentRequest(node="node-1", addrs=["10.0.0.1"])), **change)
    with pytest.raises(validate.Refused, match=needle):
        validate.trace_request(doc, "node-1")


def test_commands_are_rebuilt_from_checked_fields():
    assert validate.command({"cmd": "probe", "progress": True}) == {"cmd": "probe", "progress": True}
    q = {"src": "10.0.0.1", "dst": "10.0.0.2", "iif": "eth0", "devs": ["cni0", "flannel.1"], "pod_netns": 4026532000,
         "pod_dev": "eth0"}
    assert validate.command({"cmd": "facts", "queries": [q]}) == {"cmd": "facts", "queries": [q]}
    for bad in ({"cmd": "exec"}, {"cmd": "drain", "x": 1}, {"cmd": "facts", "queries": [dict(q, devs=["../x"])]},
                {"cmd": "facts", "queries": [q] * (validate.MAX_QUERIES + 1)}, ["cmd"]):
        with pytest.raises(validate.Refused):
            validate.command(bad)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "localhost"])
def test_the_server_listens_on_loopback_only(host):
    with pytest.raises(BadInput):
        server.AgentServer(b"x" * 32, host=host)
    assert server.loopback("127.0.0.1") == "127.0.0.1" and server.loopback("::1") == "::1"
