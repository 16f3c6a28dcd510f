"""Reading the BPF ring buffer from its mmap'd pages, whole batches at a time.

BCC's path (`ring_buffer_poll` → libbpf `ring_buffer__consume`) calls back into Python once
per record; at ~1 µs per call that, not the kernel, limits how many events per second reach
user space. Here the ready records are copied into numpy with one slice assignment per
batch (bench/pipeline.py: about twice the throughput; docs/performance.md, lever A).

Layout (kernel/bpf/ringbuf.c; what libbpf maps too): offset 0 of the map fd is the consumer
page (read-write: `consumer_pos`); offset PAGE is the producer page (`producer_pos`)
followed by the data pages, mapped twice in a row so that a record that wraps is
contiguous. Each record is an 8-byte header (u32 length with the BUSY and DISCARD bits, u32
page offset) and the sample, rounded up to 8 bytes. podtrace reserves only the event record
(tracer/events.py), so every record has the same size and a batch is a strided numpy view;
a record of another size (never written by our programs) falls back to a walk.

x86-64 only (TSO: the loads of producer_pos, the headers and the data are not reordered,
and the store of consumer_pos is one aligned 8-byte store). Elsewhere `available()` is
False and the session keeps BCC's reader.
"""

from __future__ import annotations

import mmap
import platform
import select

import numpy as np

from tracer import settings

BUSY = np.uint32(1 << 31)
DISCARD = np.uint32(1 << 30)
HDR = 8


def available() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and settings.ringbuf_reader() != "bcc"


class RingReader:
    """Consumer of one BPF_MAP_TYPE_RINGBUF whose records are all `sample_dtype`."""

    def __init__(self, map_fd: int, size: int, sample_dtype: np.dtype):
        page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % page:
            raise ValueError(f"ring buffer size {size} is not a power-of-two multiple of the page size")
        self.size = size
        self.mask = size - 1
        self.sample = np.dtype(sample_dtype)
        self.stride = (self.sample.itemsize + HDR + 7) & ~7
        self.rec = np.dtype({"names": ["len", "pg", "ev"], "formats": ["<u4", "<u4", self.sample],
                             "offsets": [0, 4, HDR], "itemsize": self.stride})
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons_map.close()
            raise
        self.cons = np.frombuffer(self._cons_map, dtype="<u8", count=1)
        self.prod = np.frombuffer(self._prod_map, dtype="<u8", count=1)
        self.data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=page)
        self.ep = select.epoll()
        self.ep.register(map_fd, select.EPOLLIN)
        self.walked = 0     # batches that needed the record-by-record walk

    def ready(self) -> bool:
        return int(self.prod[0]) > int(self.cons[0])

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel says records are ready, or the timeout passes."""
        if not self.ready():
            self.ep.poll(max(0, timeout_ms) / 1000)

    def consume(self, out: np.ndarray) -> int:
        """Copy up to len(out) committed records into `out`, release their space to the
        kernel, and return how many were copied (discarded records are skipped)."""
        if not len(out):
            return 0
        cons = int(self.cons[0])
        prod = int(self.prod[0])
        n = min((prod - cons) // self.stride, len(out))
        if n <= 0:
            return 0
        recs = np.ndarray(n, dtype=self.rec, buffer=self.data, offset=cons & self.mask)
        lens = recs["len"]
        busy = np.flatnonzero(lens & BUSY)
        k = int(busy[0]) if len(busy) else n    # stop at the first record still being written
        if k == 0:
            return 0
        lens = lens[:k]
        if not ((lens & ~DISCARD) == self.sample.itemsize).all():
            return self._walk(out)
        keep = (lens & DISCARD) == 0
        if keep.all():
            out[:k] = recs["ev"][:k]
            got = k
        else:
            sel = recs["ev"][:k][keep]
            got = len(sel)
            out[:got] = sel
        self.cons[0] = cons + k * self.stride     # after the copy: the kernel may reuse the space
        return got

    def _walk(self, out: np.ndarray) -> int:
        self.walked += 1
        cons = int(self.cons[0])
        prod = int(self.prod[0])
        got = 0
        while cons < prod and got < len(out):
            at = cons & self.mask
            ln = int(self.data[at:at + 4].view("<u4")[0])
            if ln & int(BUSY):
                break
            size = ln & ~int(BUSY | DISCARD)
            if not ln & int(DISCARD) and size == self.sample.itemsize:
                out[got] = self.data[at + HDR: at + HDR + size].view(self.sample)[0]
                got += 1
            cons += (size + HDR + 7) & ~7
        self.cons[0] = cons
        return got

    def close(self) -> None:
        self.ep.close()
        del self.cons, self.prod, self.data
        self._cons_map.close()
        self._prod_map.close()
