"""Property tests of the agent stream (tracer.wire) and of the coordinator that consumes it.

Whatever bytes arrive — random, a valid stream cut or damaged anywhere, a frame whose CRC is
right but whose payload is not what its kind promises — the reader raises nothing but
WireError and always ends, and the coordinator marks the agent failed instead of crashing
the whole trace. In a cluster these bytes come from another machine's agent through the
Kubernetes exec API: they are input, not trusted data.
"""

from __future__ import annotations

import io
import json
import queue
import struct
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.agents import coordinator
from tracer.kernel import record
from tracer.agents import wire

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
kinds = st.sampled_from(sorted(wire.KIND_IDS))


class Trickle(io.RawIOBase):
    """A pipe that hands out at most `step` bytes per read (what a real pipe may do)."""

    def __init__(self, data: bytes, step: int):
        self.data, self.pos, self.step = data, 0, max(1, step)

    def readable(self):
        return True

    def read(self, n=-1):
        n = self.step if n is None or n < 0 else min(n, self.step)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def read_all(f) -> list[wire.Frame]:
    """Every frame, or WireError; anything else propagates and fails the test. A bound on the
    number of frames proves the reader cannot loop without consuming input."""
    frames = []
    for fr in wire.read(f):
        frames.append(fr)
        assert len(frames) <= 1 + 10_000, "the reader yields frames without consuming input"
    return frames


def frame_payload(kind: str, draw_json, draw_bytes):
    return draw_bytes if kind == "events" else draw_json


@st.composite
def streams(draw):
    items = draw(st.lists(st.tuples(kinds, json_values, st.binary(max_size=300)), max_size=6))
    return [(k, (b if k == "events" else j)) for k, j, b in items]


@FAST
@given(st.binary(max_size=2048), st.integers(1, 64))
def test_random_bytes_only_wire_error(data, step):
    for f in (io.BytesIO(data), Trickle(data, step)):
        try:
            frames = read_all(f)
        except wire.WireError:
            continue
        # Random bytes that parse must really be frames: magic, known kind, CRC.
        assert all(fr.kind in wire.KIND_IDS for fr in frames)
        assert data == b"" or data[:4] == wire.MAGIC


@FAST
@given(streams(), st.integers(1, 40))
def test_round_trip_through_a_trickling_pipe(frames, step):
    data = b"".join(wire.encode(k, p) for k, p in frames)
    got = read_all(Trickle(data, step))
    assert [fr.kind for fr in got] == [k for k, _ in frames]
    for fr, (k, p) in zip(got, frames):
        if k == "events":
            assert fr.payload == p
        else:
            assert fr.json() == json.loads(json.dumps(p))


@FAST
@given(streams(), st.data())
def test_damaged_valid_stream_only_wire_error(frames, data):
    raw = bytearray(b"".join(wire.encode(k, p) for k, p in frames) or wire.encode("end", {}))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "overwrite"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "insert":
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        raw[at:at + len(chunk)] = chunk
    try:
        got = read_all(io.BytesIO(bytes(raw)))
    except wire.WireError:
        return
    # Damage the CRC/magic did not catch must still leave well-formed frames (e.g. a flipped
    # bit in the unused flags field, or a truncation on a frame boundary).
    assert all(fr.kind in wire.KIND_IDS and isinstance(fr.payload, bytes) for fr in got)


def test_huge_declared_length_is_refused_without_reading():
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.KIND_IDS["events"], 0, wire.MAX_PAYLOAD + 1, 0)
    try:
        read_all(io.BytesIO(head + b"x" * 100))
    except wire.WireError as exc:
        assert "exceeds the limit" in str(exc)
    else:
        raise AssertionError("a frame over MAX_PAYLOAD was accepted")


def test_end_of_stream_forever_ends_the_reader():
    class Dry(io.RawIOBase):
        def readable(self):
            return True

        def read(self, n=-1):
            return b""
    assert read_all(Dry()) == []


# ---------------------------------------------------------------------------------------
# The coordinator's side: frames with a valid CRC and an unexpected payload

class _Proc:
    stderr = None

    def poll(self):
        return 0


def _run() -> coordinator.AgentRun:
    r = coordinator.AgentRun(coordinator.AgentPlan("node-x", {}))
    r.proc = _Proc()
    r.frames = queue.Queue()
    return r


def _raw_frame(kind: str, payload: bytes) -> wire.Frame:
    data = struct.pack("!4sBBHII", wire.MAGIC, wire.VERSION, wire.KIND_IDS[kind], 0, len(payload),
                       zlib.crc32(payload)) + payload
    return next(wire.read(io.BytesIO(data)))


@FAST
@given(st.lists(st.tuples(kinds, st.one_of(st.binary(max_size=200),
                                          json_values.map(lambda v: json.dumps(v).encode()))),
                max_size=8))
def test_absorb_never_raises_on_agent_garbage(items):
    run = _run()
    for kind, payload in items:
        run.frames.put(_raw_frame(kind, payload))
    run.frames.put(("eof", None))
    coordinator._absorb(run)        # must not raise
    if run.hello is not None:
        assert isinstance(run.hello, coordinator.Hello)
        assert isinstance(run.hello.hooks, list) and isinstance(run.hello.namespaces, dict)
    if run.counters is not None:
        assert isinstance(run.counters, dict)
    if run.facts is not None:
        assert isinstance(run.facts, dict)
    assert run.probes is None or isinstance(run.probes, (list, dict))
    assert all(isinstance(c, dict) for c in run.clocks)
    assert all(len(c) * record.EVENT_DTYPE.itemsize == c.nbytes for c in run.chunks)
    assert run.failure is None or isinstance(run.failure, str)


def test_absorb_names_an_unreadable_frame():
    run = _run()
    run.frames.put(_raw_frame("hello", b"\xff not json"))
    run.frames.put(_raw_frame("counters", b"[1, 2]"))
    coordinator._absorb(run)
    assert run.failure == "the agent sent an unreadable hello frame"
    assert run.hello is None and run.counters is None


def test_absorb_takes_whole_records_only():
    run = _run()
    rec = np.zeros(2, dtype=record.EVENT_DTYPE).tobytes()
    run.frames.put(_raw_frame("events", rec + b"\x00"))
    coordinator._absorb(run)
    assert run.failure == "an events frame does not hold whole records" and not run.chunks
