"""The agent stream's framing: round trip, and every way a stream can be damaged."""

import io
import struct

import numpy as np
import pytest

from tracer.kernel import record
from tracer.agents import wire


def stream(*frames):
    return io.BytesIO(b"".join(wire.encode(k, p) for k, p in frames))


def test_round_trip():
    arr = np.zeros(3, dtype=record.EVENT_DTYPE)
    arr["sport"] = 4242
    s = stream(("hello", {"node": "node-1"}), ("events", arr.tobytes()), ("end", {}))
    frames = list(wire.read(s))
    assert [f.kind for f in frames] == ["hello", "events", "end"]
    assert frames[0].json() == {"node": "node-1"}
    back = np.frombuffer(frames[1].payload, dtype=record.EVENT_DTYPE)
    assert back["sport"].tolist() == [4242] * 3


def test_truncated_payload():
    data = wire.encode("hello", {"node": "x" * 50})
    with pytest.raises(wire.WireError, match="truncated inside a hello frame"):
        list(wire.read(io.BytesIO(data[:-5])))


def test_truncated_header():
    data = wire.encode("end", {}) + wire.encode("hello", {})[:7]
    with pytest.raises(wire.WireError, match="truncated inside a frame header at byte"):
        list(wire.read(io.BytesIO(data)))


def test_corrupt_payload():
    data = bytearray(wire.encode("counters", {"seen": 1}))
    data[-2] ^= 0xFF
    with pytest.raises(wire.WireError, match="CRC mismatch"):
        list(wire.read(io.BytesIO(bytes(data))))


def test_garbage_and_newer_version():
    with pytest.raises(wire.WireError, match="bad magic"):
        list(wire.read(io.BytesIO(b"Traceback (most recent call last):\n")))
    newer = struct.pack("!4sBBHII", wire.MAGIC, wire.VERSION + 1, 1, 0, 0, 0)
    with pytest.raises(wire.WireError, match="upgrade"):
        list(wire.read(io.BytesIO(newer)))
    older = struct.pack("!4sBBHII", wire.MAGIC, wire.VERSION - 1, 1, 0, 0, 0)   # another record layout
    with pytest.raises(wire.WireError, match="same podtrace version"):
        list(wire.read(io.BytesIO(older)))


def test_clean_end_is_not_an_error():
    assert list(wire.read(io.BytesIO(b""))) == []
