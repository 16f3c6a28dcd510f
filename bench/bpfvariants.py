"""Kernel-side variants of bpf/podtrace.c, built in memory for measuring proposed changes
(bench/datapath.py `*_raw`, `*_empty`, `*_noprefilter`). Nothing here is used by the tracer, and the
files in bpf/ are never modified: the variant text is produced from bpfprog.source() for
the duration of one session's compile.

- raw: the four hooks as raw tracepoints (`ctx->args[]` are the tracepoint's arguments)
  instead of perf-event tracepoints, which run the tracepoint's TP_fast_assign (copying
  the device name, a dozen skb fields) into a per-CPU buffer before calling the program.
  Same events (`network_offset` is recomputed from skb->network_header).
- empty: the rx/tx hooks return at once (no events): the cost of the hook itself.
- noprefilter: without the bit arrays in front of the `addrs` and `tracked` lookups
  (`PT_NO_PREFILTER`): every packet pays both hash lookups, as before they were added.

(`fewreads`, `earlysample` and `freefix` — on_free leaving early for a consumed skb never
matched — measured here first, are now part of bpf/podtrace.c.)
"""

from __future__ import annotations

import contextlib
import re

from tracer.kernel import program

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
# empty: on_packet returns at once, so what remains is the cost of the hook itself (the
# tracepoint firing, the program call) — the floor under any filter.
EMPTY_RE = re.compile(r"(static __always_inline int on_packet\([^)]*\) \{\n)")
EMPTY_FIX = "    if (1) return 0;   /* bench/bpfvariants.py empty */\n"

RAW_ATTACH = [("netif_receive_skb", "rpt_rx"), ("net_dev_start_xmit", "rpt_tx"),
              ("kfree_skb", "rpt_kfree"), ("consume_skb", "rpt_consume")]


def variant_text(text: str, raw: bool, empty: bool = False, noprefilter: bool = False) -> str:
    if noprefilter:
        text = "#define PT_NO_PREFILTER 1   /* bench/bpfvariants.py noprefilter */\n" + text
    if empty:
        text, n = EMPTY_RE.subn(lambda m: m.group(1) + EMPTY_FIX, text)
        if n != 1:
            raise RuntimeError("bpf/podtrace.c changed: on_packet() was not found once")
    if raw:
        # on_packet(ctx, skb, l3, hook) or, since the kprobes share it, (…, hook, aux, aux2)
        extra = ", 0, 0" if re.search(r"on_packet\([^)]*u8 hook, u32 aux, u64 aux2\)", text) else ""
        funcs = RAW_FUNCS.replace(" ON_PACKET_EXTRA", extra)
        marker = "/* ---- bpf/kprobes.c ---- */"
        text = text.replace(marker, funcs + "\n" + marker) if marker in text else text + funcs
    return text


@contextlib.contextmanager
def patched(raw: bool = False, empty: bool = False, noprefilter: bool = False):
    """Within this block bpfprog.source() returns the variant text."""
    orig = program.source

    def source(files=None):
        return variant_text(orig(files), raw, empty, noprefilter)
    program.source = source
    try:
        yield
    finally:
        program.source = orig


def attach_raw(bpf) -> None:
    for tp, fn in RAW_ATTACH:
        bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
