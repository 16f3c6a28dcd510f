"""Several trace files read as one trace: per-node captures on one clock, with each node's window.

A capture runs on each node (or, in the lab, `capture --on-node`), each writing its own file
from the moment it was ready until it stopped. Read together, a packet that crossed two nodes
has its hops in two files; one seen while the other node's capture was not running is a
partial view, which each file's observation window (`window` in its metadata) tells
`analyze` (tracer/reconstruct/window.py).
"""

from __future__ import annotations

import glob as globbing
from pathlib import Path

import pandas as pd

from tracer import tracefile
from tracer.analysis.frames import concat
from tracer.reconstruct import window as windows

# columns that make one event unique: the same event in two files (overlapping scopes) is one
SAME_EVENT = ["ts_ns", "skb", "hook", "netns", "ifindex"]


def paths(spec) -> list[Path]:
    """The files a FILE, DIR (its *.parquet), GLOB, or a list of those names, in name order."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise tracefile.TraceFileError(p, "is a directory with no trace file (*.parquet) in it")
            out += found
        elif any(c in str(item) for c in "*?[") and not p.exists():
            found = sorted(Path(x) for x in globbing.glob(str(item)))
            if not found:
                raise tracefile.TraceFileError(p, "matches no file")
            out += found
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def is_many(spec) -> bool:
    """Whether `spec` names more than one file (or a directory, or a pattern)."""
    if isinstance(spec, (list, tuple)):
        return True
    p = Path(spec)
    return p.is_dir() or (any(c in str(spec) for c in "*?[") and not p.exists())


def load_many(files: list[Path]) -> tuple[pd.DataFrame, dict]:
    """(events, metadata) of several trace files as one capture: events on the first file's
    clock (files of other hosts moved by the difference of their realtime offsets), the
    placements, names and counters joined, and every file's observer in the window."""
    loaded = [tracefile.load(f) for f in files]
    frames = []
    for (ev, _), shift in zip(loaded, shifts([m for _, m in loaded])):
        if shift:
            ev = ev.assign(ts_ns=(ev["ts_ns"].astype("int64") - shift))
        frames.append(ev)
    events = concat(frames)
    events = (events.drop_duplicates(subset=[c for c in SAME_EVENT if c in events.columns])
              .sort_values("ts_ns", kind="stable").reset_index(drop=True))
    return events, merged_meta([m for _, m in loaded], files)


def shifts(metas: list[dict]) -> list[int]:
    """How far each file's event clock is ahead of the first file's (subtract from its ts_ns)."""
    return [_shift(m, metas[0]) for m in metas]


def merged_meta(metas: list[dict], files: list[Path]) -> dict:
    """The metadata of several files read as one capture: the first file's, with the
    placements, names and counters joined, and every file's observer in the window."""
    ref = metas[0]
    spans = {}
    for meta, shift in zip(metas, shifts(metas)):
        w = windows.from_meta(meta)
        for node, (s, e) in (w.spans.items() if w else ()):
            spans[node] = (None if s is None else s - shift, None if e is None else e - shift)
    meta = dict(ref, kind="capture", path=", ".join(str(f) for f in files), files=[str(f) for f in files])
    for key in ("placement", "drop_reasons", "locations", "ct_info_names"):
        meta[key] = {k: v for m in metas for k, v in (m.get(key) or {}).items()}
    counters: dict = {}
    for m in metas:
        for k, v in (m.get("counters") or {}).items():
            if isinstance(v, (int, float)):
                counters[k] = counters.get(k, 0) + v
    meta["counters"] = counters
    meta["incomplete"] = any(m.get("incomplete") for m in metas)
    if meta["incomplete"]:
        meta["incomplete_reason"] = "; ".join(f"{f}: {m.get('incomplete_reason')}"
                                              for m, f in zip(metas, files) if m.get("incomplete"))
    meta["window"] = windows.Window(spans).as_json() if spans else None
    return meta


def _shift(meta: dict, ref: dict) -> int:
    """How far this file's event clock is ahead of the reference file's: 0 on the same host
    (one kernel, one monotonic clock), else the difference of their realtime offsets."""
    if meta.get("hostname") == ref.get("hostname"):
        return 0
    a = (meta.get("clock") or {}).get("realtime_offset_ns")
    b = (ref.get("clock") or {}).get("realtime_offset_ns")
    return int(b) - int(a) if isinstance(a, int) and isinstance(b, int) else 0
