"""The end of the trace window: agents that answer `drain`, and agents too old to know it."""

from __future__ import annotations

import json
import os

import numpy as np

from tracer.agents import coordinator, wire
from tracer.kernel import record


def chunk(*ts):
    arr = np.zeros(len(ts), dtype=record.EVENT_DTYPE)
    arr["ts_ns"] = ts
    return arr.tobytes()


class Agent:
    """An agent process that answers the coordinator's commands with frames written beforehand."""

    def __init__(self, hello, before, on_drain, on_stop):
        r, self.w = os.pipe()
        self.stdout = os.fdopen(r, "rb")
        self.stdin = self
        self.stderr = None
        self.answers = {"drain": on_drain, "stop": on_stop + [("end", {"node": "node-1"})]}
        self.said: list[str] = []
        self._send([("hello", hello), ("ready", {"node": "node-1"})] + before)

    def _send(self, frames):
        if self.w is not None:
            os.write(self.w, b"".join(wire.encode(k, p) for k, p in frames))

    def write(self, data: bytes):
        for line in data.decode().splitlines():
            cmd = json.loads(line).get("cmd")
            if cmd:
                self.said.append(cmd)
                self._send(self.answers.get(cmd, []))
                if cmd == "stop" and self.w is not None:
                    os.close(self.w)
                    self.w = None

    def flush(self):
        pass

    def close(self):
        pass

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


class Transport:
    def __init__(self, agents):
        self.agents = agents

    def start(self, plan):
        return self.agents[plan.node]


def trace(agent) -> tuple[list[int], coordinator.AgentRun]:
    with coordinator.Coordinator([coordinator.AgentPlan("node-1", {"node": "node-1"})],
                                 Transport({"node-1": agent})) as co:
        co.wait_ready()
        co.drain()
        arr, origin = co.merged()
    arr_after, _ = co.merged()
    assert arr_after["ts_ns"].tolist() == arr["ts_ns"].tolist(), "the window stays closed"
    return arr["ts_ns"].tolist(), co.runs[0]


def test_events_after_drained_stay_out_of_the_window():
    agent = Agent({"node": "node-1", "commands": ["probe", "drain", "facts", "stop"]},
                  [("events", chunk(1, 2))],
                  on_drain=[("events", chunk(3)),
                            ("drained", {"node": "node-1", "events": 3, "locations": {"77": "kfree_skb_reason+0x1"}}),
                            ("events", chunk(4))],     # a late event: after the window
                  on_stop=[("events", chunk(5))])
    ts, run = trace(agent)
    assert ts == [1, 2, 3]
    assert agent.said == ["drain", "stop"]
    assert run.drained["locations"] == {"77": "kfree_skb_reason+0x1"}
    assert run.ended and not run.failure
    assert len(run.chunks) == 4, "late events are still read (the stream stays in step)"
    assert run.events() == 5, "every event received counts, late ones too"


def test_an_agent_without_drain_is_not_asked_and_keeps_its_last_flush():
    agent = Agent({"node": "node-1"},   # an older agent: no command list
                  [("events", chunk(1, 2)), ("events", chunk(3))],
                  on_drain=[("error", {"message": "unknown command"})],
                  on_stop=[("events", chunk(4))])
    ts, run = trace(agent)
    assert ts == [1, 2, 3]
    assert agent.said == ["stop"] and run.drained is None
    assert run.ended and not run.failure


def test_batches_keep_only_what_every_nodes_sampling_keeps():
    """Batches are put in columns with the sampling the agents reported (a `sample` frame
    while tracing, the `drained` frame's at the end), and those already in columns are cut
    down when it rises: the merge holds what 1 in the last sampling keeps."""
    arr = np.zeros(256, dtype=record.EVENT_DTYPE)
    arr["ts_ns"] = np.arange(256)
    arr["proto"] = 6
    arr["tcp_seq"] = np.arange(256) * 7919
    arr["proto"][5] = 0      # a buffer not parsed: kept whatever the sampling
    agent = Agent({"node": "node-1", "commands": ["probe", "drain", "facts", "stop", "sample"]},
                  [("events", arr[:128].tobytes()), ("sample", {"n": 4})],
                  on_drain=[("events", arr[128:].tobytes()),
                            ("drained", {"node": "node-1", "events": 256, "sample": 8})],
                  on_stop=[])
    with coordinator.Coordinator([coordinator.AgentPlan("node-1", {"node": "node-1"})],
                                 Transport({"node-1": agent})) as co:
        co.wait_ready()
        run = co.runs[0]
        co.wait_for(lambda: run.sample == 4 and run.chunks, 10)
        co.pump(0.01)
        assert run.chunks[0]["ts_ns"].tolist() == arr["ts_ns"][:128][record.contract.kept(arr[:128], 4)].tolist()
        co.drain()
        cols, _ = co.merged()
    assert cols["ts_ns"].tolist() == arr["ts_ns"][record.contract.kept(arr, 8)].tolist()
    assert 5 in cols["ts_ns"] and 0 < len(cols["ts_ns"]) < 64
    assert run.events() == 256, "every event received counts"


def _tcp_events(n: int) -> np.ndarray:
    """n TCP events, each of its own packet (its own sequence number)."""
    arr = np.zeros(n, dtype=record.EVENT_DTYPE)
    arr["ts_ns"] = np.arange(n)
    arr["proto"] = 6
    arr["tcp_seq"] = np.arange(n) * 7919
    return arr


def _sending(arr: np.ndarray) -> "Agent":
    """An agent that sends `arr` once ready and drains with nothing more (its kernel at 1 in 1)."""
    return Agent({"node": "node-1", "commands": ["probe", "drain", "facts", "stop", "sample"]},
                 [("events", arr.tobytes())],
                 on_drain=[("drained", {"node": "node-1", "events": len(arr), "sample": 1})], on_stop=[])


def test_the_merge_keeps_within_its_budget_a_second():
    """A watch's merge has a budget of its own (events a second, all nodes together): when
    the events put in columns come faster, the merge raises its sampling by a power of two
    (as a node's guard does), tells every agent, and cuts down the batches it already holds;
    the sampling applied at the end is at least that."""
    arr = _tcp_events(200)    # within a pipe's buffer
    agent = _sending(arr)
    with coordinator.Coordinator([coordinator.AgentPlan("node-1", {"node": "node-1"})],
                                 Transport({"node-1": agent}), budget=40) as co:
        co.wait_ready()
        run = co.runs[0]
        co.wait_for(lambda: run.chunks, 10)
        assert co.guard(now=1000.0) is None            # the first check only starts the count
        co.split()
        assert run.admitted == 200
        assert co.guard(now=1000.5) is None            # at most once a second
        # 200 events in 2 s: 100 a second against 40: 1 in 4 (40 × 4 ≥ 1.25 × 100)
        assert co.guard(now=1002.0) == 4 and co.merge_sample == 4
        assert agent.said.count("sample") >= 1 and run.sample == 4
        assert run.chunks[0]["ts_ns"].tolist() == arr["ts_ns"][record.contract.kept(arr, 4)].tolist()
        assert co.guard(now=1003.5) is None            # nothing new came: no raise
        co.drain()
        cols, _ = co.merged()
    assert cols["ts_ns"].tolist() == arr["ts_ns"][record.contract.kept(arr, 4)].tolist()


def test_no_merge_budget_keeps_every_event():
    agent = _sending(_tcp_events(64))
    with coordinator.Coordinator([coordinator.AgentPlan("node-1", {"node": "node-1"})],
                                 Transport({"node-1": agent})) as co:
        co.wait_ready()
        co.wait_for(lambda: co.runs[0].chunks, 10)
        co.split()
        assert co.guard(now=0.0) is None and co.guard(now=100.0) is None
        co.drain()
        cols, _ = co.merged()
    assert len(cols["ts_ns"]) == 64
