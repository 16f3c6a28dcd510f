"""A capture's spool: records taken from the ring-buffer sink, filtered to the capture's scope
and counted (events, packets, drops), on their way into the trace file."""

from __future__ import annotations

import numpy as np

from tracer import tracefile
from tracer.kernel.record import FLAG_V6, HOOK_IDS, addr_keys
from tracer.reconstruct import arrival, drops


def _content_hash(a: np.ndarray) -> np.ndarray:
    """One 64-bit number per event from the fields that identify a packet (flows.KEY_COLS)."""
    icmp = (a["proto"] == 1) | (a["proto"] == 58)
    k1 = (a["proto"].astype(np.uint64) | (a["ip_id"].astype(np.uint64) << np.uint64(8))
          | (a["ip_len"].astype(np.uint64) << np.uint64(24)) | (a["tcp_flags"].astype(np.uint64) << np.uint64(40))
          | (a["icmp_type"].astype(np.uint64) << np.uint64(48)))
    k2 = (a["tcp_seq"].astype(np.uint64) | (np.where(icmp, a["sport"], 0).astype(np.uint64) << np.uint64(32))
          | (np.where(icmp, a["dport"], 0).astype(np.uint64) << np.uint64(48)))
    with np.errstate(over="ignore"):
        return k1 * np.uint64(0x9E3779B97F4A7C15) ^ k2


class Spool:
    """Chunks of records → scope filter → writer, counting as it goes: events, packets
    (distinct packet contents; approximate across batches), drops, drop locations."""

    def __init__(self, writer: tracefile.Writer, scope: set[int] | None = None,
                 housekeeping: set[int] | None = None):
        self.writer = writer
        # which drops count (drops.rule of the capture's metadata, set by the capture; until
        # then only the reasons that are a socket's own cleanup are left out)
        self.rule = arrival.Rule(housekeeping=np.array(sorted(housekeeping or ()), dtype=np.int64))
        self.scope = np.array(sorted(scope | {0}), dtype=np.uint32) if scope else None
        self.events = 0
        self.packets = 0
        self.drops = 0
        self.stack_drops = 0      # a socket's own cleanup (drops.housekeeping): not the network's
        self.out_of_scope = 0
        self.locations: set[int] = set()
        self._prev = np.zeros(0, dtype=np.uint64)
        self._batch: list[np.ndarray] = []

    def widen(self, inodes) -> None:
        """More namespaces in scope (a pod started on this node during the capture)."""
        if self.scope is not None and len(inodes):
            self.scope = np.union1d(self.scope, np.array(list(inodes), dtype=np.uint32))

    def add(self, arr: np.ndarray) -> None:
        if self.scope is not None and len(arr):
            keep = np.isin(arr["netns"], self.scope)
            if not keep.all():
                self.out_of_scope += int((~keep).sum())
                arr = arr[keep]
        if not len(arr):
            return
        hook = arr["hook"]
        is_drop = hook == HOOK_IDS["drop"]
        daddr = addr_keys(arr["daddr"], arr["flags"] & FLAG_V6)   # the frame's keys
        self.drops += int(drops.counted(hook, arr["reason"], arr["netns"], daddr, arr["proto"],
                                           arr["icmp_type"], self.rule, arr["tcp_flags"]).sum())
        self.stack_drops += int(drops.housekeeping(hook, arr["reason"], self.rule, arr["proto"], arr["tcp_flags"],
                                                   arr["netns"], daddr).sum())
        if is_drop.any():
            self.locations.update(int(x) for x in np.unique(arr["location"][is_drop]) if x)
        hops = arr[(hook != HOOK_IDS["drop"]) & (hook != HOOK_IDS["consume"])]
        if len(hops):
            keys = np.unique(_content_hash(hops))
            self.packets += int((~np.isin(keys, self._prev, assume_unique=True)).sum())
            self._prev = keys
        self.events += len(arr)
        self.writer.write_records(arr)

    def flush(self) -> None:
        self.writer.flush()
