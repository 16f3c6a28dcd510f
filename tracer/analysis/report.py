"""What `podtrace analyze` shows: the summary, the worst flows, the drops, as JSON or rich tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracer.analysis import flowverdict
from tracer.analysis.trace import Trace

def summary_doc(t: Trace, top: int = 20) -> dict:
    """What `analyze` shows: the summary, the worst flows, the drops and the losses."""
    fl = t.flows
    if len(fl):
        bad = fl["dropped"] + fl["lost"]
        fl = fl.assign(_bad=bad).sort_values(["_bad", "packets"], ascending=False).drop(columns="_bad")
    undelivered = t.undelivered()      # a partitioned trace reads only these from disk
    cols = ["flow", "proto", "src", "sport", "dst", "dport", "src_pod", "dst_pod", "dst_pod_port", "service", "packets",
            "delivered", "dropped", "lost", "left", "partial", "p50_ns", "p99_ns", "tcp_flags"]
    return {
        "file": t.meta.get("path"),
        "incomplete": t.meta.get("incomplete_reason") if t.meta.get("incomplete") else flowverdict.interruption(t.meta),
        "flow": flowverdict.flow_doc(t.meta, t.packets) if t.meta.get("kind") == "flow" else None,
        "summary": t.summary(),
        "counters": t.counters,
        "selection": t.meta.get("selection"),
        "flows": _records(fl[cols].head(top)) if len(fl) else [],
        "drops": _records(t.drops.head(top)),
        "not_delivered": _records(undelivered[["packet", "flow", "direction", "proto", "tcp_flags", "src", "dst",
                                               "status", "verdict_node", "verdict_dev", "reason", "hint"]].head(top))
        if len(undelivered) else [],
    }


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for r in df.astype(object).where(df.notna(), None).to_dict("records"):
        out.append({k: (v.isoformat() if isinstance(v, pd.Timestamp) else v.item() if hasattr(v, "item") else v)
                    for k, v in r.items()})
    return out


def _us(ns) -> str:
    if ns is None or (isinstance(ns, float) and np.isnan(ns)):
        return "-"
    from tracer.render_compact import human_time
    return human_time(ns)


def render_summary(doc: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    from tracer.reconstruct import tcpflags
    from tracer.render_compact import endpoint

    s = doc["summary"]
    console.print(f"[bold]{s['kind'] or 'trace'}[/bold]: {s['events']} events, {s['packets']} packets, "
                  f"{s['flows']} flows over {s['span_s']}s"
                  + (f"  (format {s['format_version']}, upgraded from {s['upgraded_from']})"
                     if s.get("upgraded_from") else ""))
    console.print(f"delivered {s['delivered']}  [red]dropped {s['dropped']}[/red]  "
                  f"[yellow]lost {s['lost']}[/yellow]  left {s['left']}  "
                  + (f"[cyan]partial {s['partial']}[/cyan] (seen while a node was not tracing)  "
                     if s.get("partial") else "")
                  + (f"stack drops {s['stack_drops']} (socket cleanup, not the network)  "
                     if s.get("stack_drops") else "")
                  + (f"[bold red]events lost {s['events_lost']} (ring buffer full: paths may have gaps)[/bold red]"
                     if s["events_lost"] else "events lost 0"))
    flowverdict.render(doc.get("flow"), console)
    if doc["flows"]:
        t = Table(title="flows (worst first)", title_justify="left", show_edge=False)
        cols = ("flow", "proto", "source", "destination", "service", "pkts", "deliv", "drop", "lost",
                "p50", "p99", "flags")
        rows = []
        for f in doc["flows"]:
            src = endpoint(f["src_pod"] or f["src"], f["sport"])
            port = f.get("dst_pod_port") if f["dst_pod"] else f["dport"]   # a Service's backend: its own port
            dst = endpoint(f["dst_pod"] or f["dst"], port)
            svc = (f["service"] or "") + (f":{f['dport']}" if f["service"] and f["dport"] is not None
                                          and f["dport"] != port else "")
            rows.append([str(f["flow"]), f["proto"] or "", Text(src), Text(dst), svc, str(f["packets"]),
                         str(f["delivered"]), str(f["dropped"]), str(f["lost"]), _us(f["p50_ns"]),
                         _us(f["p99_ns"]),
                         Text("".join(tcpflags.bracketed(x) for x in (f.get("tcp_flags") or "").split()))])
        # service and flags only when some flow has one (no room to waste at 120 columns)
        keep = [i for i, c in enumerate(cols) if c not in ("service", "flags") or any(str(r[i]) for r in rows)]
        for i in keep:
            c = cols[i]
            t.add_column(c, justify="right" if c in ("flow", "pkts", "deliv", "drop", "lost", "p50", "p99") else "left")
        for r in rows:
            t.add_row(*(r[i] for i in keep))
        console.print(t)
    if doc["drops"]:
        t = Table(title="drops", title_justify="left", show_edge=False)
        for c in ("reason", "node", "dev", "location", "count", "flows"):
            t.add_column(c, justify="right" if c in ("count", "flows") else "left")
        for d in doc["drops"]:
            t.add_row(d["reason"] or "", d["node"] or "(fabric)", d["dev"] or "", d["location"] or "",
                      str(d["count"]), str(d["flows"]))
        console.print(t)
    else:
        console.print("no drops")
