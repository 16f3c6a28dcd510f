"""Kernel-side variants of bpf/podtrace.c, built in memory for measuring proposed changes
(bench/datapath.py `*_empty`, `*_noprefilter`). Nothing here is used by the tracer, and the
files in bpf/ are never modified: the variant text is produced from program.source() for
the duration of one session's compile.

- empty: the rx/tx entry programs return at once (no events): the cost of the hook itself,
  the floor under any filter (raw or perf tracepoints, as the session loads them).
- noprefilter: without the bit arrays in front of the `addrs` and `tracked` lookups
  (`PT_NO_PREFILTER`): every packet pays both hash lookups, as before they were added.
- noct: events without the conntrack view (`HAVE_CT` 0): what the ~10 reads of the
  conntrack entry cost a matched packet per hop.
- noemit: a matched packet is parsed, filtered and followed, but no record is written (emit
  returns at once): what the ring buffer and the record's reads cost.

(`raw` tracepoints, `fewreads`, `earlysample` and `freefix` — on_free leaving early for a
consumed skb never matched — measured here first, are now part of bpf/podtrace.c; the
perf tracepoints are bench/datapath.py's `_perf`.)
"""

from __future__ import annotations

import contextlib
import re

from tracer.kernel import program

# empty: pt_rx / pt_tx (both builds) return at once
EMPTY_RE = re.compile(r"(\nint pt_(?:rx|tx)\([^)]*\) \{\n)")
EMPTY_FIX = "    if (1) return 0;   /* bench/bpfvariants.py empty */\n"


EMIT_RE = re.compile(r"(static __always_inline void emit\([^)]*\) \{\n)")


def variant_text(text: str, empty: bool = False, noprefilter: bool = False, noct: bool = False,
                 noemit: bool = False) -> str:
    if noct:
        text = "#undef HAVE_CT\n#define HAVE_CT 0   /* bench/bpfvariants.py noct */\n" + text
    if noemit:
        text, n = EMIT_RE.subn(lambda m: m.group(1) + "    if (1) return;   /* bench/bpfvariants.py noemit */\n", text)
        if n != 1:
            raise RuntimeError("bpf/podtrace.c changed: emit() was not found once")
    if noprefilter:
        text = "#define PT_NO_PREFILTER 1   /* bench/bpfvariants.py noprefilter */\n" + text
    if empty:
        text, n = EMPTY_RE.subn(lambda m: m.group(1) + EMPTY_FIX, text)
        if n != 4:
            raise RuntimeError(f"bpf/podtrace.c changed: pt_rx/pt_tx found {n} times, not 4 (two builds)")
    return text


@contextlib.contextmanager
def patched(empty: bool = False, noprefilter: bool = False, noct: bool = False, noemit: bool = False):
    """Within this block program.source() returns the variant text."""
    orig = program.source

    def source(files=None):
        return variant_text(orig(files), empty, noprefilter, noct, noemit)
    program.source = source
    try:
        yield
    finally:
        program.source = orig
