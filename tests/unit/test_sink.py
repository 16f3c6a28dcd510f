"""The one ring-buffer sink: what flow and the agent read back (`array`, `since`) and what
capture takes (`take`, with a limit of waiting events), through both ways records arrive."""

from __future__ import annotations

import ctypes

import numpy as np

from tracer.kernel import record
from tracer.kernel.session import Sink


def _records(n: int, start: int = 0) -> np.ndarray:
    arr = np.zeros(n, dtype=record.EVENT_DTYPE)
    arr["ts_ns"] = np.arange(start, start + n)
    return arr


def _callback(sink: Sink, arr: np.ndarray) -> list[int]:
    buf = arr.tobytes()
    size = record.EVENT_DTYPE.itemsize
    keep = ctypes.create_string_buffer(buf)
    return [sink(None, ctypes.addressof(keep) + i * size, size) for i in range(len(arr))]


def _batches(sink: Sink, arr: np.ndarray) -> int:
    """What the batch reader does: fill `room()`, then `commit`; returns how many went in."""
    done = 0
    while done < len(arr):
        room = sink.room()
        if not len(room):
            break
        k = min(len(room), len(arr) - done)
        room[:k] = arr[done:done + k]
        sink.commit(k)
        done += k
    return done


def test_since_and_array_across_chunks():
    sink = Sink()
    arr = _records(10_000)
    assert _batches(sink, arr) == len(arr)
    assert sink.count() == 10_000
    assert sink.array()["ts_ns"].tolist() == arr["ts_ns"].tolist()
    assert sink.since(4095)["ts_ns"].tolist() == arr["ts_ns"][4095:].tolist()
    assert sink.since(10_000).size == 0
    assert set(_callback(sink, _records(5, 10_000))) == {0}     # no limit: never stops the poll
    assert sink.since(9_998)["ts_ns"].tolist() == [9998, 9999, 10_000, 10_001, 10_002, 10_003, 10_004]


def test_limit_bounds_what_waits_and_take_hands_it_over():
    sink = Sink(limit=5000)
    arr = _records(8000)
    assert _batches(sink, arr) == 5000          # the rest stays in the ring
    assert sink.pending() == 5000 and not len(sink.room())
    got = np.concatenate(sink.take())
    assert got["ts_ns"].tolist() == list(range(5000)) and sink.pending() == 0
    assert -1 not in _callback(sink, arr[5000:])                # 3000 wait: below the limit
    rets = _callback(sink, _records(2500, 8000))
    assert rets.index(-1) == 1999 and sink.count() == 10_500    # stopped at 5000, nothing lost
    assert sink.since(6000)["ts_ns"].tolist() == list(range(6000, 10_500))
