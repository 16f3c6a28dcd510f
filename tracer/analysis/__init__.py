"""Offline analysis of trace files (`podtrace capture`, `podtrace flow --save`), for Jupyter
or `podtrace analyze FILE`.

    from tracer import analysis
    t = analysis.load("capture.parquet")
    t.flows.sort_values("dropped", ascending=False).head()

`load(path)` returns a `Trace` of pandas DataFrames; the columns are documented in
docs/analysis.md and in `COLUMNS`. One engine (tracer.reconstruct) judges the packets, by
one of two paths:

- flow files (`flowfile`): the per-packet path `podtrace flow` itself runs, with the
  evidence the live run saved, so a saved trace gives the live verdicts and causes offline;
- captures, or `mode="capture"` on any file (`vectorised`): the fast path, whole columns at
  a time, for millions of events; without probes nobody says which side asked, so
  `direction` is `forward` for the direction of the first packet seen of a flow and
  `reverse` for the other.

Both feed the same flow and drop tables (`tables`); `plots` draws, `report` is what
`analyze` prints.
"""

from __future__ import annotations

import pandas as pd

from tracer import tracefile
from tracer.analysis import merge, partitioned, public
from tracer.analysis.flowfile import _flow_input, _flow_tables, reconstruct
from tracer.analysis.plots import STATUS_COLOR, hop_label, human_ns, ms_formatter, path_width, plot_path
from tracer.analysis.report import render_summary, summary_doc
from tracer.analysis.tables import drop_table, flow_table
from tracer.analysis.trace import COLUMNS, STATUSES, Trace
from tracer.analysis.vectorised import GAP_NS, reconstruct_vectorised

__all__ = ["COLUMNS", "GAP_NS", "STATUSES", "STATUS_COLOR", "Trace", "analyse", "drop_table",
           "flow_table", "hop_label", "human_ns", "load", "ms_formatter", "path_width", "plot_path", "reconstruct", "reconstruct_vectorised",
           "render_summary", "summary_doc", "_flow_input"]


def load(path, mode: str = "auto", partition_events: int | None = None, spill_dir=None) -> Trace:
    """Read a trace file and rebuild its packets, hops, flows and drops.

    mode: "auto" (flow files as `flow` judged them, captures vectorised), "flow" or
    "capture" (the vectorised reconstruction on any file). `path` may also be a directory,
    a glob or a list of files (one per node): they are read as one capture (merge). When
    they hold more than `partition_events` events (default partitioned.PARTITION_EVENTS),
    they are rebuilt that many at a time (partitioned), spilling to a temporary directory
    under `spill_dir`: the tables are the same, the memory a partition's."""
    if merge.is_many(path):
        files = merge.paths(path)
        if len(files) > 1:
            per = partition_events or partitioned.PARTITION_EVENTS
            if mode != "flow" and partitioned.total_events(files) > per:
                return partitioned.load(files, per, spill_dir)
            events, meta = merge.load_many(files)
            return analyse(events, meta, "capture" if mode == "auto" else mode)
        path = files[0]
    events, meta = tracefile.load(path)
    meta["path"] = str(path)
    return analyse(events, meta, mode)


def analyse(events: pd.DataFrame, meta: dict, mode: str = "auto") -> Trace:
    if mode not in ("auto", "flow", "capture"):
        raise ValueError(f"mode must be auto, flow or capture, not {mode!r}")
    is_flow = meta.get("kind") == "flow" and "src" in meta and "dst" in meta
    if mode == "flow" and not is_flow:
        raise tracefile.TraceFileError(meta.get("path", "trace"), "is not a `flow --save` trace",
                                       "use mode='capture'")
    from tracer.analysis import busy

    if mode in ("flow", "auto") and is_flow and busy.is_busy(events, meta):
        # a busy watch: counted whole columns at a time, as the live run did
        packets, hops = busy.tables(events, meta)
        used = "flow"
    elif mode == "flow" or (mode == "auto" and is_flow):
        packets, hops = _flow_tables(events, meta)
        used = "flow"
    else:
        packets, hops = reconstruct_vectorised(events, meta)
        used = "capture"
    # the verdict under the names `flow -o json` gives it
    for name, col in (("node", "verdict_node"), ("dev", "verdict_dev"), ("point", "verdict_point")):
        packets[name] = packets[col]
    fl = flow_table(packets, meta)
    if len(packets):
        packets["flow"] = fl.attrs.pop("packet_flow")
        if len(hops):
            at = hops["packet"].to_numpy()
            hops["flow"] = packets["flow"].to_numpy()[at]
            if hops["direction"].isna().all():
                d = packets["direction"]
                hops["direction"] = (pd.Categorical.from_codes(d.cat.codes.to_numpy()[at], d.cat.categories)
                                     if hasattr(d, "cat") else d.to_numpy()[at])
    tables = {"events": events, "hops": hops, "packets": packets, "flows": fl, "drops": drop_table(packets)}
    tables = {k: public.publish(k, v, meta) for k, v in tables.items()}
    return Trace(tables["events"], tables["hops"], tables["packets"], meta, tables["flows"], tables["drops"], used)
