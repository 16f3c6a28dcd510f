"""Kernel-side variants of bpf/podtrace.c, built in memory for measuring proposed changes
(bench/datapath.py `*_empty`, `*_noprefilter`). Nothing here is used by the tracer, and the
files in bpf/ are never modified: the variant text is produced from program.source() for
the duration of one session's compile.

- empty: the rx/tx entry programs return at once (no events): the cost of the hook itself,
  the floor under any filter (raw or perf tracepoints, as the session loads them).
- noprefilter: without the bit arrays in front of the `addrs` and `tracked` lookups
  (`PT_NO_PREFILTER`): every packet pays both hash lookups, as before they were added.

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


def variant_text(text: str, empty: bool = False, noprefilter: bool = False) -> str:
    if noprefilter:
        text = "#define PT_NO_PREFILTER 1   /* bench/bpfvariants.py noprefilter */\n" + text
    if empty:
        text, n = EMPTY_RE.subn(lambda m: m.group(1) + EMPTY_FIX, text)
        if n != 4:
            raise RuntimeError(f"bpf/podtrace.c changed: pt_rx/pt_tx found {n} times, not 4 (two builds)")
    return text


@contextlib.contextmanager
def patched(empty: bool = False, noprefilter: bool = False):
    """Within this block program.source() returns the variant text."""
    orig = program.source

    def source(files=None):
        return variant_text(orig(files), empty, noprefilter)
    program.source = source
    try:
        yield
    finally:
        program.source = orig
