"""One loaded BPF program at work, from its in-kernel filters to the release of every kernel object.

A session sets the address filter, drains the ring buffer into numpy in batches (one `Sink`
for every caller), reads the per-CPU counters, and releases everything on close."""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import ctypes
import ipaddress
import mmap
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

if TYPE_CHECKING:  # agents never import pandas: frames are made by the coordinator
    import pandas as pd

from tracer.kernel import contract as C
from tracer.kernel import program
from tracer.kernel import record
from tracer.kernel import ringbuf
from tracer.kernel.contract import COUNTER_NAMES, addr_bit_words, addr_key

_CHUNK = 4096  # events per numpy chunk


@dataclass
class SessionConfig:
    addrs: list[str]
    match_either: bool = False       # False: both addresses of a packet must be under trace
    ringbuf_pages: int = 1024        # 4 MiB with 4 KiB pages: ~33 ms of 1 M events/s (1 MiB lost events at saturation)
    hooks: list | None = None        # probes.Hook list; None: the default tracepoints
    netns: list[int] | None = None   # keep events only from these namespace inodes (an agent's node)
    sample: int = 1                  # keep 1 packet in N (deterministic: same packets on every node)
    budget: int = 0                  # max events per second on this node (0: no limit)
    # capture selections (contract.SEL_*): an address also matches inside a CIDR;
    # ports: only TCP/UDP with one of them on either side; any_addr: no address condition
    cidrs: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    any_addr: bool = False
    # read the ring buffer in batches from its mmap'd pages (tracer/ringbuf.py) where it can
    batch_reader: bool = True


class Sink:
    """Where ring-buffer records land: numpy chunks filled in place (no Python object per
    event beyond the callback frame BCC imposes). With a `limit`, at most that many events
    wait to be taken: the poll stops there, and the kernel counts what no longer fits in the
    ring buffer as lost, so a burst cannot grow memory."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.full: list[np.ndarray] = []   # filled chunks not yet taken
        self.total = 0                     # events ever recorded
        self.taken = 0                     # events handed out by take()
        self._new()

    def _new(self):
        self.cur = np.zeros(_CHUNK, dtype=record.EVENT_DTYPE)
        self.base = self.cur.ctypes.data
        self.n = 0

    def _roll(self):
        if self.n == _CHUNK:
            self.full.append(self.cur)
            self._new()

    def __call__(self, ctx, data, size):
        self._roll()
        ctypes.memmove(self.base + self.n * record.EVENT_DTYPE.itemsize, data, record.EVENT_DTYPE.itemsize)
        self.n += 1
        self.total += 1
        return -1 if self.limit is not None and self.pending() >= self.limit else 0

    def room(self) -> np.ndarray:
        """Where the next records go (the batch reader, tracer/kernel/ringbuf.py); `commit(n)`
        then. Empty once `limit` events wait."""
        self._roll()
        free = _CHUNK - self.n if self.limit is None else max(0, self.limit - self.pending())
        return self.cur[self.n: self.n + free]

    def commit(self, n: int) -> None:
        self.n += n
        self.total += n

    def pending(self) -> int:
        return len(self.full) * _CHUNK + self.n

    def count(self) -> int:
        return self.total

    def take(self) -> list[np.ndarray]:
        """The waiting events, handed over (and no longer held)."""
        out, self.full = self.full, []
        if self.n:
            out.append(self.cur[: self.n].copy())
            self.n = 0
        self.taken = self.total
        return out

    def release(self) -> None:
        """Let go of every event held (they were handed on): the filled chunks go, the
        current one is written again from its start; `count()` goes on counting."""
        self.full = []
        self.n = 0
        self.taken = self.total

    def parts(self) -> list[np.ndarray]:
        """Every event still held, in the chunks that hold them (views, not copies)."""
        return self.full + [self.cur[: self.n]]

    def array(self, sample: int = 1) -> np.ndarray:
        """Every event still held, in one array; with `sample`, those that keeping 1 packet
        in it keeps (`record.sampled`)."""
        return record.concat([record.sampled(c, sample) for c in self.parts()])

    def since(self, n: int) -> np.ndarray:
        """Events recorded after the first `n` (copies only the chunks that hold them)."""
        skip = max(0, n - self.taken)
        parts = []
        for chunk in self.parts():
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            parts.append(chunk[skip:])
            skip = 0
        return record.concat(parts)


def _norm(a: str) -> str:
    """An address of either family in its one written form (IPv6 compressed)."""
    return str(ipaddress.ip_address(a))


def _bytes16(packed: bytes):
    import ctypes

    return (ctypes.c_ubyte * 16)(*packed)


def _addr_entry(b, a: str):
    """(table, key) of an address in the kernel's filter: `addrs` (u32) or `addrs6`."""
    ip = ipaddress.ip_address(a)
    if ip.version == 4:
        t = b["addrs"]
        return t, t.Key(addr_key(a))
    t = b["addrs6"]
    k = t.Key()
    k.a = _bytes16(ip.packed)
    return t, k


@dataclass
class TraceSession:
    config: SessionConfig
    loaded: program.Loaded | None = None
    sink: Sink = field(default_factory=Sink)
    timings: dict[str, float] = field(default_factory=dict)
    reader: ringbuf.RingReader | None = None
    traced: set[str] = field(default_factory=set)   # what `addrs` holds

    def start(self, stop: threading.Event | None = None, alongside: "program.Alongside | None" = None) -> "TraceSession":
        """Load and attach (with `alongside`, see program.load), then set the filter."""
        t0 = time.monotonic()
        self.loaded = program.load(self.config.ringbuf_pages, hooks=self.config.hooks, stop=stop,
                                   alongside=alongside)
        b = self.loaded.bpf
        try:
            self.set_addrs(add=self.config.addrs)
            sel = C.SEL_EITHER if self.config.match_either else 0
            if self.config.cidrs:
                for c in self.config.cidrs:
                    net = ipaddress.ip_network(c, strict=False)
                    if net.version == 4:
                        lpm = b["cidrs"]
                        lpm[lpm.Key(net.prefixlen, addr_key(str(net.network_address)))] = lpm.Leaf(1)
                    else:
                        lpm = b["cidrs6"]
                        k = lpm.Key()
                        k.prefixlen = net.prefixlen
                        k.addr = _bytes16(net.network_address.packed)
                        lpm[k] = lpm.Leaf(1)
                sel |= C.SEL_CIDRS
            if self.config.ports:
                pt = b["ports"]
                for port in self.config.ports:
                    pt[pt.Key(int.from_bytes(int(port).to_bytes(2, "big"), "little"))] = pt.Leaf(1)
                sel |= C.SEL_PORTS
            if self.config.any_addr:
                sel |= C.SEL_ANY_ADDR
            cfg = b["config"]
            cfg[cfg.Key(C.CONFIG_SEL)] = cfg.Leaf(sel)
            self.set_guard(self.config.sample, self.config.budget)
            if self.config.netns:
                self.allow_netns(self.config.netns)
                ncfg = b["netns_cfg"]
                ncfg[ncfg.Key(C.NETNS_FILTER_ON)] = ncfg.Leaf(1)
            self.reader = self._batch_reader(b)
            if self.reader is None:
                b["events"].open_ring_buffer(self.sink)
        except BaseException:
            self.close()
            raise
        self.timings = dict(self.loaded.timings, start_s=time.monotonic() - t0)
        return self

    def set_addrs(self, add=(), remove=()) -> None:
        """Change the in-kernel address filter while tracing (a pod that appears or goes
        during a capture). Takes effect for the next packet on every CPU.

        The `addr_bits` prefilter is kept in step: bits are set before an address enters
        `addrs` and cleared only after it has left, so the kernel never reads a clear bit
        for an address in the table."""
        b = self.loaded.bpf
        bits = b["addr_bits"]
        add, remove = {_norm(a) for a in add}, {_norm(a) for a in remove}
        gone = remove - add
        new = (self.traced - gone) | add
        before, after = addr_bit_words(self.traced), addr_bit_words(new)
        both = {w: before.get(w, 0) | after.get(w, 0) for w in set(before) | set(after)}
        for w, v in sorted(both.items()):
            if v != before.get(w, 0):
                bits[bits.Key(w)] = bits.Leaf(v)
        for a in sorted(gone):
            table, k = _addr_entry(b, a)
            with contextlib.suppress(KeyError):
                del table[k]
        for a in sorted(add):
            table, k = _addr_entry(b, a)
            table[k] = table.Leaf(1)
        for w, v in sorted(both.items()):
            if after.get(w, 0) != v:
                bits[bits.Key(w)] = bits.Leaf(after.get(w, 0))
        self.traced = new

    def allow_netns(self, inodes) -> None:
        """Add network namespaces to the kernel's namespace filter (one that appeared while
        tracing: a pod started on this node). Only meaningful with config.netns set."""
        allow = self.loaded.bpf["netns_allow"]
        for inum in inodes:
            allow[allow.Key(int(inum))] = allow.Leaf(1)

    def set_guard(self, sample: int, budget: int) -> None:
        """Sampling and the per-second event budget; may change while tracing."""
        import os as _os

        g = self.loaded.bpf["guard"]
        g[g.Key(C.GUARD_SAMPLE)] = g.Leaf(max(1, int(sample)))
        per_cpu = -(-int(budget) // (_os.cpu_count() or 1)) if budget else 0
        g[g.Key(C.GUARD_BUDGET)] = g.Leaf(per_cpu)
        self.config.sample, self.config.budget = max(1, int(sample)), int(budget)

    def _batch_reader(self, b):
        """The mmap reader where it can run (x86-64, a sink that takes batches), else None:
        BCC's per-record callback then."""
        if not (self.config.batch_reader and ringbuf.available() and hasattr(self.sink, "room")):
            return None
        try:
            return ringbuf.RingReader(b["events"].map_fd, self.config.ringbuf_pages * mmap.PAGESIZE,
                                      record.EVENT_DTYPE)
        except (OSError, ValueError):
            return None

    def poll(self, timeout_ms: int = 50) -> int:
        if self.loaded is None:
            return 0
        if self.reader is not None:
            self.reader.wait(timeout_ms)
            self._fill()
        else:
            self.loaded.bpf.ring_buffer_poll(timeout_ms)
        return self.sink.count()

    def drain(self) -> None:
        if self.loaded is None:
            return
        if self.reader is not None:
            self._fill()
        else:
            self.loaded.bpf.ring_buffer_consume()

    def _fill(self) -> None:
        """Everything ready, as far as the sink has room (a full sink leaves the rest in the
        ring, where the kernel counts what no longer fits as lost)."""
        while True:
            room = self.sink.room()
            if not len(room):
                return
            before = int(self.reader.cons[0])
            got = self.reader.consume(room)
            if got:
                self.sink.commit(got)
            elif int(self.reader.cons[0]) == before:
                return            # nothing committed yet (an empty ring, or a record being written)

    def counters(self) -> dict[str, int]:
        if self.loaded is None:
            return dict.fromkeys(COUNTER_NAMES, 0)
        table = self.loaded.bpf["counters"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTER_NAMES)}

    def missed_runs(self) -> int:
        """How often the kernel skipped one of this session's programs (`recursion_misses`:
        a perf tracepoint that fired while another BPF program ran on that CPU, e.g. in a
        softirq that interrupted one; a raw tracepoint only while the same program ran). A
        skipped run is an event never recorded, like a refused one."""
        if self.loaded is None:
            return 0
        total = 0
        for fn in list(self.loaded.bpf.funcs.values()):
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            total += int(line.split(":", 1)[1])
                            break
            except (OSError, ValueError):
                continue
        return total

    def symbolizer(self):
        """addr → "function+0xoff" from this machine's kallsyms (through BCC), or None."""
        bpf = self.loaded.bpf if self.loaded else None

        def sym(addr: int) -> str | None:
            if not addr or bpf is None:
                return None
            try:
                return bpf.ksym(addr, show_offset=True).decode(errors="replace")
            except Exception:  # BCC raises bare Exception for unknown addresses
                return hex(addr)
        return sym

    def frame(self, sample: int = 1) -> "pd.DataFrame":
        """The events held, as a frame; with `sample`, only those 1 in it keeps."""
        return record.to_frame(self.sink.array(sample))

    def close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            reader.close()
        if self.loaded is not None:
            loaded, self.loaded = self.loaded, None
            loaded.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False


class TerminateAsInterrupt:
    """Within this block SIGTERM and SIGHUP raise KeyboardInterrupt, so `finally` cleanup
    runs for them exactly as for Ctrl-C (a closed terminal or session sends SIGHUP)."""

    _SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self._prev: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:   # `nohup` keeps its meaning
                    self._prev[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        return False
