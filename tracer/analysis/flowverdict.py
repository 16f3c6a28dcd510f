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
    rows = []
    if len(packets):
        bad = packets[(packets["status"].astype(str) != "delivered") | packets["cause"].notna()]
        sel = bad[[c for c in CAUSE_COLUMNS if c in bad.columns]].astype(object)
        for r in sel.where(sel.notna(), None).to_dict("records"):
            rows.append({k: (x.item() if hasattr(x, "item") else x) for k, x in r.items()})
    return {"status": v.get("status"), "summary": v.get("summary"), "problems": list(v.get("problems") or []),
            "complete": meta.get("complete", True) is not False, "interrupted": interruption(meta),
            "packets": rows}


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
