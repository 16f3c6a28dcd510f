"""A prototype ring-buffer consumer that reads the BPF ring buffer's mmap'd pages directly
and copies whole batches of records into numpy with one slice assignment, instead of one
ctypes callback per record (what BCC's `ring_buffer_poll` → libbpf `ring_buffer__consume`
→ Python callback does). Used by bench/pipeline.py to measure the proposed fix; not used by
the tracer.

Layout (kernel/bpf/ringbuf.c, what libbpf's ringbuf.c maps): offset 0 of the map fd is the
consumer page (read-write: `consumer_pos`); offset PAGE is the producer page (`producer_pos`)
followed by the data pages mapped twice in a row, so a record that wraps is contiguous.
Each record is an 8-byte header (u32 length with BUSY/DISCARD bits, u32 page offset) and
the sample, rounded up to 8 bytes. podtrace reserves only `struct event`, so every record
has the same size and a batch is a strided numpy view; a header of another length (which
this program never writes) falls back to a record-by-record walk.

x86-64 only (TSO): the loads of producer_pos, then of the headers, then of the data are
not reordered, and the store of consumer_pos is one aligned 8-byte store.
"""

from __future__ import annotations

import mmap
import os
import select

import numpy as np

BUSY = np.uint32(1 << 31)
DISCARD = np.uint32(1 << 30)
HDR = 8


class RingReader:
    def __init__(self, map_fd: int, size: int, sample_dtype: np.dtype):
        page = os.sysconf("SC_PAGE_SIZE")
        self.size = size
        self.mask = size - 1
        self.sample = np.dtype(sample_dtype)
        self.stride = (self.sample.itemsize + HDR + 7) & ~7
        self.rec = np.dtype({"names": ["len", "pg", "ev"], "formats": ["<u4", "<u4", self.sample],
                             "offsets": [0, 4, HDR], "itemsize": self.stride})
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.cons = np.frombuffer(self._cons_map, dtype="<u8", count=1)
        self.prod = np.frombuffer(self._prod_map, dtype="<u8", count=1)
        self.data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=page)
        self.ep = select.epoll()
        self.ep.register(map_fd, select.EPOLLIN)
        self.walked = 0     # batches that needed the slow walk

    def consume(self, out: np.ndarray) -> int:
        """Copy up to len(out) ready records into `out`; return how many."""
        cons = int(self.cons[0])
        prod = int(self.prod[0])
        if prod <= cons:
            return 0
        n = min((prod - cons) // self.stride, len(out))
        if n == 0:
            return 0
        start = cons & self.mask
        recs = np.ndarray(n, dtype=self.rec, buffer=self.data, offset=start)
        lens = recs["len"]
        busy = np.flatnonzero(lens & BUSY)
        k = int(busy[0]) if len(busy) else n
        if k == 0:
            return 0
        lens = lens[:k]
        if not (lens & ~DISCARD == self.sample.itemsize).all():
            return self._walk(out)
        keep = (lens & DISCARD) == 0
        if keep.all():
            out[:k] = recs["ev"][:k]
            got = k
        else:
            sel = recs["ev"][:k][keep]
            got = len(sel)
            out[:got] = sel
        self.cons[0] = cons + k * self.stride
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

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel says data is ready (or timeout)."""
        if int(self.prod[0]) > int(self.cons[0]):
            return
        self.ep.poll(timeout_ms / 1000)

    def close(self) -> None:
        self.ep.close()
        del self.cons, self.prod, self.data
        self._cons_map.close()
        self._prod_map.close()


class BatchSink:
    """numpy chunks filled by RingReader; the same interface as tracer.session._Sink."""

    def __init__(self, reader: RingReader, chunk: int = 65536):
        self.reader = reader
        self.chunk = chunk
        self.chunks: list[np.ndarray] = []
        self.total = 0
        self._new()

    def _new(self):
        self.cur = np.zeros(self.chunk, dtype=self.reader.sample)
        self.n = 0

    def poll(self, timeout_ms: int) -> int:
        self.reader.wait(timeout_ms)
        return self.drain()

    def drain(self) -> int:
        got_all = 0
        while True:
            if self.n == self.chunk:
                self.chunks.append(self.cur)
                self._new()
            got = self.reader.consume(self.cur[self.n:])
            if not got:
                break
            self.n += got
            self.total += got
            got_all += got
        return got_all

    def take(self) -> np.ndarray:
        parts = self.chunks + [self.cur[: self.n]]
        self.chunks = []
        out = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        self._new()
        return out
