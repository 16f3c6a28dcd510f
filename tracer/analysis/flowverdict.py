"""What a saved flow concluded: the live run's verdict, beside the causes its packets give."""

from __future__ import annotations

import pandas as pd

CAUSE_COLUMNS = ["packet", "direction", "seq", "status", "verdict_node", "verdict_dev", "reason", "location",
                 "cause", "hint", "runbook"]


def interruption(meta: dict) -> str | None:
    """"interrupted after 3 of 20 probes" of a flow stopped by Ctrl-C, else None."""
    if not meta.get("interrupted"):
        return None
    after = (meta.get("interruption") or {}).get("after")
    return f"interrupted {after}" if after else "interrupted"


def flow_doc(meta: dict, packets: pd.DataFrame) -> dict | None:
    """The flow's verdict as `podtrace flow` gave it (status, summary, problems), and every
    packet that was not delivered or has a cause, with its cause, hint (the named rule) and
    runbook. None for a capture."""
    if meta.get("kind") != "flow":
        return None
    v = meta.get("flow_verdict") or {}
    agg = meta.get("aggregate")
    rows = []
    more = 0
    if len(packets):
        status = packets["status"].astype(str)
        if agg is not None:    # a busy watch: its failing packets, up to as many as it judged in full
            bad = packets[status.isin(["dropped", "lost", "left"]).to_numpy()]
            cap = max(int(agg.get("failing_judged") or 0), 20)
            more, bad = max(0, len(bad) - cap), bad.head(cap)
        else:
            bad = packets[(status != "delivered") | packets["cause"].notna()]
        sel = bad[[c for c in CAUSE_COLUMNS if c in bad.columns]].astype(object)
        for r in sel.where(sel.notna(), None).to_dict("records"):
            rows.append({k: (x.item() if hasattr(x, "item") else x) for k, x in r.items()})
    return {"status": v.get("status"), "summary": v.get("summary"), "problems": list(v.get("problems") or []),
            "complete": meta.get("complete", True) is not False, "interrupted": interruption(meta),
            "packets": rows, **({"aggregate": agg, "more_packets": more} if agg is not None else {})}


def render(doc: dict | None, console) -> None:
    from rich.text import Text

    if not doc:
        return
    if doc["status"]:
        ok = doc["status"] == "ok"
        console.print(Text(f"flow {'OK' if ok else 'FAILED'}: {doc['summary']}"
                           + (f"  (incomplete: {doc['interrupted']})" if doc["interrupted"] else ""),
                           style="bold green" if ok else "bold red"))
    elif doc["interrupted"]:
        console.print(Text(f"flow incomplete ({doc['interrupted']})", style="bold yellow"))
    for prob in doc["problems"]:
        console.print(Text(f"  - {prob}", style="red"))
    if doc.get("aggregate") is not None:
        from tracer.render_compact import aggregate_lines

        aggregate_lines(doc["aggregate"], console, judged_below=False)
    for p in doc["packets"]:
        where = "/".join(x for x in (p.get("verdict_node") or "(fabric)", p.get("verdict_dev")) if x)
        line = (f"{p['direction'] or 'packet'} {p['seq'] if p['seq'] is not None else ''} {p['status']} at {where}"
                + (f" {p['reason']}" if p.get("reason") else "") + (f" at {p['location']}" if p.get("location") else "")
                + (f"  cause={p['cause']}" if p.get("cause") else ""))
        console.print(Text(" ".join(line.split())))
        if p.get("hint"):
            console.print(Text(f"  {p['hint']}"))
        if p.get("runbook"):
            console.print(Text(f"  runbook: {p['runbook']}", style="cyan"))
    if doc.get("more_packets"):
        console.print(Text(f"  and {doc['more_packets']} more failing packets (the packets table has them all)"))
