"""Rendering results for people (rich tables) or programs (JSON). No logic about packets."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracer import runbooks
from tracer.reconstruct import tcpflags
from tracer.reconstruct.model import ConntrackView, Packet, Verdict
from tracer.render_compact import compact_flow, endpoint, fit_columns, human_time, nat_text

if TYPE_CHECKING:
    from tracer.runs.outcome import FlowResult

STATUS_STYLE = {"delivered": "green", "dropped": "bold red", "lost": "bold yellow", "partial": "bold cyan"}


def _us(ns: int | None) -> str:
    return human_time(ns)


def _ep(d: dict) -> str:
    name = d.get("pod") or d.get("service") or d.get("node") or ""
    return f"{name} ({d['ip']})" if name else d["ip"]


def tcp_flags_text(p: Packet) -> str:
    """` [S.]` after a TCP packet's five-tuple (tcpdump's notation); empty for other protocols."""
    return f" {tcpflags.bracketed(p.tcp_flags)}" if p.tcp_flags else ""


def packet_title(p: Packet) -> str:
    """The one line that names a packet (its table's title, the compact view's line)."""
    t = p.five_tuple
    ident = "" if ":" in (t.src or "") else f"  ip_id={p.ip_id}"   # IPv6 has no IP ID
    return (f"{p.direction} {p.seq if p.seq is not None else ''} "
            f"{t.proto} {endpoint(t.src, t.sport)} → {endpoint(t.dst, t.dport)}{tcp_flags_text(p)}{ident}")


def _changed(prev: str | None, h) -> str:
    """The addresses a NAT changed, only the side that changed (`dst 10.244.2.3`)."""
    if prev is None:
        return f"{h.src} → {h.dst}"
    src, dst = prev.split(" → ")
    if src == h.src:
        return f"dst {h.dst}"
    if dst == h.dst:
        return f"src {h.src}"
    return f"{h.src} → {h.dst}"


def _encap(enc, prev) -> str:
    if not enc:
        return ""
    if prev is not None and enc == prev:
        return "″"
    sep = ":" if ":" in enc.src else "."
    a, b = enc.src.split(sep), enc.dst.split(sep)
    k = next((i for i in range(len(a)) if a[:i + 1] != b[:i + 1]), len(a)) if len(a) == len(b) > 1 else 0
    # the part of dst that differs: 172.30.0.11→.12, fd00:172:30::1→:2
    dst = sep + sep.join(b[k:]) if 0 < k < len(a) and all(b[k:]) else enc.dst
    return f"{enc.type} {enc.src}→{dst}" + ("" if enc.type == "ipip" else f" vni {enc.vni}")   # IP-in-IP has no VNI


def packet_table(p: Packet, width: int = 120) -> "HopTable":
    """A packet's hops as a table no wider than `width`: `#`, `pt` and Δt keep their width;
    addresses appear only where they change (NAT); long names are cut in the middle."""
    cols = ["#", "node", "pod", "dev", "pt", "Δt", "nat", "conntrack", "encap"]
    rows: list[list[str]] = []
    prev, prev_enc = f"{p.hops[0].src} → {p.hops[0].dst}" if p.hops else None, None
    for i, h in enumerate(p.hops, 1):
        addrs = f"{h.src} → {h.dst}"
        rows.append([str(i), h.node or "(fabric)", (h.pod or "").removeprefix("default/"), h.dev, h.point,
                     "" if i == 1 else _us(h.dt_ns), _changed(prev, h) if addrs != prev else "",
                     _ct(h.ct), _encap(h.encap, prev_enc)])
        prev, prev_enc = addrs, h.encap
    for k in range(len(cols) - 1, 5, -1):   # no empty column of addresses, conntrack or encap
        if not any(r[k] for r in rows):
            cols.pop(k)
            rows = [r[:k] + r[k + 1:] for r in rows]
    cols, rows = fit_columns(cols, rows, width,
                             shrink={"pod": 10, "nat": 18, "conntrack": 11, "dev": 10, "node": 8, "encap": 26},
                             drop=("encap", "conntrack", "pod"))
    return HopTable(packet_title(p), cols, rows)


class HopTable:
    """A packet's hops as rich's Table draws them here (no edges, a heavy line under the
    header, one space around each divider), drawn line by line: about ten times faster,
    which `-o wide` on a watch of hundreds of packets needs. Where the columns do not fit the
    console, rich's Table draws it (cropping as it does)."""

    RIGHT = ("#", "Δt")

    def __init__(self, title: str, cols: list[str], rows: list[list[str]]):
        # cells as text without surrounding blanks (rich would strip some and keep others)
        self.title, self.cols, self.rows = title, cols, [[c.strip() for c in r] for r in rows]

    def table(self) -> Table:
        tbl = Table(title=Text(self.title), title_justify="left", show_edge=False, pad_edge=False, expand=False)
        for col in self.cols:
            tbl.add_column(col, justify="right" if col in self.RIGHT else "left", no_wrap=True,
                           min_width=len(col) if col in ("#", "pt", "Δt") else None)
        for r in self.rows:   # plain text: no markup, no :emoji: codes (an IPv6 address has colons)
            tbl.add_row(*[Text(c, style="bold magenta" if self.cols[k] == "nat" else "") for k, c in enumerate(r)])
        return tbl

    def __rich_console__(self, console, options):
        from rich import box
        from rich.cells import cell_len
        from rich.segment import Segment
        from rich.style import Style

        cols, rows, last = self.cols, self.rows, len(self.cols) - 1
        content = [max([cell_len(c)] + [cell_len(r[k]) for r in rows]) for k, c in enumerate(cols)]
        pads = [(0 if k == 0 else 1, 0 if k == last else 1) for k in range(len(cols))]
        widths = [w + a + b for w, (a, b) in zip(content, pads)]
        if sum(widths) + last > options.max_width or any("\n" in c for r in rows for c in r):
            yield self.table()
            return
        yield from console.render(Text(self.title), options.update(width=sum(widths) + last, justify="left",
                                                                  highlight=False, height=None))
        shape = box.HEAVY_HEAD.substitute(options, safe=console.safe_box)
        header, nat = console.get_style("table.header"), Style.parse("bold magenta")

        def line(cells, divider, cell_style, text_style):
            # a cell: its padding in the cell's style, its text (filled to the column's
            # width) in the text's own
            for k, (c, w, (a, b)) in enumerate(zip(cells, content, pads)):
                st = text_style(k) or cell_style
                if a:
                    yield Segment(" ", cell_style)
                fill = " " * (w - cell_len(c))
                yield Segment(fill + c if cols[k] in self.RIGHT else c + fill, st)
                if b:
                    yield Segment(" ", cell_style)
                if k < last:
                    yield Segment(divider)
            yield Segment.line()

        yield from line(cols, shape.head_vertical, header, lambda k: None)
        yield Segment(shape.get_row(widths, "head", edge=False))
        yield Segment.line()
        for r in rows:
            yield from line(r, shape.mid_vertical, None, lambda k: nat if cols[k] == "nat" else None)


def _addr(d) -> str:
    return f"{endpoint(d.src, d.sport)}→{endpoint(d.dst, d.dport)}"


def _ct(ct: ConntrackView | None) -> str:
    if not ct:
        return ""
    if ct.of == "outer":
        return "(tunnel)"
    txt = ct.state + (" reply" if ct.dir == "reply" else "")
    if ct.nat:
        txt += f" {ct.nat}"
    return txt


def verdict_line(v: Verdict) -> Text:
    s = v.status
    where = f"{v.node or 'fabric'}/{v.dev}" if v.dev else (v.node or "")
    txt = Text(f"  {s.upper()}", style=STATUS_STYLE.get(s, ""))
    txt.append(f" at {where}" if where else "")
    if (v.evidence or {}).get("after_arrival") and v.evidence.get("pod"):
        txt.append(f" inside pod {v.evidence['pod']}")    # dropped after it arrived there
    if v.reason:
        txt.append(f"  reason={v.reason}")
    if v.location:
        txt.append(f"  at {v.location}")
    if v.cause:
        txt.append(f"  cause={v.cause}", style="bold")
    if v.hint:
        txt.append(f"\n  {v.hint}")
    if v.runbook:
        txt.append(f"\n  runbook: {runbooks.where(v.runbook)}", style="cyan")
    return txt


def flow_header(result: "FlowResult", console: Console) -> None:
    port = result.port
    cfg = getattr(result, "config", None)
    if cfg is not None and not cfg.probe:   # a watch follows every protocol between the two
        what = f"watching every protocol for {cfg.duration:g} s"
    else:
        what = f"{result.proto}{'/' + str(port) if port else ''}"
    console.print(Text(f"podtrace flow {_ep(result.src.as_json())} → {_ep(result.dst.as_json())}  [{what}]",
                       style="bold"))
    for note in result.notes:
        console.print(Text(f"note: {note}", style="yellow"))
    if not result.packets and not (getattr(result, "aggregate", None) or {}).get("packets"):
        console.print("no packet of this flow was seen by the tracer")


def packet_block(p: Packet, console: Console) -> None:
    """One packet in full: its table, its address changes, its verdict."""
    console.print()
    console.print(packet_table(p, console.width))
    for n in p.nat:
        what = {"dnat": "DNAT", "snat": "SNAT", "reverse-dnat": "reverse DNAT",
                "reverse-snat": "reply un-DNAT"}.get(n.type, n.type)
        txt = nat_text(n, f"  {what} at hop {n.hop + 1} ({n.node or 'fabric'}/{n.dev}): ", console.width)
        console.print(Text(txt, style="magenta"))
    console.print(verdict_line(p.verdict))


def flow_footer(result: "FlowResult", console: Console) -> None:
    s = result.summary
    v = result.verdict
    console.print()
    console.print(Text(f"{'OK' if v.status == 'ok' else 'FAILED'}: {v.summary}",
                       style="bold green" if v.status == "ok" else "bold red"))
    for prob in v.problems:
        console.print(Text(f"  - {prob}", style="red"))
    books: dict[str, list[str]] = {}   # the runbooks of probes that never left their pod
    for pr in result.probes:
        if getattr(pr, "source", None) and pr.source.get("runbook"):
            books.setdefault(pr.source["runbook"], []).append(str(pr.seq))
    for book, seqs in books.items():
        console.print(f"  runbook: {runbooks.where(book)} (probe {', '.join(seqs)})")
    console.print(f"median one-way {_us(s['median_one_way_ns'])}, median round trip {_us(s['median_rtt_ns'])}, "
                  f"events lost {s['events_lost']}, startup {result.timings.get('startup_s', 0):.2f} s")


def flow_table(result: "FlowResult", console: Console) -> None:
    """Every packet in full (`-o wide`)."""
    flow_header(result, console)
    for p in result.packets:
        packet_block(p, console)
    flow_footer(result, console)


def flow_compact(result: "FlowResult", console: Console) -> None:
    """One line per group of identical paths; full tables for the failing packets only."""
    compact_flow(result, console, flow_header, packet_block, flow_footer)


def flow_human(result: "FlowResult", console: Console, output: str) -> None:
    """`-o wide`: every table; `-o compact`: the compact view; `-o table`: compact when the
    flow is ok, else the failing packets' tables as well (which compact also gives)."""
    if output == "wide":
        flow_table(result, console)
    else:
        flow_compact(result, console)


def to_json(doc: dict) -> str:
    """The document indented by two spaces, as `json.dumps(doc, indent=2)` writes it. orjson
    writes it 18× faster (a watch of 800 packets is 12 MB of JSON: 0.49 s → 0.03 s); what it
    does not take (an integer beyond 64 bits) goes the standard library's way."""
    import orjson

    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(doc, indent=2, sort_keys=False)


def doctor_table(rep: dict, console: Console) -> None:
    ok = rep["can_trace"]
    console.print(Text(f"podtrace doctor: {'flow can run' if ok else 'flow cannot run'}",
                       style="bold green" if ok else "bold red"))
    k = rep["kernel"]
    facts = Table(show_header=False, show_edge=False, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("kernel", f"{k['release']} ({k['arch']})")
    facts.add_row("BTF", ("present" if rep["btf"]["present"] else "missing")
                  + (f", offsets {rep['btf']['offsets']}" if rep["btf"].get("offsets") else ""))
    h = rep["headers"]
    facts.add_row("headers", f"{h['kind']}" + (f" ({h['path']})" if h.get("path") else "")
                  + (f": {h['note']}" if h.get("note") else ""))
    facts.add_row("tracefs", rep["tracefs"] or "not mounted")
    facts.add_row("debugfs", rep["debugfs"] or "not mounted")
    caps = rep["privileges"]["capabilities"]
    facts.add_row("privileges", f"euid {rep['privileges']['euid']}; "
                  + ", ".join(f"{c}{'' if v else ' (missing)'}" for c, v in caps.items()))
    b = rep["bcc"]
    facts.add_row("BCC", f"{b.get('version')} at {b.get('path')}" if b.get("importable") else f"missing: {b.get('error')}")
    if rep.get("compile"):
        c = rep["compile"]
        facts.add_row("compile+load", f"ok in {c['seconds']}s" if c["ok"] else f"FAILED: {c['error']}")
        if c.get("tracepoints"):
            facts.add_row("tracepoints", c["tracepoints"])
    fe = rep.get("fentry") or {}
    facts.add_row("fentry", f"{'available' if fe.get('available') else 'unavailable'}: {fe.get('reason')}")
    facts.add_row("metadata", "; ".join(rep["metadata"]["sources"]))
    console.print(facts)
    hooks = Table(title="hooks", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("hook", "kind", "tells", "state", "why not / fallback"):
        hooks.add_column(col)
    for x in rep["hooks"]:
        state = Text("active", style="green") if x["active"] else Text("unavailable", style="yellow")
        why = x["reason"] or ""
        if not x["active"] and x["fallback"]:
            why += f" → {x['fallback']}"
        hooks.add_row(x["name"], x["kind"], x["tells"], state, why)
    console.print(hooks)
    for d in rep["degraded"]:
        console.print(Text(f"degraded: {d}", style="yellow"))
    for p in rep["problems"]:
        console.print(Text(f"PROBLEM: {p['problem']}; fix: {p['fix']}", style="bold red"))
