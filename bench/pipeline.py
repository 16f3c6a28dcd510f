"""Benchmark: hop observations from the kernel into a decoded pandas DataFrame.

Real packets cross the bench lab (UDP, 64-byte datagrams, pod-1-1 on node-1 → pod-2-1 on
node-2: about 12 hop events per packet) under a filter that matches them. Three consumers
of the same ring buffer are compared:

- sink:     tracer/session.py as it is: the ring buffer's mmap'd pages read directly
            (tracer/ringbuf.py), whole batches copied into numpy with one slice assignment;
            `events.to_frame` on the chunks
- callback: the session with `batch_reader=False` (what it did before, and still does off
            x86-64): BCC `ring_buffer_poll` → libbpf → one Python callback per record,
            memmove into a numpy chunk
- ctypes:   the plain BCC-tool way: one callback per record that decodes it with ctypes
            (`ct.cast(data, POINTER(Event)).contents`, what `b["events"].event(data)` does)
            into a tuple; a DataFrame from the tuples

Two measurements:

1. drain: traffic fills a large ring buffer while nobody reads it; then the consumer
   empties it into a DataFrame. Events/s of the consumer alone (kernel → DataFrame), with
   real kernel records and nothing lost. Also times to_frame alone.
2. live: traffic at increasing offered rates while the consumer runs (the session's
   default 1 MiB ring buffer unless --ringbuf-pages), converting to DataFrames every
   0.25 s; events/s that reached a DataFrame and events lost, per rate. The highest rate
   with zero loss is the figure. On this 2-vCPU machine the traffic, the kernel hooks and
   the consumer share the CPUs.

Consumers run interleaved at each step.

    .venv/bin/python bench/pipeline.py [--drain-pages 8192] [--rates 2000,5000,...] [--seconds 2]
    .venv/bin/python bench/pipeline.py --quick
"""

from __future__ import annotations

import argparse
import ctypes as ct
import time

import numpy as np
import pandas as pd

import benchlib as L
from tracer.kernel import record
from tracer.kernel import hooks
from tracer.kernel.session import SessionConfig, Sink, TraceSession

SRC, DST = "pod-1-1", "pod-2-1"
PORT = 5203
CONSUMERS = ["sink", "callback", "ctypes"]


# ---------------------------------------------------------------------------------------
# The per-event ctypes consumer (the baseline)

def _ctype(np_type: str):
    if np_type.startswith("("):          # a fixed array such as the 16-byte addresses: "(16,)u1"
        count, _, base = np_type[1:].partition(",)")
        return _ctype(base) * int(count)
    return {"u1": ct.c_uint8, "u2": ct.c_uint16, "u4": ct.c_uint32, "u8": ct.c_uint64}[np_type.lstrip("<>")]


class Event(ct.Structure):
    _pack_ = 1
    _fields_ = [(name, ct.c_char * int(np_t[1:]) if np_t.startswith("S") else _ctype(np_t))
                for name, _, np_t in record.EVENT_FIELDS]


assert ct.sizeof(Event) == record.EVENT_DTYPE.itemsize
_NAMES = [f[0] for f in Event._fields_]
_PTR = ct.POINTER(Event)


class CtypesSink:
    def __init__(self):
        self.rows: list[tuple] = []

    def __call__(self, ctx, data, size):
        e = ct.cast(data, _PTR).contents
        self.rows.append(tuple(getattr(e, n) for n in _NAMES))
        return 0

    def count(self) -> int:
        return len(self.rows)

    def take_frame(self) -> pd.DataFrame:
        rows, self.rows = self.rows, []
        return pd.DataFrame.from_records(rows, columns=_NAMES)


# ---------------------------------------------------------------------------------------
# A traced session with one of the consumers

class Consumer:
    def __init__(self, doc: dict, kind: str, pages: int):
        self.kind = kind
        src, dst = L.pod(doc, SRC), L.pod(doc, DST)
        self.sink = CtypesSink() if kind == "ctypes" else Sink()
        self.session = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], ringbuf_pages=pages,
                                                  hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS],
                                                  netns=L.lab_inodes(doc), budget=0,
                                                  batch_reader=(kind == "sink")), sink=self.sink)
        self.session.start()
        if kind == "sink" and self.session.reader is None:
            raise SystemExit("the session did not get its batch reader (not x86-64?)")
        self.done = 0          # events handed over as DataFrames
        self.frames = 0

    def poll(self, timeout_ms: int) -> None:
        self.session.poll(timeout_ms)

    def drain(self) -> None:
        self.session.drain()

    def pending_array(self) -> np.ndarray:
        parts = self.sink.take()   # handed over, as capture's spool takes them
        return np.concatenate(parts) if parts else np.zeros(0, dtype=record.EVENT_DTYPE)

    def to_frame(self) -> pd.DataFrame:
        if self.kind == "ctypes":
            df = self.sink.take_frame()
        else:
            df = record.to_frame(self.pending_array())
        self.done += len(df)
        self.frames += 1
        return df

    def counters(self) -> dict:
        return self.session.counters()

    def close(self) -> None:
        self.session.close()


# ---------------------------------------------------------------------------------------
# 1. drain

def drain_once(doc: dict, kind: str, pages: int, fill_s: float) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    c = Consumer(doc, kind, pages)
    try:
        cap = pages * 4096 // ((record.EVENT_DTYPE.itemsize + 8 + 7) & ~7)
        p = L.iperf_client(src["netns"], dst["ip"], PORT, 30, udp=True)
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < fill_s:
            if c.counters()["emitted"] >= cap * 0.9:
                break
            time.sleep(0.02)
        p.terminate()
        p.communicate()
        time.sleep(0.1)
        k = c.counters()
        t1 = time.perf_counter()
        c.drain()
        if kind == "ctypes":
            t2 = time.perf_counter()
            df = c.to_frame()
            t3 = time.perf_counter()
            arr = None
        else:
            arr = c.pending_array()
            t2 = time.perf_counter()
            df = record.to_frame(arr)
            t3 = time.perf_counter()
        n = len(df)
        out = {"events": n, "emitted": k["emitted"], "lost_while_filling": k["lost"],
               "read_s": t2 - t1, "to_frame_s": t3 - t2, "total_s": t3 - t1,
               "events_per_s": n / (t3 - t1) if t3 > t1 else None,
               "read_events_per_s": n / (t2 - t1) if t2 > t1 else None}
        if n != k["emitted"]:
            out["mismatch"] = f"DataFrame has {n} rows, kernel emitted {k['emitted']}"
        return out
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# 2. live

def live_once(doc: dict, kind: str, pages: int, pps: int, seconds: float) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    c = Consumer(doc, kind, pages)
    try:
        rate = "0" if pps <= 0 else str(pps * 64 * 8)
        k0 = c.counters()
        t0 = time.monotonic()
        p = L.iperf_client(src["netns"], dst["ip"], PORT, seconds, udp=True, rate=rate)
        next_frame = t0 + 0.25
        while p.poll() is None:
            c.poll(20)
            if time.monotonic() >= next_frame:
                c.to_frame()
                next_frame = time.monotonic() + 0.25
        res = L.iperf_result(p, True)
        c.drain()
        c.to_frame()
        t1 = time.monotonic()
        k = c.counters()
        return {"offered_pps": pps, "sent_pps": round(res["sent_pps"]), "events": c.done,
                "emitted": k["emitted"] - k0["emitted"], "lost": k["lost"] - k0["lost"],
                "events_per_s": c.done / (t1 - t0)}
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--consumers", default=",".join(CONSUMERS))
    ap.add_argument("--drain-pages", type=int, default=8192, help="ring buffer for the drain test (8192: 32 MiB)")
    ap.add_argument("--drain-rounds", type=int, default=3)
    ap.add_argument("--ringbuf-pages", type=int, default=256, help="ring buffer for the live test (session default)")
    ap.add_argument("--rates", default="2000,5000,10000,20000,40000,0", help="offered UDP packets/s (0: unlimited)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    consumers = args.consumers.split(",")
    if args.quick:
        args.drain_pages, args.drain_rounds, args.rates, args.seconds = 512, 1, "5000", 1.0
    rates = [int(x) for x in args.rates.split(",")]
    doc, _ = L.lab()
    start = L.machine()
    drain: dict[str, list[dict]] = {k: [] for k in consumers}
    live: dict[str, list[dict]] = {k: [] for k in consumers}
    with L.IperfServer(L.pod(doc, DST)["netns"], PORT):
        for r in range(args.drain_rounds):
            for kind in consumers[r % len(consumers):] + consumers[: r % len(consumers)]:
                drain[kind].append(drain_once(doc, kind, args.drain_pages, 10.0))
        for pps in rates:
            for kind in consumers:
                live[kind].append(live_once(doc, kind, args.ringbuf_pages, pps, args.seconds))
    out = {"benchmark": "pipeline", "flow": f"{SRC} → {DST} UDP 64 B", "event_bytes": record.EVENT_DTYPE.itemsize,
           "drain_ringbuf_pages": args.drain_pages, "live_ringbuf_pages": args.ringbuf_pages,
           "drain": {}, "live": {}, "machine_start": start, "machine_end": L.machine()}
    for kind in consumers:
        rs = drain[kind]
        d = {"events": L.spread([x["events"] for x in rs], 0),
             "events_per_s": L.spread([x["events_per_s"] for x in rs], 0),
             "read_events_per_s": L.spread([x["read_events_per_s"] for x in rs], 0),
             "to_frame_s": L.spread([x["to_frame_s"] for x in rs]),
             "mismatches": [x["mismatch"] for x in rs if "mismatch" in x]}
        out["drain"][kind] = d
        lv = [dict(x, events_per_s=round(x["events_per_s"])) for x in live[kind]]
        ok = [x for x in lv if x["lost"] == 0 and x["events"] == x["emitted"]]
        out["live"][kind] = {"steps": lv,
                             "max_zero_loss_events_per_s": max((x["events_per_s"] for x in ok), default=0)}
    if "sink" in out["drain"] and "ctypes" in out["drain"]:
        ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
        dr = out["drain"]
        out["verdict"] = {
            "sink_drain_events_per_s": dr["sink"]["events_per_s"]["median"],
            "sink_vs_ctypes": ratio(dr["sink"]["events_per_s"]["median"], dr["ctypes"]["events_per_s"]["median"]),
        }
        if "callback" in dr:
            out["verdict"]["callback_drain_events_per_s"] = dr["callback"]["events_per_s"]["median"]
            out["verdict"]["sink_vs_callback"] = ratio(dr["sink"]["events_per_s"]["median"],
                                                       dr["callback"]["events_per_s"]["median"])
        out["verdict"]["live_max_zero_loss_events_per_s"] = {k: v["max_zero_loss_events_per_s"]
                                                             for k, v in out["live"].items()}
    out["targets"] = {"events_per_s": 1_000_000, "vs_per_event_callback": 5.0}
    L.emit(out)


if __name__ == "__main__":
    main()
