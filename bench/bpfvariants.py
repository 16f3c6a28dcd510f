"""Kernel-side variants of bpf/podtrace.c, built in memory for measuring proposed changes
(bench/datapath.py `*_freefix`, `*_raw`). Nothing here is used by the tracer, and the
files in bpf/ are never modified: the variant text is produced from bpfprog.source() for
the duration of one session's compile.

- freefix: `on_free` (consume_skb/kfree_skb, hit for every skb freed on the machine)
  returns before parsing the packet when the skb was never matched and the hook is
  consume_skb: the parse result is not used on that path. Same events.
- raw: the four hooks as raw tracepoints (`ctx->args[]` are the tracepoint's arguments)
  instead of perf-event tracepoints, which run the tracepoint's TP_fast_assign (copying
  the device name, a dozen skb fields) into a per-CPU buffer before calling the program.
  Same events (`network_offset` is recomputed from skb->network_header).
- fewreads: on_packet reads the sk_buff's protocol/tail/head in one call, and the packet's
  headers in one 96-byte read parsed from the stack (the per-header reads stay as the
  fallback). Same events.
- empty: the rx/tx hooks return at once (no events): the cost of the hook itself.
- earlysample: with sampling on, a packet that will not be kept leaves on_packet before
  it is recorded in `tracked` and before emit(). Same events.
"""

from __future__ import annotations

import contextlib
import re

from tracer import bpfprog

# the first statement after `was = tracked.lookup(&key);` inside on_free()
FREE_RE = re.compile(r"(static __always_inline int on_free\([^)]*\) \{\n(?:[^\n]*\n)*?"
                     r"\s*u(?:8|32) \*was = tracked\.lookup\(&key\);\n)")
FREE_FIX = "    if (!was && hook != HOOK_DROP) return 0;   /* bench/bpfvariants.py freefix */\n"

RAW_FUNCS = r"""
/* bench/bpfvariants.py: raw tracepoint entry points */
int rpt_rx(struct bpf_raw_tracepoint_args *ctx) {
    const u8 *skb = (const u8 *)ctx->args[0];
    const u8 *data = (const u8 *)rd64(skb, SKB_DATA);
    return on_packet(ctx, skb, data, HOOK_RX ON_PACKET_EXTRA);
}
int rpt_tx(struct bpf_raw_tracepoint_args *ctx) {
    const u8 *skb = (const u8 *)ctx->args[0];
    const u8 *head = (const u8 *)rd64(skb, SKB_HEAD);
    u16 nh = 0;
    bpf_probe_read_kernel(&nh, sizeof(nh), skb + SKB_NETWORK_HEADER);
    return on_packet(ctx, skb, head + nh, HOOK_TX ON_PACKET_EXTRA);
}
int rpt_kfree(struct bpf_raw_tracepoint_args *ctx) {
    return on_free(ctx, (const u8 *)ctx->args[0], HOOK_DROP, (u64)ctx->args[1], (u32)ctx->args[2]);
}
int rpt_consume(struct bpf_raw_tracepoint_args *ctx) {
    return on_free(ctx, (const u8 *)ctx->args[0], HOOK_CONSUME, (u64)ctx->args[1], 0);
}
"""
# fewreads: the sk_buff fields on_packet needs (protocol, tail, head) in one read of the span
# they share (on this kernel 176..200), and the packet's headers in one read of PT_BUF bytes
# parsed from the stack by a third instance of bpf/parser.h (the per-header path stays as
# the fallback for packets whose headers do not fit).
FEW_DECLS = r"""
/* bench/bpfvariants.py fewreads */
#define PT_BUF 96
#define SPAN_LEN (SKB_HEAD + 8 - SKB_PROTOCOL)
static __always_inline int buf_load(const u8 *c, u32 off, void *dst, u32 len) {
    if (off > PT_BUF || len > PT_BUF - off) return -1;
    __builtin_memcpy(dst, c + (off & 127), len);
    return 0;
}
#define P_(name) buf_##name
#define P_CTX const u8 *
#define P_LOAD(c, off, dst, len) buf_load((c), (off), (dst), (len))
#include "parser.h"
#undef P_
#undef P_CTX
#undef P_LOAD
"""
FEW_OLD = ("    if (skb_u16(skb, SKB_PROTOCOL) != ETH_P_IP_BE) return 0;\n"
           "    u32 avail = linear_from(skb, l3);\n"
           "    int ok = kern_parse_packet(l3, 0, avail, &p);\n")
FEW_NEW = r"""#if SKB_TAIL > SKB_PROTOCOL && SKB_HEAD > SKB_TAIL && SPAN_LEN <= 32
    u8 span[32];
    if (bpf_probe_read_kernel(span, SPAN_LEN, skb + SKB_PROTOCOL)) return 0;
    if (*(u16 *)span != ETH_P_IP_BE) return 0;
    const u8 *head_ = *(const u8 **)(span + (SKB_HEAD - SKB_PROTOCOL));
    u32 tail_ = *(u32 *)(span + (SKB_TAIL - SKB_PROTOCOL));
    u32 avail = 0;
    if (head_ && l3 >= head_ && (u64)(l3 - head_) < tail_) avail = tail_ - (u32)(l3 - head_);
#else
    if (skb_u16(skb, SKB_PROTOCOL) != ETH_P_IP_BE) return 0;
    u32 avail = linear_from(skb, l3);
#endif
    int ok = -1;
    u8 pb[PT_BUF];
    if (avail >= 20 && !bpf_probe_read_kernel(pb, PT_BUF, l3))
        ok = buf_parse_packet(pb, 0, avail < PT_BUF ? avail : PT_BUF, &p);
    if (ok < 0 && avail > PT_BUF) {
        __builtin_memset(&p, 0, sizeof(p));
        ok = kern_parse_packet(l3, 0, avail, &p);
    }
"""

# empty: on_packet returns at once, so what remains is the cost of the hook itself (the
# tracepoint firing, the program call) — the floor under any filter.
EMPTY_RE = re.compile(r"(static __always_inline int on_packet\([^)]*\) \{\n)")
EMPTY_FIX = "    if (1) return 0;   /* bench/bpfvariants.py empty */\n"

# earlysample: a packet that sampling will not keep leaves on_packet right after the filter,
# before the skb is recorded in `tracked` (an LRU hash insert) and before emit() reads the
# device and namespace; guarded() would drop its events anyway (same hash, same verdict on
# every hop), so the events are the same.
EARLY_OLD = "    if (wanted(&p)) {\n        if (!was) tracked.update(&key, &id);\n"
EARLY_NEW = ("    if (wanted(&p)) {\n"
             "        if (!was && !sampled_in(&p)) {   /* bench/bpfvariants.py earlysample */\n"
             "            count(C_MATCHED);\n            count(C_SAMPLED_OUT);\n            return 0;\n        }\n"
             "        if (!was) tracked.update(&key, &id);\n")

RAW_ATTACH = [("netif_receive_skb", "rpt_rx"), ("net_dev_start_xmit", "rpt_tx"),
              ("kfree_skb", "rpt_kfree"), ("consume_skb", "rpt_consume")]


def variant_text(text: str, freefix: bool, raw: bool, fewreads: bool = False, empty: bool = False,
                 earlysample: bool = False) -> str:
    if earlysample:
        if text.count(EARLY_OLD) != 1:
            raise RuntimeError("bpf/podtrace.c changed: on_packet()'s tracked.update was not found once")
        text = text.replace(EARLY_OLD, EARLY_NEW)
    if empty:
        text, n = EMPTY_RE.subn(lambda m: m.group(1) + EMPTY_FIX, text)
        if n != 1:
            raise RuntimeError("bpf/podtrace.c changed: on_packet() was not found once")
    if fewreads:
        if text.count(FEW_OLD) != 1:
            raise RuntimeError("bpf/podtrace.c changed: on_packet()'s reads were not found once")
        anchor = "static __always_inline int addr_wanted"
        text = text.replace(anchor, FEW_DECLS + "\n" + anchor, 1).replace(FEW_OLD, FEW_NEW)
    if freefix:
        text, n = FREE_RE.subn(lambda m: m.group(1) + FREE_FIX, text)
        if n != 1:
            raise RuntimeError("bpf/podtrace.c changed: on_free()'s tracked.lookup was not found once")
    if raw:
        # on_packet(ctx, skb, l3, hook) or, since the kprobes share it, (…, hook, aux, aux2)
        extra = ", 0, 0" if re.search(r"on_packet\([^)]*u8 hook, u32 aux, u64 aux2\)", text) else ""
        funcs = RAW_FUNCS.replace(" ON_PACKET_EXTRA", extra)
        marker = "/* ---- bpf/kprobes.c ---- */"
        text = text.replace(marker, funcs + "\n" + marker) if marker in text else text + funcs
    return text


@contextlib.contextmanager
def patched(freefix: bool = False, raw: bool = False, fewreads: bool = False, empty: bool = False,
            earlysample: bool = False):
    """Within this block bpfprog.source() returns the variant text."""
    orig = bpfprog.source

    def source(files=None):
        return variant_text(orig(files), freefix, raw, fewreads, empty, earlysample)
    bpfprog.source = source
    try:
        yield
    finally:
        bpfprog.source = orig


def attach_raw(bpf) -> None:
    for tp, fn in RAW_ATTACH:
        bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
