"""The served agent's bounds (tracer/agents/validate.py): what a coordinator sends passes
unchanged, each bound of the command line holds, and the listener is loopback only."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_tc_observers_travel_to_the_agent_and_default_to_auto():
    """PODTRACE_TC_OBSERVERS=all on the coordinator reaches every agent; the default is left
    out of the request (an agent that predates the field takes it unchanged)."""
    req = AgentRequest(node="node-1", addrs=["10.0.0.1"], tc_devices="auto", tc_observers="all")
    assert validate.trace_request(_wire(req), "node-1").tc_observers == "all"
    plain = AgentRequest(node="node-1", addrs=["10.0.0.1"], tc_devices="auto")
    assert "tc_observers" not in plain.to_wire()
    assert validate.trace_request(dict(_wire(plain), tc_observers="auto"), "node-1").tc_observers is None
    assert AgentRequest.from_wire(_wire(req)).tc_observers == "all"


@pytest.mark.parametrize("change,needle", [
    ({"node": "node-2"}, "reached the agent of"),
    ({"node_netns": "ptlab-node-1"}, "node_netns"),
    ({"tc_devices": [["cni-x", "eth0"]]}, "another namespace"),
    ({"tc_devices": [[None, "a/b"]]}, "interface name"),
    ({"tc_devices": [[None, "-all"]]}, "interface name"),
    ({"sample": 0}, "sample"),
    ({"max_seconds": 1e9}, "max_seconds"),
    ({"addrs": ["::ffff:1.2.3.4x"]}, "not an IP address"),
    ({"addrs": ["fe80::1%eth0"]}, "zone"),
    ({"addrs": ["fe80::1%../../etc"]}, "not an IP address"),
    ({"extra": 1}, "unknown field"),
    ({"tc_observers": "everywhere"}, "tc_observers"),
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


@pytest.mark.parametrize("n", [1, 2, 64, 65536])
def test_sample_command_passes_within_the_command_lines_range(n):
    """The coordinator's `sample` (raise the kernel sampling to 1 in n), as it sends it."""
    assert "sample" in validate.COMMANDS
    assert validate.command({"cmd": "sample", "n": n}) == {"cmd": "sample", "n": n}


@pytest.mark.parametrize("doc,needle", [
    ({"cmd": "sample"}, "lacks n"),
    ({"cmd": "sample", "n": 0}, "out of range"),
    ({"cmd": "sample", "n": -4}, "out of range"),
    ({"cmd": "sample", "n": 65537}, "out of range"),
    ({"cmd": "sample", "n": 1 << 70}, "out of range"),
    ({"cmd": "sample", "n": 4.0}, "integer"),
    ({"cmd": "sample", "n": "4"}, "integer"),
    ({"cmd": "sample", "n": True}, "integer"),
    ({"cmd": "sample", "n": None}, "integer"),
    ({"cmd": "sample", "n": [4]}, "integer"),
    ({"cmd": "sample", "n": 4, "budget": 0}, "unknown field"),
    ({"cmd": "sample", "n": 4, "netns": "/proc/1/ns/net"}, "unknown field"),
])
def test_sample_command_out_of_bounds_is_refused(doc, needle):
    with pytest.raises(validate.Refused, match=needle):
        validate.command(doc)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "localhost"])
def test_the_server_listens_on_loopback_only(host):
    with pytest.raises(BadInput):
        server.AgentServer(b"x" * 32, host=host)
    assert server.loopback("127.0.0.1") == "127.0.0.1" and server.loopback("::1") == "::1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(doc=json_values
       | st.dictionaries(st.sampled_from(["cmd", "queries", "progress", "n", "x"]), json_values,
                         max_size=3).map(lambda d: dict(d, cmd=d.get("cmd", "facts")))
       | st.builds(lambda cmd, d: dict(d, cmd=cmd), st.sampled_from([*validate.COMMANDS, "exec", ""]),
                   st.dictionaries(st.sampled_from(["queries", "progress", "n", "x"]),
                                   json_values | st.integers(min_value=-2, max_value=1 << 17), max_size=2)))
def test_any_command_is_refused_or_rebuilt(doc):
    """Whatever JSON a client sends as a command: Refused, or a command of the agent's own
    vocabulary built from checked fields only (never the client's object handed on)."""
    try:
        out = validate.command(doc)
    except validate.Refused:
        return
    assert out["cmd"] in validate.COMMANDS and out is not doc
    assert validate.command(json.loads(json.dumps(out))) == out


@settings(max_examples=400, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(sorted(AgentRequest.__dataclass_fields__)), json_values, max_size=8))
def test_any_request_is_refused_or_within_bounds(doc):
    try:
        req = validate.trace_request(doc, "node-1")
    except validate.Refused:
        return
    assert req.node == "node-1" and req.node_netns is None and 1 <= len(req.addrs) <= validate.MAX_ADDRS
    assert req.probe is None or (req.probe.netns is None and 1 <= req.probe.count <= 1000)


def test_the_daemonset_runs_the_server_where_flow_looks_for_it():
    """The agent's --listen and --token-file defaults, the pod's port annotation and the
    Secret's mount agree (the DaemonSet runs `agent --serve` with the defaults)."""
    from pathlib import Path

    import yaml

    from tracer.agents import portforward
    from tracer.cli.agent import DEFAULT_TOKEN_FILE, agent

    ds = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests" / "daemonset.yaml").read_text())
    tpl = ds["spec"]["template"]
    listen = next(p.default for p in agent.params if p.name == "listen")
    assert listen == f"127.0.0.1:{server.DEFAULT_PORT}"
    assert tpl["metadata"]["annotations"][portforward.PORT_ANNOTATION] == str(server.DEFAULT_PORT)
    mount = next(m for m in tpl["spec"]["containers"][0]["volumeMounts"] if m["name"] == "agent-token")
    vol = next(v for v in tpl["spec"]["volumes"] if v["name"] == "agent-token")
    assert vol["secret"]["secretName"] == portforward.TOKEN_SECRET
    assert DEFAULT_TOKEN_FILE == f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}"
