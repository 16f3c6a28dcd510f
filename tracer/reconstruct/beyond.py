"""The edge of the view in space: a packet that left the traced nodes towards one nobody traced.

A packet last seen leaving a node (encapsulated towards a peer's address, or routed towards
an address another node owns) whose next node was not traced — not part of the run, or its
agent died — was not lost where it was last seen: nothing shows what happened next. Its
verdict is `partial` there, naming where it went and why that node has no view, instead of
`lost` (which would blame the last node seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from tracer.cluster.inventory import narrowest
from tracer.reconstruct.model import Hop, Verdict

NOT_PLANNED = "no agent was asked to trace it"
RUNBOOK = "docs/runbooks/no-view.md"


@dataclass(frozen=True)
class View:
    """Which nodes a run traced, why the others were not, and which node owns an address."""

    traced: tuple[str, ...] = ()
    untraced: dict[str, str] = field(default_factory=dict)    # node → why it has no view
    node_ips: dict[str, str] = field(default_factory=dict)    # node address → node
    cidrs: dict[str, str] = field(default_factory=dict)       # pod CIDR → node

    def node_of(self, ip: str | None) -> str | None:
        """The node an address belongs to: a node address, else the narrowest pod CIDR."""
        if not ip:
            return None
        if ip in self.node_ips:
            return self.node_ips[ip]
        return narrowest(ip, self.cidrs.items())

    def as_json(self) -> dict:
        return {"traced": list(self.traced), "untraced": dict(self.untraced),
                "node_ips": dict(self.node_ips), "cidrs": dict(self.cidrs)}

    @classmethod
    def from_json(cls, d: dict | None) -> "View | None":
        if not isinstance(d, dict):
            return None
        return cls(tuple(d.get("traced") or ()), dict(d.get("untraced") or {}),
                   dict(d.get("node_ips") or {}), dict(d.get("cidrs") or {}))


def agent_failed(failure: str) -> str:
    """Why a node whose agent failed has no view: "its agent stopped before the end (exit 9)"."""
    return ("its agent " + failure[len("the agent "):] if failure.startswith("the agent ")
            else f"its agent failed: {failure}")


def view_of(nodes: Iterable, traced: Iterable[str], why: dict[str, str] | None = None) -> View:
    """The View of a run: `nodes` are the inventory's Node objects, `traced` the nodes whose
    trace covers the run, `why` the reason for those that were planned but have no view."""
    nodes = list(nodes)
    traced = tuple(dict.fromkeys(t for t in traced if t and t not in (why or {})))
    untraced = {n.name: (why or {}).get(n.name, NOT_PLANNED) for n in nodes if n.name not in traced}
    untraced.update({k: v for k, v in (why or {}).items() if k not in untraced})
    ips: dict[str, str] = {}
    cidrs: dict[str, str] = {}
    for n in nodes:
        for a in [n.ip, *getattr(n, "addresses", [])]:
            if a:
                ips.setdefault(a, n.name)
        for c in (n.cidrs() if hasattr(n, "cidrs") else [n.pod_cidr]):
            if c:
                cidrs[c] = n.name
    return View(traced, untraced, ips, cidrs)


def left_view(packet, traced_nodes: Iterable[str], node_of: Callable[[str | None], str | None],
              why: dict[str, str] | None = None) -> Verdict | None:
    """A `partial` verdict when the packet (a Packet or its hops) was last seen leaving a
    node towards a node nobody traced; None when the view does not end there (the next node
    was traced, the packet never left, or where it went is not known)."""
    hops: tuple[Hop, ...] = tuple(getattr(packet, "hops", packet) or ())
    on_nodes = [i for i, h in enumerate(hops) if h.node is not None]
    if not on_nodes:
        return None
    i = on_nodes[-1]
    last = hops[i]
    if last.point != "tx":
        return None
    encap = next((h.encap for h in reversed(hops[i:]) if h.encap is not None), None)
    towards = encap.dst if encap is not None else last.dst
    nxt = node_of(towards)
    if encap is None and (nxt is None or nxt == last.node):
        return None     # not seen leaving the node (or towards an address no node owns)
    traced = set(traced_nodes)
    if nxt is not None and (nxt in traced or nxt == last.node):
        return None
    reason = (why or {}).get(nxt or "", NOT_PLANNED) if nxt else "no node of the cluster has this address"
    named = f"{nxt}, not traced: {reason}" if nxt else f"not traced: {reason}"
    hint = f"No view beyond {last.node}: the packet left towards {towards} ({named})."
    evidence = {"view": {"left": last.node, "dev": last.dev, "towards": towards, "towards_node": nxt,
                         "encapsulated": encap is not None, "traced": sorted(traced),
                         "not_traced": {nxt or towards: reason}}}
    return Verdict("partial", last.node, last.dev, last.point, hint=hint, runbook=RUNBOOK, evidence=evidence)


def problem(seq: int, what: str, v: Verdict) -> str | None:
    """The problem line of a probe's partial request or reply; None when `v` is not one."""
    view = (v.evidence or {}).get("view") if v.status == "partial" else None
    if not view:
        return None
    nxt = view.get("towards_node")
    why = next(iter((view.get("not_traced") or {}).values()), None)
    return (f"probe {seq}: {what} left {view.get('left')} towards {view.get('towards')}"
            + (f" ({nxt})" if nxt else "") + ": not traced" + (f" ({why})" if why else ""))
