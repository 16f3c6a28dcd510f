"""Flow verdict: whether every probe of a flow got through, answered by the right address."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tracer.node.prober import ProbeResult
from tracer.reconstruct import beyond, source
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import FlowVerdict, Packet
from tracer.reconstruct.packets import FlowInput
from tracer.reconstruct.window import why_partial


def flow_verdict(packets: list[Packet], fi: FlowInput, probing: bool,
                 ev: Evidence | None = None) -> tuple[FlowVerdict, list[ProbeResult]]:
    """(the flow-level verdict, the probes as judged): every probe delivered and answered by
    the right address. A probe answered with an un-reversed reply is judged `wrong-reply`
    (a new ProbeResult; fi.probes stays as sent); one whose request never left the source
    pod carries its source verdict (`source`, from the pod's facts in `ev`)."""
    problems: list[str] = []
    probes = [replace(pr) for pr in fi.probes]
    requests = [p for p in packets if p.direction == "request"]
    replies = [p for p in packets if p.direction == "reply"]
    if not probing:
        return watched_verdict(packets), probes
    judged = probes
    if fi.sample > 1:
        # With sampling, a probe no hook saw was simply not sampled: judge the others only.
        judged = [pr for pr in probes if any(p.seq == pr.seq for p in requests)]
    n = len(judged)
    delivered = answered = 0
    for pr in judged:
        reqs = [p for p in requests if p.seq == pr.seq]
        reps = [p for p in replies if p.seq == pr.seq]
        stuck = None
        if any(p.verdict.status == "delivered" for p in reqs):
            delivered += 1
        elif pr.outcome == "answered" and reqs and all(p.verdict.status == "partial" for p in reqs):
            delivered += 1       # seen only in part, and the answer proves it arrived
        elif (stuck := source.judge(pr, reqs, fi.src.pod.key if fi.src.pod else None,
                                    fi.src.pod.node if fi.src.pod else None, ev)) is not None:
            pr.source = stuck
            problems.append(source.line(pr.seq, stuck))
        elif reqs:
            problems.append(_failed(pr.seq, "request", reqs[-1].verdict))
        else:
            problems.append(f"probe {pr.seq}: request never seen by the tracer")
        bad_reply = next((p for p in reps if p.verdict.cause == "unreversed-reply"), None)
        if stuck is not None:
            continue   # its line says why; no reply was possible
        if bad_reply is not None:
            problems.append(f"probe {pr.seq}: {bad_reply.verdict.hint}")
            if pr.outcome == "answered":
                pr.outcome = "wrong-reply"
        elif pr.outcome == "answered":
            expected = fi.dst.ip
            if pr.reply_from and pr.reply_from != expected:
                problems.append(f"probe {pr.seq}: reply came from {pr.reply_from}, not {expected}"
                                " (reverse NAT did not happen)")
            else:
                answered += 1
        else:
            # seen only up to a node that could not be traced: what came back (or nothing) is
            # all there is; say so before the outcome
            partial = None if reps or any(p.verdict.status == "delivered" for p in reqs) else \
                next((p for p in reversed(reqs) if p.verdict.status == "partial"), None)
            blind = f"no view beyond {partial.verdict.node}: " if partial is not None else ""
            if pr.outcome == "refused":
                problems.append(f"probe {pr.seq}: {blind}" + (pr.detail if pr.detail and "(ICMP " in pr.detail
                                                              else f"refused ({pr.detail or 'reset'})"))
            elif pr.outcome == "timeout":
                if blind:
                    problems.append(f"probe {pr.seq}: {blind}no reply, and nothing shows the request was delivered")
                elif reps and reps[-1].verdict.status != "delivered":
                    problems.append(_failed(pr.seq, "reply", reps[-1].verdict))
                else:
                    problems.append(f"probe {pr.seq}: no reply")
            else:
                problems.append(f"probe {pr.seq}: {blind}{pr.outcome} ({pr.detail})")
    status = "ok" if delivered == n and answered == n and n > 0 else "failed"
    summary = f"{delivered}/{n} delivered, {answered}/{n} answered"
    if fi.sample > 1:
        summary += f" ({n} of {len(fi.probes)} probes sampled at 1 in {fi.sample})"
        if n == 0:
            problems.append("no probe was sampled: send more (--count) or sample less (--sample)")
    return FlowVerdict(status, summary, tuple(problems)), probes


def _failed(seq: int, what: str, v) -> str:
    """One problem line: where and why a probe's request or reply stopped."""
    left = beyond.problem(seq, what, v)
    if left is not None:
        return left
    pod = (v.evidence or {}).get("pod") if (v.evidence or {}).get("after_arrival") else None
    if pod:
        return (f"probe {seq}: {what} {v.status} in {pod.split('/')[-1]} ({v.dev}, {v.reason})"
                + (f": {v.cause}" if v.cause else ""))
    return (f"probe {seq}: {what} {v.status} at {v.node or 'fabric'}/{v.dev}"
            + (f" ({v.reason})" if v.reason else "") + (f": {v.cause}" if v.cause else ""))


NO_TRAFFIC = ("no traced hop saw traffic between them: check that the client is sending (a watch only "
              "follows real traffic), or send probes instead (without --no-probe)")


def watched_verdict(packets: list[Packet]) -> FlowVerdict:
    """The verdict of watched traffic (no probes): every packet seen whole was delivered.
    Partial packets (seen while an observer on their path was not tracing) are counted apart,
    never as failures; the figures are `summary`'s (`watched`)."""
    w = watched(packets)
    n, ok_n, part = w["packets"], w["delivered"], w["partial"]
    whole = n - part
    problems: list[str] = []
    by: dict[str, int] = {}
    for p in packets:
        if p.verdict.status not in ("delivered", "partial"):
            by[p.verdict.status] = by.get(p.verdict.status, 0) + 1
            if by[p.verdict.status] == 1:
                v = p.verdict
                problems.append(f"{p.direction} {v.status} at {v.node or 'fabric'}/{v.dev}"
                                + (f" ({v.reason})" if v.reason else "") + (f": {v.cause}" if v.cause else ""))
    if not n:
        return FlowVerdict("failed", "no packet between them was seen while watching", (NO_TRAFFIC,))
    summary = f"{ok_n}/{n} packets delivered"
    if part:
        summary += f" ({part} partial: {why_partial(packets)})"
    if not whole:
        problems.append("every packet seen was seen only in part (an observer on its path was not tracing)")
    return FlowVerdict("ok" if whole and ok_n == whole else "failed", summary, tuple(problems))


def watched(packets: list[Packet]) -> dict:
    """The figures of watched traffic: packets seen, delivered, partial, failed."""
    st = [p.verdict.status for p in packets]
    return {"packets": len(st), "delivered": st.count("delivered"), "partial": st.count("partial"),
            "failed": len(st) - st.count("delivered") - st.count("partial")}


def summary(packets: list[Packet], probes: list[ProbeResult], counters: dict, probing: bool = True) -> dict:
    """The figures of a flow run: probes, deliveries, answers, median times, events lost.
    Without probes, `delivered` counts every packet as the flow verdict does (`watched`)."""
    one_way = [p.one_way_ns for p in packets if p.direction == "request" and p.one_way_ns is not None]
    rtts = [p.rtt_ns for p in probes if p.rtt_ns is not None and p.outcome == "answered"]
    figures = {"probes": len(probes),
               "delivered": sum(1 for p in packets if p.direction == "request" and p.verdict.status == "delivered"),
               "partial": sum(1 for p in packets if p.direction == "request" and p.verdict.status == "partial")}
    if not probing:
        figures = {"probes": 0, **watched(packets)}
    return {
        **figures,
        "answered": sum(1 for p in probes if p.outcome == "answered"),
        "median_one_way_ns": int(np.median(one_way)) if one_way else None,
        "median_rtt_ns": int(np.median(rtts)) if rtts else None,
        "events_lost": int(counters.get("lost", 0)),
    }
