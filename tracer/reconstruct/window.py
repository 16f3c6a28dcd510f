"""The observation window: when every observer of a trace was tracing, on the trace's clock.

Agents (and per-node captures) start and stop at different moments. A packet seen while some
observer on its path was not yet, or no longer, tracing may look lost although it only went
where nobody was watching: such a packet is `partial`, never `lost` and never a failure.

The window is [the latest ready, the earliest stop] of all observers, after their clocks are
aligned (each observer's span is moved by its clock offset to the trace's reference clock).
A packet that was not delivered and not seen dropped is partial when it was first seen before
the window opened (with CLOCK_SLACK_NS for the clocks' alignment) or last seen within EDGE_NS
of its end (the next observer on its path may have stopped before it got there). Likewise,
a packet is partial when an observer's kernel refused events (a gap) while it was seen or
within EDGE_NS after it was last seen (the hop it missed may be one of those refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tracer.reconstruct.model import Packet

CLOCK_SLACK_NS = 20_000_000     # what the clocks' alignment may be off by (NTP's precision)
EDGE_NS = 200_000_000           # the time a packet may take from one observer to the next
GAP_SLACK_NS = 1_000_000        # around a gap: the kernel's counters are read between polls
RUNBOOK = "docs/runbooks/partial-view.md"
REFUSING = "refusing"           # the `when` of a packet seen while an observer refused events
# A packet whose every hop only the tc observers recorded: on every path through the network
# a kernel hook (a device tracepoint, a kprobe) sees it too, the pod's own devices first, so
# none of them having a record of it is a gap in the trace (events the kernel did not hand
# over), never a loss.
TC_ONLY = "only the tc observers recorded it, none of the kernel's device hooks did"


@dataclass(frozen=True)
class Window:
    """Each observer's tracing span (ready, stop) on the trace clock; None: not known."""

    spans: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    # observer → the intervals in which its kernel refused events (the event budget, a full
    # ring buffer): a packet seen then may miss hops that were never recorded
    gaps: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def start_ns(self) -> int | None:
        """The moment from which every observer was tracing (the latest ready)."""
        starts = [s for s, _ in self.spans.values() if s is not None]
        return max(starts) if starts else None

    @property
    def end_ns(self) -> int | None:
        """The moment up to which every observer was tracing (the earliest stop)."""
        stops = [e for _, e in self.spans.values() if e is not None]
        return min(stops) if stops else None

    def late(self, t_ns: int) -> list[str]:
        """The observers that were not yet tracing at t_ns (latest first); within the clocks'
        slack of the window's start, the last one to get ready."""
        out = sorted(((s, n) for n, (s, _) in self.spans.items() if s is not None and t_ns < s + CLOCK_SLACK_NS),
                     reverse=True)
        return [n for s, n in out if t_ns < s] or [n for _, n in out[:1]]

    def gone(self, t_ns: int) -> list[str]:
        """The observers that had stopped, or were about to, at t_ns (earliest first)."""
        out = sorted((e, n) for n, (_, e) in self.spans.items() if e is not None and t_ns + EDGE_NS > e)
        return [n for e, n in out if t_ns >= e] or [n for _, n in out[:1]]

    def refusing(self, first_ns: int, last_ns: int) -> list[str]:
        """The observers whose kernel refused events while a packet was seen (first to last),
        or within EDGE_NS after it was last seen: its next hop comes that much later where a
        queue holds it (a busy CPU's backlog), and may be one of those refused."""
        return [n for n, gs in self.gaps.items() if any(_near_gap(first_ns, last_ns, a, b) for a, b in gs)]

    def missing(self, first_ns: int, last_ns: int, seen_by: tuple = ()) -> tuple[str, list[str]] | None:
        """("not yet", "no longer" or REFUSING, the observers not tracing) for a packet seen
        from first_ns to last_ns, or None when every observer was tracing all along. The
        observers that did see it (seen_by) are named only when no other one was missing."""
        late, gone = self.late(first_ns), self.gone(last_ns)
        late = [n for n in late if n not in seen_by] or late[:1]
        gone = [n for n in gone if n not in seen_by] or gone[:1]
        if late:
            return "not yet", late
        if gone:
            return "no longer", gone
        refusing = self.refusing(first_ns, last_ns)
        if refusing:
            return REFUSING, refusing
        return None

    def outside(self, first_ns: int, last_ns: int, seen_by: tuple = ()) -> str | None:
        """Why a packet seen from first_ns to last_ns is a partial view (one phrase), or None."""
        m = self.missing(first_ns, last_ns, seen_by)
        return None if m is None else phrase(*m)

    def as_json(self) -> dict:
        return {"start_ns": self.start_ns, "end_ns": self.end_ns,
                "observers": {n: {"ready_ns": s, "stop_ns": e,
                                  **({"gaps": [list(g) for g in self.gaps[n]]} if self.gaps.get(n) else {})}
                              for n, (s, e) in sorted(self.spans.items())}}

    @classmethod
    def from_json(cls, d: dict | None) -> "Window | None":
        """The window a trace file's metadata carries (None: none, or not of this shape)."""
        if not isinstance(d, dict) or not isinstance(d.get("observers"), dict):
            return None
        spans, gaps = {}, {}
        for n, o in d["observers"].items():
            if isinstance(o, dict):
                spans[str(n)] = (_int(o.get("ready_ns")), _int(o.get("stop_ns")))
                got = tuple((_int(g[0]), _int(g[1])) for g in o.get("gaps") or ()
                            if isinstance(g, (list, tuple)) and len(g) == 2)
                got = tuple(g for g in got if None not in g)
                if got:
                    gaps[str(n)] = got
        return cls(spans, gaps) if spans else None


def phrase(when: str, nodes: list[str]) -> str:
    """"seen only while node-2 was not yet tracing" (when: "not yet", "no longer" or
    REFUSING: "seen while node-2's kernel refused events …")."""
    if when == REFUSING:
        return (f"seen while {_names(nodes)} refused or missed events (the event budget, a full ring "
                "buffer, or a hook the kernel skipped: hops there may be missing)")
    return f"seen only while {_names(nodes)} {'was' if len(nodes) == 1 else 'were'} {when} tracing"


def _int(v) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _names(nodes: list[str]) -> str:
    return ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")


def from_observers(spans: dict[str, tuple[int | None, int | None]], offsets_ns: dict[str, int],
                   gaps: dict[str, list[tuple[int, int]]] | None = None) -> Window | None:
    """The window of observers whose spans (and gaps, when their kernel refused events) are
    on their own clocks; offsets_ns: how far each observer's clock is ahead of the
    reference's (an event at t on it is t - offset there)."""
    out, moved = {}, {}
    for node, (ready, stop) in spans.items():
        off = int(offsets_ns.get(node, 0))
        out[node] = (None if ready is None else int(ready) - off, None if stop is None else int(stop) - off)
        if (gaps or {}).get(node):
            moved[node] = tuple((int(a) - off, int(b) - off) for a, b in gaps[node])
    return Window(out, moved) if len(out) > 1 or moved else None


def from_meta(meta: dict) -> Window | None:
    """The window a trace file's metadata records (`window`), if any."""
    return Window.from_json(meta.get("window"))


def tc_only(p: Packet) -> bool:
    """Every hop of `p` recorded by the tc observers alone (see TC_ONLY)."""
    return bool(p.hops) and all(set(h.seen_by) <= {"tc"} for h in p.hops)


def apply(packets: list[Packet], window: Window | None) -> list[Packet]:
    """The packets with `lost` turned `partial` where they were seen outside the window,
    and `lost` or `left` turned `partial` where only the tc observers saw them."""
    out = []
    for p in packets:
        if p.verdict.status in ("lost", "left") and tc_only(p):
            out.append(replace(p, verdict=partial(p.verdict, TC_ONLY)))
            continue
        m = None
        if window is not None and window.spans and p.verdict.status == "lost" and p.hops:
            seen = tuple(dict.fromkeys(h.node or "fabric" for h in p.hops))
            m = window.missing(p.first_ts_ns, p.first_ts_ns + p.hops[-1].t_ns, seen)
        out.append(p if m is None else replace(p, verdict=partial(p.verdict, phrase(*m), {
            "not_tracing": m[1], "when": m[0]})))
    return out


def partial(v, why: str, seen: dict | None = None):
    """A verdict turned into a partial view: where it was last seen stays, no cause; `seen`
    (the observers not tracing, and when) is its evidence."""
    return replace(v, status="partial", reason=None, location=None, cause=None,
                   evidence={"window": seen} if seen else None,
                   hint=f"Last seen on {v.node or 'the fabric'}" + (f" ({v.dev})" if v.dev else "")
                   + f"; {why}: a gap in the trace, not a loss.", runbook=RUNBOOK)


def why_partial(packets: list[Packet]) -> str:
    """Why the partial packets among these were partial, in one phrase per moment ("not yet"
    first), the observers most often missing first."""
    count: dict[str, dict[str, int]] = {"not yet": {}, "no longer": {}, REFUSING: {}}
    other = False
    for p in packets:
        if p.verdict.status != "partial":
            continue
        w = (p.verdict.evidence or {}).get("window") or {}
        if w.get("when") in count:
            for n in w.get("not_tracing") or ():
                count[w["when"]][n] = count[w["when"]].get(n, 0) + 1
        else:
            other = True
    parts = [phrase(when, sorted(c, key=lambda n: -c[n])) for when, c in count.items() if c]
    if other or not parts:
        parts.append("seen only while an observer on its path was not tracing")
    return "; ".join(parts)


def partial_mask(first_ns: np.ndarray, last_ns: np.ndarray, window: Window | None) -> np.ndarray:
    """Whole columns: which packets (by first and last time seen) fall outside the window."""
    out = np.zeros(len(first_ns), dtype=bool)
    if window is None:
        return out
    for s, e in window.spans.values():
        if s is not None:
            out |= first_ns < s + CLOCK_SLACK_NS
        if e is not None:
            out |= last_ns + EDGE_NS > e
    for gs in window.gaps.values():
        for a, b in gs:
            out |= _near_gap(first_ns, last_ns, a, b)
    return out


def _near_gap(first_ns, last_ns, a: int, b: int):
    """A packet seen from first_ns to last_ns may miss hops an observer refused in [a, b]:
    the gap ended after it was first seen, and began before its next hop could have come
    (EDGE_NS after it was last seen). Scalars or whole columns."""
    return (first_ns < b + GAP_SLACK_NS) & (last_ns + EDGE_NS > a)
