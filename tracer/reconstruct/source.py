"""Source diagnosis: why a probe never left the source pod, from the pod's own facts.

When a probe's send failed, or its request was seen nowhere outside the source pod, the
cause is looked for AT THE SOURCE: the route the pod's kernel would take (none, or an MTU
smaller than the DF probe), the neighbour entry of its next hop (FAILED, INCOMPLETE or
none), the state of the device the route leaves by, and the send's error. The facts are
read inside the pod's namespace by its node (`tracer.node.sourcefacts`) and travel in the
evidence as one more answer of that node (query `kind: source`), so a saved trace is judged
offline as it was live. A cause is named only when a fact read from the pod proves it;
otherwise the verdict says the probe never left the pod and lists what was checked.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import replace

from tracer.node.prober import ProbeResult
from tracer.reconstruct.evidence import Evidence
from tracer.reconstruct.model import Packet, Verdict

RUNBOOK_DIR = "docs/runbooks"
KIND = "source"
# strerror text (what the prober keeps in ProbeResult.detail) → errno name
_ERRNO = {os.strerror(getattr(errno, n)): n for n in
          ("ENETUNREACH", "EHOSTUNREACH", "EMSGSIZE", "ENOBUFS", "ENETDOWN", "EPERM", "EACCES",
           "EINVAL", "EADDRNOTAVAIL", "ENODEV", "ENOMEM")}
_UNRESOLVED = {"FAILED", "INCOMPLETE", "NONE"}
_DETAIL_NOTE = re.compile(r" \([^()]*\)$")
_PATH_MTU = re.compile(r"\(path MTU (\d+)\)$")


def query(pod_key: str, src: str, dst: str, size: int | None) -> dict:
    """The question a source pod's node answers: the pod's view of a packet src → dst."""
    return {"kind": KIND, "pod": pod_key, "src": src, "dst": dst, "size": size}


def is_query(q: dict) -> bool:
    return isinstance(q, dict) and q.get("kind") == KIND


def needed(packets: list[Packet], probes: list[ProbeResult], pod_key: str | None) -> bool:
    """Whether some probe never left the source pod (its facts are then worth reading)."""
    if pod_key is None:
        return False
    requests = [p for p in packets if p.direction == "request"]
    return any(_stuck(pr, [p for p in requests if p.seq == pr.seq], pod_key) for pr in probes)


def facts(ev: Evidence | None, node: str | None) -> tuple[dict, dict] | None:
    """(query, facts) of the source pod's answer in the evidence, or None."""
    if ev is None:
        return None
    nodes = [node] if node in ev.answers else list(ev.answers)
    for n in nodes:
        for ans in ev.answers.get(n) or []:
            # `of: pod` marks a pod's view (an agent that does not know the query answers with
            # its node's facts, which say nothing about the pod)
            f = ans.get("facts")
            if is_query(ans.get("query")) and isinstance(f, dict) and f.get("of") == "pod":
                return ans["query"], f
    return None


def errno_name(pr: ProbeResult) -> str | None:
    """The send's error as its errno name (ENETUNREACH, EMSGSIZE, …), None when it was sent."""
    if pr.outcome not in ("error", "refused") or not pr.detail:
        return None
    if pr.outcome == "refused" and pr.reply_from:
        return None
    # an IPv6 send's error carries the path MTU the kernel knows: "Message too long (path MTU 1430)"
    base = _DETAIL_NOTE.sub("", pr.detail)
    return _ERRNO.get(pr.detail) or _ERRNO.get(base) or (pr.detail if pr.outcome == "error" else None)


def path_mtu(pr: ProbeResult) -> int | None:
    """The path MTU an IPv6 probe's EMSGSIZE reported, None when it did not say."""
    m = _PATH_MTU.search(pr.detail or "") if pr.outcome == "error" else None
    return int(m.group(1)) if m else None


def _left(reqs: list[Packet], pod_key: str) -> bool:
    return any(h.pod != pod_key for p in reqs for h in p.hops)


def _stuck(pr: ProbeResult, reqs: list[Packet], pod_key: str) -> bool:
    """The probe's request never left the source pod: its send failed, or no hop outside
    the pod saw it while nothing answered it (an answer proves it left, unseen or not)."""
    if _left(reqs, pod_key):
        return False
    if pr.outcome == "answered" or (pr.outcome == "refused" and pr.reply_from and pr.reply_from != pr.src):
        return False
    return True


def judge(pr: ProbeResult, reqs: list[Packet], pod: str | None, node: str | None,
          ev: Evidence | None) -> dict | None:
    """The source verdict of one probe (None: its request left the pod, or the source is
    not a pod). `pod` is the source pod's key, `node` its node."""
    if pod is None or not _stuck(pr, reqs, pod):
        return None
    name = pod.split("/", 1)[-1]
    err = errno_name(pr)
    found = facts(ev, node)
    out: dict = {"status": "never-left", "node": node, "pod": pod, "errno": err, "cause": None,
                 "hint": None, "runbook": None, "checked": []}
    sent = f"the send failed with {err}" if err else "the send succeeded"
    if found is None:
        out["hint"] = (f"never left {name} ({sent}); its routes and neighbours could not be read "
                       "(no answer from its node)")
        out["runbook"] = f"{RUNBOOK_DIR}/packet-lost.md"
        return out
    q, f = found
    out["evidence"] = {k: f.get(k) for k in ("route", "next_hop", "device")}
    cause = _cause(name, q, f, err, path_mtu(pr))
    if cause is not None:
        out["cause"], sentence, book = cause
        out["hint"] = f"never left {name}: {sentence}"
        out["runbook"] = f"{RUNBOOK_DIR}/{book}"
        return out
    out["checked"] = _checked(q, f, sent)
    out["hint"] = f"never left {name}: nothing read in the pod explains it (checked: {'; '.join(out['checked'])})"
    out["runbook"] = f"{RUNBOOK_DIR}/packet-lost.md"
    return out


def _cause(name: str, q: dict, f: dict, err: str | None,
           pmtu: int | None = None) -> tuple[str, str, str] | None:
    """(cause, sentence, runbook) from the pod's facts, or None when none proves a cause."""
    rt = f.get("route") or {}
    dst, size = q.get("dst"), q.get("size")
    dev = f.get("device") or {}
    failed = f" (the send failed with {err})" if err else ""
    # 1. no route: the pod's kernel has nowhere to send it
    if rt.get("error"):
        down = [n for n, lk in (f.get("links") or {}).items() if n != "lo" and not lk.get("up")]
        more = f"; {', '.join(down)} {'is' if len(down) == 1 else 'are'} down" if down else ""
        return ("no-route", f"{name} has no route to {dst} ({rt['error']}{more}){failed}.", "no-route.md")
    # 2. MTU: the route (a locked route MTU or a cached path MTU) is smaller than the DF probe
    mtu = rt.get("mtu") or None
    if mtu and size and size > mtu:
        what = (f"a locked route MTU of {mtu}" if rt.get("mtu_locked")
                else f"a path MTU of {mtu} cached")
        return ("mtu", f"{name} has {what} for {dst}; a {size}-byte DF probe cannot leave{failed}.", "mtu.md")
    dev_mtu = dev.get("mtu")
    if err == "EMSGSIZE" and dev_mtu and size and size > dev_mtu:
        return ("mtu", f"{name}'s {dev.get('name')} has an MTU of {dev_mtu}; a {size}-byte DF probe "
                f"cannot leave{failed}.", "mtu.md")
    if err == "EMSGSIZE" and pmtu and size and size > pmtu:
        return ("mtu", f"{name}'s kernel knows a path MTU of {pmtu} for {dst}; a {size}-byte probe "
                f"cannot leave{failed}.", "mtu.md")
    # 3. the device the route leaves by is down
    if dev and (not dev.get("up") or dev.get("operstate") == "DOWN"):
        return ("no-route", f"{name}'s {dev.get('name')} is down (operstate {dev.get('operstate')}): "
                f"its route to {dst} cannot be used{failed}.", "no-route.md")
    # 4. the next hop's MAC address cannot be resolved
    nh = f.get("next_hop") or {}
    nb = nh.get("neigh")
    states = set(nb.get("state") or []) if nb else {"NONE"}
    if nh and not nh.get("noarp") and (states & _UNRESOLVED or not (nb or {}).get("lladdr")):
        role = "its gateway" if rt.get("gateway") == nh.get("ip") else "the next hop"
        return ("neighbour-missing", f"{name} cannot resolve {role} {nh.get('ip')} on {nh.get('dev')}: "
                f"neighbour {', '.join(sorted(states))}{failed}.", "neighbour.md")
    return None


def _checked(q: dict, f: dict, sent: str) -> list[str]:
    """What was read in the pod and found normal, one phrase each."""
    rt = f.get("route") or {}
    nh = f.get("next_hop") or {}
    nb = nh.get("neigh") or {}
    dev = f.get("device") or {}
    out = [f"route to {q.get('dst')} via {rt.get('gateway') or 'direct'} on {rt.get('dev')}"
           + (f" (MTU {rt['mtu']})" if rt.get("mtu") else "")]
    if nh:
        out.append(f"neighbour {nh.get('ip')} {', '.join(nb.get('state') or ['none'])}"
                   + (f" at {nb['lladdr']}" if nb.get("lladdr") else ""))
    if dev:
        out.append(f"{dev.get('name')} up (MTU {dev.get('mtu')})")
    out.append(sent)
    return out


def inside_pod(packet: Packet) -> bool:
    """A request seen only inside its source pod (it never left it)."""
    pod = packet.hops[0].pod if packet.hops else None
    return packet.direction == "request" and pod is not None and all(h.pod == pod for h in packet.hops)


def explain_packet(packet: Packet, v: Verdict, ev: Evidence | None) -> Verdict:
    """The verdict of a request that never left its pod, with the cause the pod's own facts
    prove (none: the verdict as it was, without any node's facts)."""
    found = facts(ev, v.node)
    if found is None:
        return v
    q, f = found
    name = (packet.hops[0].pod or "").split("/", 1)[-1]
    cause = _cause(name, q, f, None)
    if cause is None:
        return v
    what, sentence, book = cause
    return replace(v, cause=what, hint=f"Never left {name}: {sentence}", runbook=f"{RUNBOOK_DIR}/{book}",
                   evidence={**(v.evidence or {}), "source": {k: f.get(k) for k in ("route", "next_hop", "device")}})


def line(seq: int, v: dict) -> str:
    """The flow problem line of a probe that never left its pod."""
    return f"probe {seq}: {v['hint']}"
