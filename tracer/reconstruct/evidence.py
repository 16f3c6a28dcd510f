"""Evidence: what the diagnosis may consult besides the packets, held as plain data.

The node facts are answers to questions (`fact_query`) asked of a node about one packet.
Which questions a set of packets raises is a pure function of the packets
(`diagnose.facts_needed`); a live run asks the nodes, a saved trace carries the answers, so
the same rules give the same causes offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tracer.reconstruct import arrival
from tracer.reconstruct.model import Packet


def fact_query(node: str, packet: Packet) -> dict:
    """The question node facts answer for a packet on a node: its addresses at the node's
    last hop, and the device it came in by (the node's last rx hop), so the route is looked
    up as the kernel did for this packet, not as for the node's own traffic."""
    last = [h for h in packet.hops if h.node == node] or packet.hops
    rx = [h for h in last if h.point == "rx" and h.pod is None]
    iif = rx[-1].dev if rx else None
    devs = list(dict.fromkeys(h.dev for h in packet.hops if h.node == node and h.pod is None))
    return {"src": last[-1].src, "dst": last[-1].dst, "iif": iif, "devs": devs, **arrival.pod_query(packet)}


@dataclass(frozen=True)
class Evidence:
    """Node facts answered during the run, netfilter rule hits, the Service and the overlay map."""

    # node → [{"query": fact_query(...), "facts": node facts}]; a node absent: not available
    answers: dict[str, list[dict]] = field(default_factory=dict)
    rule_hits: dict[str, list[dict]] = field(default_factory=dict)   # node → counted drop rules
    vip: str | None = None                # the Service's cluster IP when the flow went to one
    service: str | None = None            # its key (namespace/name)
    backends: list[str] = field(default_factory=list)   # its current backend addresses
    vtep: dict[str, dict] = field(default_factory=dict)  # overlay IP → {"node", "mac", "ip"}
    dnat: dict[str, str] = field(default_factory=dict)   # DNAT target → the address sent to (dnat.py)

    def facts(self, node: str, packet: Packet) -> dict | None:
        """The node's facts about this packet, or None when nobody answered."""
        q = fact_query(node, packet)
        for ans in self.answers.get(node) or []:
            if ans.get("query") == q and "facts" in ans:
                return ans["facts"]
        return None

    def with_answers(self, answers: dict[str, list[dict]],
                     rule_hits: dict[str, list[dict]] | None = None) -> "Evidence":
        """The same evidence with the nodes' answers (and rule hits) filled in."""
        return Evidence(answers, self.rule_hits if rule_hits is None else rule_hits, self.vip,
                        self.service, list(self.backends), self.vtep, dict(self.dnat))

    def with_dnat(self, dnat: dict[str, str]) -> "Evidence":
        """The same evidence with the DNATs seen on the path (target → the address sent to)."""
        return replace(self, dnat=dict(dnat))

    def as_json(self) -> dict:
        return {"answers": self.answers, "rule_hits": self.rule_hits, "vip": self.vip,
                "service": self.service, "backends": list(self.backends), "vtep": self.vtep,
                **({"dnat": dict(self.dnat)} if self.dnat else {})}

    @classmethod
    def from_json(cls, d: dict) -> "Evidence":
        return cls({str(k): list(v or []) for k, v in (d.get("answers") or {}).items()},
                   {str(k): list(v or []) for k, v in (d.get("rule_hits") or {}).items()},
                   d.get("vip"), d.get("service"), list(d.get("backends") or []), dict(d.get("vtep") or {}),
                   dict(d.get("dnat") or {}))


def service_evidence(service, ip: str | None = None) -> Evidence:
    """The evidence a flow's destination Service gives (no node facts yet). `ip` is the
    address the flow was resolved to: a dual-stack Service's VIP of that family."""
    if service is None:
        return Evidence()
    vip = ip if ip and ip in service.addresses() else service.cluster_ip
    return Evidence(vip=vip, service=service.key, backends=list(service.backend_ips))
