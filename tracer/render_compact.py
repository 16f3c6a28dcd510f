"""Output that fits a terminal: times in a person's unit, tables sized to the width, the compact view."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from rich.console import Console
from rich.text import Text

from tracer.reconstruct import tcpflags

if TYPE_CHECKING:
    from tracer.reconstruct.model import Packet


def human_time(ns: float | int | None) -> str:
    """A duration as a person reads it: `37.4 µs`, `1.62 ms`, `2.1 s` (three significant
    figures below 100 of a unit); `-` when unknown."""
    if ns is None or ns != ns:    # None or NaN
        return "-"
    ns = float(ns)
    for scale, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if abs(ns) >= scale:
            v = ns / scale
            break
    else:
        return f"{ns:.0f} ns"
    if abs(v) >= 100:
        return f"{v:.0f} {unit}"
    if abs(v) >= 10:
        return f"{v:.1f} {unit}"
    return f"{v:.2f} {unit}" if unit != "s" else f"{v:.1f} {unit}"


def middle(s: str, width: int) -> str:
    """`s` cut to `width` characters in the middle, keeping its head and its distinguishing
    tail (`veth27272fab` → `veth…272fab`)."""
    if len(s) <= width:
        return s
    if width <= 1:
        return s[:width]
    head = min((width - 1) // 3, 4)
    return s[:head] + "…" + s[len(s) - (width - 1 - head):]


def fit_columns(headers: Sequence[str], rows: list[list[str]], width: int,
                shrink: dict[str, int], drop: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Columns and cells that fit `width` in a rich table without edges (3 characters between
    columns). Columns in `shrink` are cut in the middle, in that order, down to their floor;
    when that is not enough, the `drop` columns go, in order. Other columns keep their width."""
    cols = list(headers)
    cells = [list(r) for r in rows]
    dropped = list(drop)
    while True:
        ws = [max([len(cols[i])] + [len(r[i]) for r in cells]) for i in range(len(cols))]
        for name, floor in shrink.items():
            over = sum(ws) + 3 * (len(ws) - 1) - width
            if over <= 0:
                break
            if name in cols:
                k = cols.index(name)
                ws[k] = max(min(floor, ws[k]), len(name), ws[k] - over)
        if sum(ws) + 3 * (len(ws) - 1) <= width or not dropped:
            break
        name = dropped.pop(0)
        if name in cols:
            k = cols.index(name)
            del cols[k]
            for r in cells:
                del r[k]
    return cols, [[middle(c, ws[i]) for i, c in enumerate(r)] for r in cells]


def endpoint(addr: str | None, port: int | None) -> str:
    """An address with its port as people write it: `10.244.1.2:80`, `[fd00:10:244:1::2]:80`;
    the address alone without a port."""
    addr = addr or ""
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def path_text(p: "Packet") -> str:
    """A packet's hops on one line, grouped by node: `node-1 eth0 veth…fab cni0 › fabric › node-2 …`."""
    parts: list[str] = []
    cur = object()
    for h in p.hops:
        node = h.node or "fabric"
        if node != cur:
            parts.append(("› " if parts else "") + node + ":")
            cur = node
        parts.append(middle(h.dev, 10))
    return " ".join(parts)


def aggregate_lines(agg: dict, console: Console, judged_below: bool = True) -> None:
    """A busy watch: the counts, then one line per distinct path with how many packets took
    it, their verdict and one-way time percentiles, and the path."""
    figures = ", ".join(f"{agg[s]} {s}" for s in ("delivered", "dropped", "lost", "left", "partial") if agg.get(s))
    console.print(Text(f"{agg['packets']} packets ({figures}) from {agg['events']} events; "
                       f"{len(agg['paths']) + agg['other_paths']} distinct path(s)", style="bold"))
    for path in agg["paths"]:
        st = path["status"].upper()
        line = Text(f"  {_plural(path['packets'], path['direction'])}: {len(path['hops'])} hops, ")
        line.append(st, style={"DELIVERED": "green", "DROPPED": "bold red", "LOST": "bold yellow"}.get(st, "bold cyan"))
        ow = path.get("one_way_ns")
        if ow and path["status"] == "delivered":
            line.append(f", one-way {human_time(ow['p50'])} median, {human_time(ow['p99'])} p99")
        v = path["verdict"]
        if path["status"] != "delivered":
            line.append(f" at {v.get('node') or 'fabric'}/{v.get('dev')}" + (f" ({v['reason']})" if v.get("reason") else ""))
        console.print(line)
        parts: list[str] = []
        cur = object()
        for h in path["hops"]:
            node = h.get("node") or "fabric"
            if node != cur:
                parts.append(("› " if parts else "") + node + ":")
                cur = node
            parts.append(middle(str(h.get("dev")), 10))
        console.print(Text(f"    {' '.join(parts)}", style="dim"), overflow="fold")
    if agg["other_paths"]:
        console.print(Text(f"  and {_plural(agg['other_paths'], 'other path')} taken by "
                           f"{_plural(agg['other_paths_packets'], 'packet')}", style="dim"))
    if agg["failing"]:
        console.print(Text(f"{agg['failing']} failing packet(s)"
                           + (f"; {agg['failing_judged']} judged in full below" if judged_below else ""), style="bold"))


def _signature(p: "Packet") -> tuple:
    v = p.verdict
    return (p.direction, tuple((h.node, h.dev, h.point) for h in p.hops), v.status, v.node, v.dev,
            v.reason, v.cause, bool(v.problem))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _seqs(ps: list["Packet"]) -> str:
    seqs = [p.seq for p in ps if p.seq is not None]
    if not seqs:
        return ""
    return f" (probe{'s' if len(seqs) > 1 else ''} {', '.join(str(s) for s in seqs[:8])}{'…' if len(seqs) > 8 else ''})"


def _ends(a) -> str:
    return f"{endpoint(a.src, a.sport)}→{endpoint(a.dst, a.dport)}"


def nat_text(n, head: str, width: int) -> str:
    """A NAT change after `head`: both tuples (`a:1→b:2 → a:1→c:3`), or where that does not fit
    `width` (IPv6 addresses), the side that changed only (`dst [b]:2 → [c]:3`)."""
    tail = f"  backend {n.backend}" if n.backend else ""
    full = f"{head}{_ends(n.before)} → {_ends(n.after)}{tail}"
    if len(full) <= width:
        return full
    b, a = n.before, n.after
    sides = [(name, endpoint(x, xp), endpoint(y, yp)) for name, x, xp, y, yp in
             (("src", b.src, b.sport, a.src, a.sport), ("dst", b.dst, b.dport, a.dst, a.dport))
             if (x, xp) != (y, yp)]
    short = f"{head}{', '.join(f'{name} {x} → {y}' for name, x, y in sides)}"
    return short + (tail if len(short + tail) <= width else "")


def flags_text(ps: list["Packet"]) -> str:
    """` [S]` or ` [S.][R.]`: the TCP flags of a group's packets, each once, in the order seen."""
    seen = dict.fromkeys(p.tcp_flags for p in ps if p.tcp_flags)
    return " " + "".join(tcpflags.bracketed(f) for f in seen) if seen else ""


def failing(p: "Packet") -> bool:
    return p.verdict.status != "delivered" or bool(p.verdict.problem)


def compact_flow(result, console: Console, header: Callable, full_packet: Callable,
                 footer: Callable) -> None:
    """One line per group of packets that took the same path to the same verdict, with the
    path; every failing packet then gets its full table (`full_packet`)."""
    header(result, console)
    agg = getattr(result, "aggregate", None)
    if agg is not None:
        aggregate_lines(agg, console)
        for p in result.packets:     # the failing packets judged in full
            full_packet(p, console)
        footer(result, console)
        return
    groups: dict[tuple, list] = {}
    for p in result.packets:
        groups.setdefault(_signature(p), []).append(p)
    ok_groups = [g for g in groups.values() if not failing(g[0])]
    dirs = {g[0].direction for g in ok_groups}
    if ok_groups and len(ok_groups) == len(dirs) == len(groups) and result.verdict.status == "ok":
        # every packet delivered, one path per direction: one line says it all
        counts = ", ".join(_plural(len(g), g[0].direction) for g in ok_groups)
        hops = {len(g[0].hops) for g in ok_groups}
        same = f"same {hops.pop()}-hop path" if len(hops) == 1 else "one path each way"
        console.print(Text(f"{counts}: {same}, delivered", style="green"))
    for g in groups.values():
        p = g[0]
        lat = [x.one_way_ns for x in g if x.one_way_ns is not None]
        line = Text(f"  {_plural(len(g), p.direction)}{flags_text(g)}{_seqs(g)}: {len(p.hops)} hops, ")
        st = p.verdict.status.upper()
        line.append(st, style={"DELIVERED": "green", "DROPPED": "bold red", "LOST": "bold yellow"}.get(st, "bold cyan"))
        if lat:
            lat.sort()
            line.append(f", one-way {human_time(lat[len(lat) // 2])}" + (" median" if len(lat) > 1 else ""))
        console.print(line)
        console.print(Text(f"    {path_text(p)}", style="dim"), overflow="fold")
        for n in p.nat:
            console.print(Text(nat_text(n, f"    {n.type.upper()} at {n.node or 'fabric'}/{n.dev}: ", console.width),
                               style="magenta"))
    for g in groups.values():
        if failing(g[0]):    # one full table per kind of failure; its twins are named
            full_packet(g[0], console)
            if len(g) > 1:
                console.print(Text(f"  the same path and verdict for {_plural(len(g) - 1, g[0].direction)}"
                                   f"{_seqs(g[1:])}", style="dim"))
    footer(result, console)
