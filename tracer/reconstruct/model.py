"""The typed model passed between the engine's stages: packets, hops, NAT changes, verdicts.

Every class is frozen: a stage that refines one (the diagnosis adding a cause) makes a new
one with `dataclasses.replace`. `as_json()` gives the `flow -o json` shape (the contract's
keys, in their order); `from_json()` reads that shape back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Addr:
    """Addresses and ports of one packet at one place (a conntrack tuple, a NAT side)."""

    src: str | None                 # source address
    sport: int | None               # source port; None for ICMP
    dst: str | None                 # destination address
    dport: int | None               # destination port; None for ICMP

    def as_json(self) -> dict:
        return {"src": self.src, "sport": self.sport, "dst": self.dst, "dport": self.dport}

    @classmethod
    def from_json(cls, d: dict | None) -> "Addr | None":
        return None if d is None else cls(d.get("src"), d.get("sport"), d.get("dst"), d.get("dport"))


@dataclass(frozen=True)
class Encap:
    """The tunnel header around a packet seen on an overlay device's wire."""

    src: str                        # outer source address (the sending VTEP)
    dst: str                        # outer destination address (the receiving VTEP)
    vni: int                        # the overlay's network identifier
    type: str                       # tunnel kind ("vxlan", "geneve", …)

    def as_json(self) -> dict:
        return {"src": self.src, "dst": self.dst, "vni": self.vni, "type": self.type}

    @classmethod
    def from_json(cls, d: dict | None) -> "Encap | None":
        return None if d is None else cls(d["src"], d["dst"], int(d["vni"]), d.get("type", "vxlan"))


@dataclass(frozen=True)
class ConntrackView:
    """What the conntrack entry attached to a packet said at one hop."""

    state: str                      # new / established / related (IP_CT_* without _REPLY)
    dir: str                        # "original" or "reply": which direction of the entry
    status: tuple[str, ...] | None = None   # IPS_* flags set; None when the entry's tuples were unread
    nat: str | None = None          # "dnat", "snat", "snat+dnat" or None
    of: str | None = None           # "outer" when the entry is the tunnel's own UDP flow
    orig: Addr | None = None        # the entry's original-direction tuple
    reply: Addr | None = None       # the entry's reply-direction tuple

    def as_json(self) -> dict:
        out: dict = {"state": self.state, "dir": self.dir}
        if self.orig is None:
            return out
        out["status"] = list(self.status or ())
        out["nat"] = self.nat
        if self.of is not None:
            out["of"] = self.of
        out["orig"] = self.orig.as_json()
        out["reply"] = self.reply.as_json() if self.reply else None
        return out

    @classmethod
    def from_json(cls, d: dict | None) -> "ConntrackView | None":
        if d is None:
            return None
        return cls(d["state"], d["dir"], tuple(d["status"]) if d.get("status") is not None else None,
                   d.get("nat"), d.get("of"), Addr.from_json(d.get("orig")), Addr.from_json(d.get("reply")))


@dataclass(frozen=True)
class Hop:
    """One place a packet was seen: a device (rx/tx) or a kernel step, on a node or the fabric."""

    node: str | None                # the node, or None for the fabric between nodes
    pod: str | None                 # the pod (namespace/name) whose namespace it was, or None
    dev: str                        # the device name
    point: str                      # rx / tx, or a kernel step (ip_forward, nat, …)
    src: str                        # source address as seen there (after any NAT so far)
    dst: str                        # destination address as seen there
    seen_by: tuple[str, ...] = ("tracepoint",)  # kinds of hook that saw it (tracepoint, tc, kprobe)
    t_ns: int = 0                   # time since the packet's first hop
    dt_ns: int = 0                  # time since the previous hop
    encap: Encap | None = None      # the tunnel header, when seen encapsulated
    ifindex: int = 0                # the device's index in its namespace
    netns: int = 0                  # the network namespace's inode
    len: int = 0                    # bytes of the buffer at that hop
    sport: int | None = None        # source port; None for ICMP
    dport: int | None = None        # destination port; None for ICMP
    ct: ConntrackView | None = None  # the conntrack entry the buffer carried, if any
    ttl: int | None = None          # the (inner) IP TTL there; None when not recorded
    tcp_flags: str | None = None    # TCP flags there in tcpdump's letters ("S."); None: not TCP

    def as_json(self, names: dict[str, dict | None] | None = None) -> dict:
        """The JSON hop; with `names` (address → what it is), `src_is`/`dst_is` too."""
        out = {"node": self.node, "pod": self.pod, "dev": self.dev, "point": self.point,
               "seen_by": list(self.seen_by), "t_ns": self.t_ns, "dt_ns": self.dt_ns,
               "src": self.src, "dst": self.dst, "encap": self.encap.as_json() if self.encap else None,
               "ifindex": self.ifindex, "netns": self.netns, "len": self.len,
               "sport": self.sport, "dport": self.dport, "ct": self.ct.as_json() if self.ct else None,
               "ttl": self.ttl, "tcp_flags": self.tcp_flags}
        if names is not None:
            out["src_is"], out["dst_is"] = names.get(self.src), names.get(self.dst)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Hop":
        return cls(d["node"], d["pod"], d["dev"], d["point"], d["src"], d["dst"],
                   tuple(d.get("seen_by") or ("tracepoint",)), d.get("t_ns", 0), d.get("dt_ns", 0),
                   Encap.from_json(d.get("encap")), d.get("ifindex", 0), d.get("netns", 0), d.get("len", 0),
                   d.get("sport"), d.get("dport"), ConntrackView.from_json(d.get("ct")), d.get("ttl"),
                   d.get("tcp_flags"))


@dataclass(frozen=True)
class NatChange:
    """An address or port change between two consecutive hops of a packet."""

    type: str                       # dnat / snat / reverse-dnat / reverse-snat
    hop: int                        # index of the hop where the new addresses were first seen
    node: str | None                # that hop's node
    dev: str                        # that hop's device
    before: Addr                    # addresses at the hop before
    after: Addr                     # addresses at that hop
    backend: str | None = None      # the Service backend DNAT picked, when it was a VIP

    def as_json(self) -> dict:
        return {"type": self.type, "hop": self.hop, "node": self.node, "dev": self.dev,
                "before": self.before.as_json(), "after": self.after.as_json(), "backend": self.backend}

    @classmethod
    def from_json(cls, d: dict) -> "NatChange":
        return cls(d["type"], d["hop"], d["node"], d["dev"], Addr.from_json(d["before"]),
                   Addr.from_json(d["after"]), d.get("backend"))


@dataclass(frozen=True)
class Verdict:
    """What happened to one packet, where, why, and the runbook to follow."""

    status: str                     # delivered / dropped / lost
    node: str | None                # where: the node (None: the fabric)
    dev: str | None                 # where: the device
    point: str | None               # where: rx / tx / drop / a kernel step
    reason: str | None = None       # the kernel's drop reason (SKB_DROP_REASON_ without prefix)
    location: str | None = None     # the kernel function that dropped it (symbol+offset)
    hint: str | None = None         # one sentence for a person
    runbook: str | None = None      # the runbook file to follow
    cause: str | None = None        # the cause the evidence supports (ip-forward-off, mtu, …)
    evidence: dict | None = None    # what the cause was read from (node facts, rules, conntrack)
    problem: bool = False           # delivered, yet wrong (an un-reversed reply)

    def as_json(self) -> dict:
        out = {"status": self.status, "node": self.node, "dev": self.dev, "point": self.point,
               "reason": self.reason, "location": self.location, "hint": self.hint,
               "runbook": self.runbook}
        if self.cause is not None:
            out["cause"] = self.cause
        if self.evidence is not None:
            out["evidence"] = self.evidence
        if self.problem:
            out["problem"] = True
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Verdict":
        return cls(d["status"], d.get("node"), d.get("dev"), d.get("point"), d.get("reason"),
                   d.get("location"), d.get("hint"), d.get("runbook"), d.get("cause"), d.get("evidence"),
                   bool(d.get("problem")))


@dataclass(frozen=True)
class FiveTuple:
    """A packet's protocol, addresses and ports at its first hop."""

    proto: str                      # icmp / tcp / udp (or the protocol number)
    src: str
    dst: str
    sport: int | None               # None for ICMP
    dport: int | None               # None for ICMP

    def as_json(self) -> dict:
        return {"proto": self.proto, "src": self.src, "dst": self.dst, "sport": self.sport, "dport": self.dport}

    @classmethod
    def from_json(cls, d: dict) -> "FiveTuple":
        return cls(d["proto"], d["src"], d["dst"], d.get("sport"), d.get("dport"))


@dataclass(frozen=True)
class Packet:
    """One packet of a flow: its identity, the hops it was seen at, and its verdict."""

    direction: str                  # "request" (src → dst) or "reply"
    seq: int | None                 # the probe it belongs to, None when not probing
    five_tuple: FiveTuple           # addresses at its first hop ("tuple" in JSON)
    ip_id: int                      # IP identification (unchanged by NAT and tunnels)
    ip_len: int                     # IP total length
    df: bool                        # the Don't Fragment flag
    first_ts_ns: int                # its first hop's time (the flow's clock)
    one_way_ns: int | None          # first hop → arrival, None when it did not arrive
    hops: tuple[Hop, ...]           # where it was seen, in order
    verdict: Verdict
    nat: tuple[NatChange, ...] = field(default=())   # address changes along the hops
    tcp_flags: str | None = None    # TCP flags at its first hop in tcpdump's letters; None: not TCP

    def as_json(self, names: dict[str, dict | None] | None = None) -> dict:
        """The JSON packet; `names` (address → what it is) adds `src_is`/`dst_is` to the hops."""
        return {"direction": self.direction, "nat": [n.as_json() for n in self.nat], "seq": self.seq,
                "tuple": self.five_tuple.as_json(), "ip_id": self.ip_id, "ip_len": self.ip_len,
                "df": self.df, "first_ts_ns": self.first_ts_ns, "one_way_ns": self.one_way_ns,
                "hops": [h.as_json(names) for h in self.hops], "verdict": self.verdict.as_json(),
                "tcp_flags": self.tcp_flags}

    @classmethod
    def from_json(cls, d: dict) -> "Packet":
        return cls(d["direction"], d.get("seq"), FiveTuple.from_json(d["tuple"]), d["ip_id"], d["ip_len"],
                   bool(d.get("df")), d["first_ts_ns"], d.get("one_way_ns"),
                   tuple(Hop.from_json(h) for h in d["hops"]), Verdict.from_json(d["verdict"]),
                   tuple(NatChange.from_json(n) for n in d.get("nat") or ()), d.get("tcp_flags"))


@dataclass(frozen=True)
class FlowVerdict:
    """Whether a flow got through: every probe delivered and answered by the right address."""

    status: str                     # "ok" or "failed"
    summary: str                    # one line of figures ("3/3 delivered, 3/3 answered")
    problems: tuple[str, ...] = ()  # one sentence per thing that went wrong

    def as_json(self) -> dict:
        return {"status": self.status, "summary": self.summary, "problems": list(self.problems)}
