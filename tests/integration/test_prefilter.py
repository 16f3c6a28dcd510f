"""The two prefilters in front of the kernel's hash lookups (bpf/podtrace.c): `addr_bits`,
written by user space alongside `addrs`, and `tracked_cnt`, counted by the programs
alongside `tracked`. A prefilter may say "maybe" wrongly, never "no" wrongly: an address
whose bit another address shares stays matched when that one leaves, the kernel and
tracer/session.py agree on every slot, and the counts equal the table's entries."""

from __future__ import annotations

import ipaddress
import operator

from tests.integration.lab_fixture import drain_all, lab, ping, pod, wait_until  # noqa: F401
from tracer.node import netns
from tracer.kernel import hooks
from tracer.kernel.contract import SLOT_MULT, addr_bit_words, addr_key, addr_slot
from tracer.kernel.session import SessionConfig, TraceSession


def slot_twin(addr: str) -> str:
    """Another address whose `addr_bits` bit is the same as addr's (it never gets traffic:
    it only sits in the filter)."""
    inv = pow(SLOT_MULT, -1, 2 ** 32)
    h = addr_slot(addr)
    for low in range(1, 1 << 16):
        k = (((h << 16) | low) * inv) % 2 ** 32
        if k != addr_key(addr):
            twin = str(ipaddress.IPv4Address(k.to_bytes(4, "little")))
            assert addr_slot(twin) == h
            return twin
    raise AssertionError("no twin")


def tracked_slot(skb: int) -> int:
    return ((((skb >> 8) & 0xFFFFFFFF) * SLOT_MULT) & 0xFFFFFFFF) >> 20


def _events(s: TraceSession, src: dict, dst: dict, seq: int) -> int:
    before = s.sink.count()
    assert ping(src["netns"], dst["ip"], seq=seq) == dst["ip"]
    drain_all(s)
    return s.sink.count() - before


def _words(s: TraceSession) -> dict[int, int]:
    t = s.loaded.bpf["addr_bits"]
    return {k.value: v.value for k, v in t.items() if v.value}


def test_prefilters_agree_with_their_tables(lab):
    src, dst = pod(lab, "pod-1-1"), pod(lab, "pod-2-1")
    twin = slot_twin(dst["ip"])
    inodes = [netns.inode(x["netns"]) for x in lab["nodes"] + lab["pods"]]
    s = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"], twin], budget=0, netns=inodes,
                                   hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS]))
    try:
        s.start()
        assert _words(s) == addr_bit_words([src["ip"], dst["ip"], twin])
        assert _events(s, src, dst, 1) > 0, "the kernel's slots differ from tracer/session.py's"

        s.set_addrs(remove=[twin])                     # dst's bit is twin's: it must stay set
        assert _words(s) == addr_bit_words([src["ip"], dst["ip"]])
        assert _events(s, src, dst, 2) > 0, "removing an address cleared a bit another one needs"

        bits = s.loaded.bpf["addr_bits"]                # the kernel really reads the bit
        w = addr_slot(dst["ip"]) >> 6
        kept = bits[bits.Key(w)].value
        bits[bits.Key(w)] = bits.Leaf(kept & ~(1 << (addr_slot(dst["ip"]) & 63)))
        assert _events(s, src, dst, 3) == 0, "a clear bit did not stop the lookup"
        bits[bits.Key(w)] = bits.Leaf(kept)
        assert _events(s, src, dst, 4) > 0

        # tracked_cnt: per slot, exactly the entries of `tracked` (none evicted here), once
        # the skbs still in flight are freed
        def counts_and_entries():
            counts = {k.value: v.value for k, v in s.loaded.bpf["tracked_cnt"].items() if v.value}
            want: dict[int, int] = {}
            for k in s.loaded.bpf["tracked"].keys():
                want[tracked_slot(k.value)] = want.get(tracked_slot(k.value), 0) + 1
            return counts, want
        assert wait_until(lambda: operator.eq(*counts_and_entries()), 5), \
            f"tracked_cnt differs from the entries of tracked (an underflow shows as ~2**32): {counts_and_entries()}"

        s.set_addrs(remove=[dst["ip"]])
        assert _events(s, src, dst, 5) == 0
        assert _words(s) == addr_bit_words([src["ip"]])
        s.set_addrs(add=[dst["ip"]])
        assert _events(s, src, dst, 6) > 0
    finally:
        s.close()
