"""Which hop events are one packet: the content key both reconstruction paths group by.

A packet keeps its content across hops, NAT and tunnels (events carry the inner header), so
its events on every node fall into one group:

- IPv4: protocol, IP ID, IP total length, TCP sequence and flags, ICMP type, and for ICMP
  echo the id and sequence (ports change under NAT; the IP ID does not).
- IPv6 has no IP ID. Its key is the protocol, the IP length (40 + payload), the TCP sequence
  and flags, for UDP a hash of the first 8 payload bytes (the kernel puts it where the TCP
  sequence goes: what NAT leaves alone), the ICMPv6 type, echo id and sequence, and the flow
  label (set by the sender, left alone by routers, NAT and tunnels). Packets of equal content
  remain possible (two pure ACKs of one connection), so the k-th time one content passes one
  place (namespace, device, hook) with one hop limit is the k-th packet: a packet passes each
  place once, in order, and a packet going round a routing loop comes back with a lower hop
  limit (loops.py counts those rounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from tracer import addrs
from tracer.kernel.record import PROTOS

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd

ICMP, ICMPV6 = 1, 58
ICMP_PROTOS = (ICMP, ICMPV6)
ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}
ECHO_REPLY = {ICMP: 0, ICMPV6: 129}
ECHO_TYPES = (8, 0, 128, 129)
PROTO_NAMES = {**PROTOS, ICMPV6: "icmpv6"}          # protocol number → the name people see
PROTO_IDS = {v: k for k, v in PROTO_NAMES.items()}
# ICMPv6 errors (RFC 4443) and the ICMP ones they stand for
ICMPV6_ERRORS = {1: "destination unreachable", 2: "packet too big", 3: "time exceeded",
                 4: "parameter problem"}
_V6 = np.uint64(addrs.V6_BIT)


def is_icmp(proto) -> np.ndarray | bool:
    """Whether a protocol number (or a column of them) is ICMP of either family."""
    if np.ndim(proto) == 0:
        return int(proto) in ICMP_PROTOS
    return np.isin(np.asarray(proto), ICMP_PROTOS)


def is_echo(proto: int, icmp_type: int, request: bool) -> bool:
    """Whether an ICMP/ICMPv6 type is the echo request (or reply) of its family."""
    want = ECHO_REQUEST if request else ECHO_REPLY
    return want.get(int(proto)) == int(icmp_type)


def same_proto(name: str | None, probe_proto: str | None) -> bool:
    """A packet's protocol name against a probe's: `icmp` probes are echo in either family."""
    if name == probe_proto:
        return True
    return {name, probe_proto} <= {"icmp", "icmpv6"}


def v6_rows(saddr) -> np.ndarray:
    """Mask of the events whose addresses are IPv6, from the address keys (addrs.key)."""
    a = np.asarray(saddr)
    if a.dtype.kind not in "ui" or a.dtype.itemsize < 8:
        return np.zeros(len(a), dtype=bool)
    return (a.astype(np.uint64) & _V6) != 0


def _codes(*cols: np.ndarray) -> np.ndarray:
    """Dense group codes for rows of several integer columns (hash-based, no sort)."""
    import pandas as pd
    code = None
    for c in cols:
        sub = pd.factorize(np.asarray(c))[0].astype(np.int64)
        code = sub if code is None else pd.factorize((code << 32) | sub)[0].astype(np.int64)
    return code if code is not None else np.zeros(0, dtype=np.int64)


def _col(cols: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    c = cols.get(name) if hasattr(cols, "get") else None
    return np.zeros(n, dtype=np.int64) if c is None else np.asarray(c)


def content_groups(cols: Mapping[str, np.ndarray], skb_when_no_id: bool = False) -> np.ndarray:
    """One group code per hop event (rows in time order): equal codes, equal packet content
    (see the module doc). `cols` holds the record's columns (proto, ip_id, ip_len, tcp_seq,
    tcp_flags, icmp_type, sport, dport, saddr; flow_lbl, netns, ifindex, hook, ttl and skb
    when known). With `skb_when_no_id`, an IPv4 datagram of IP ID 0 (no identity of its own)
    is told apart by its buffer's address too (the capture path's rule)."""
    proto = np.asarray(cols["proto"])
    n = len(proto)
    if not n:
        return np.zeros(0, dtype=np.int64)
    icmp = is_icmp(proto)
    v6 = v6_rows(cols["saddr"])
    u = lambda name: _col(cols, name, n).astype(np.uint64)   # noqa: E731
    k1 = (proto.astype(np.uint64) | (u("ip_id") << np.uint64(8)) | (u("ip_len") << np.uint64(24))
          | (u("tcp_flags") << np.uint64(40)) | (u("icmp_type") << np.uint64(48)))
    k2 = (u("tcp_seq") | (np.where(icmp, u("sport"), 0).astype(np.uint64) << np.uint64(32))
          | (np.where(icmp, u("dport"), 0).astype(np.uint64) << np.uint64(48)))
    k3 = np.where(v6, u("flow_lbl"), 0).astype(np.uint64)
    if skb_when_no_id:
        no_id = (np.asarray(cols["ip_id"]) == 0) & ~icmp & ~v6
        k3 = k3 | np.where(no_id, u("skb"), 0).astype(np.uint64)
    group = _codes(k1, k2, k3)
    if v6.any():
        group = _codes(group, np.where(v6, _occurrence(group, cols, n), 0))
    return group


def _occurrence(group: np.ndarray, cols: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """How many times before each event the same content passed the same place with the
    same hop limit (rows in time order)."""
    import pandas as pd
    agent = cols.get("agent") if hasattr(cols, "get") else None
    agent = pd.factorize(np.asarray(agent))[0] if agent is not None else np.zeros(n, dtype=np.int64)
    place = _codes(group, agent, _col(cols, "netns", n), _col(cols, "ifindex", n), _col(cols, "hook", n),
                   _col(cols, "ttl", n))
    return pd.Series(place).groupby(place, sort=False).cumcount().to_numpy()
