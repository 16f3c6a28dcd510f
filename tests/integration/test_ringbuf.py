"""The batch reader of the ring buffer (tracer/ringbuf.py) on real kernel records: with a
ring of 8 pages (about 240 records) that wraps many times, every record the kernel emitted
reaches the sink exactly once and in order, and it is the same stream BCC's per-record
callback delivers for the same traffic."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import must_run
from tests.integration.lab_fixture import drain_all, lab, ping, pod  # noqa: F401
from tracer.node import netns
from tracer.kernel import hooks
from tracer.kernel import ringbuf
from tracer.kernel.session import SessionConfig, TraceSession


def _trace(doc: dict, batch: bool, bursts: int = 12, per_burst: int = 6) -> tuple[np.ndarray, dict, object]:
    src, dst = pod(doc, "pod-1-1"), pod(doc, "pod-2-1")
    inodes = [netns.inode(x["netns"]) for x in doc["nodes"] + doc["pods"]]   # this lab only
    s = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], ringbuf_pages=8, budget=0, netns=inodes,
                                   hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS], batch_reader=batch))
    try:
        s.start()
        reader = s.reader
        seq = 0
        for _ in range(bursts):
            for _ in range(per_burst):          # ~12 events per ping each way: fits the ring
                seq += 1
                assert ping(src["netns"], dst["ip"], seq=seq) == dst["ip"]
            s.poll(50)
        drain_all(s)
        return s.sink.array(), s.counters(), reader
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _batch_reader_allowed(monkeypatch):
    """The reader under test whatever PODTRACE_RINGBUF_READER says; it exists on x86-64 only."""
    monkeypatch.delenv("PODTRACE_RINGBUF_READER", raising=False)
    if not ringbuf.available():
        if must_run():
            pytest.fail("the batch reader runs on x86-64 only")
        pytest.skip("the batch reader runs on x86-64 only")


def test_batches_deliver_every_record_once(lab):
    arr, counters, reader = _trace(lab, batch=True)
    assert reader is not None, "the session did not use the batch reader"
    assert counters["lost"] == 0, counters
    assert len(arr) == counters["emitted"], (len(arr), counters)
    assert len(arr) > 8 * 4096 // 136 * 3, "the ring did not wrap several times"
    # ring order is reserve order: time order but for the odd pair two CPUs stamped and
    # reserved in opposite orders (a batch copied twice or skipped fails the count above)
    inversions = int((np.diff(arr["ts_ns"].astype(np.int64)) < 0).sum())
    assert inversions <= 4, f"{inversions} records out of time order"
    assert set(np.unique(arr["proto"])) == {1}


def test_batches_equal_the_callback_stream(lab):
    a, ca, _ = _trace(lab, batch=True, bursts=4)
    b, cb, reader = _trace(lab, batch=False, bursts=4)
    assert reader is None
    assert ca["lost"] == cb["lost"] == 0
    # the same traffic gives the same records, but for times, ids and per-run values
    keep = ["hook", "proto", "saddr", "daddr", "ifname", "icmp_type", "ip_len"]
    # (addresses are 16-byte arrays in the record: compared as bytes)
    sig = lambda x: sorted(tuple(v.tobytes() if hasattr(v, "tobytes") else v for v in row)  # noqa: E731
                           for row in x[keep].tolist())
    assert sig(a) == sig(b)
