"""ICMP and ICMPv6 errors a probe gets back, named by type and code (RFC 792, RFC 1812,
RFC 4443).

A raw ICMP/ICMPv6 socket sees the error itself; a TCP or UDP socket learns it through its
error queue (IP_RECVERR, IPV6_RECVERR), which keeps the type, the code, the MTU a
"fragmentation needed" or a "packet too big" carries and the address of the router that
sent it.
"""

from __future__ import annotations

import socket
import struct

IP_RECVERR = 11              # <linux/in.h>
IPV6_RECVERR = 25            # <linux/in6.h>
SO_EE_ORIGIN_ICMP = 2        # <linux/errqueue.h>
SO_EE_ORIGIN_ICMP6 = 3
MSG_ERRQUEUE = 0x2000        # <linux/socket.h>
_EE = struct.Struct("=IBBBBII")   # struct sock_extended_err

DEST_UNREACH, TIME_EXCEEDED, PARAMETER_PROBLEM = 3, 11, 12
FRAG_NEEDED = 4

# (type, code) → name; a code not listed gets its type's name
NAMES: dict[tuple[int, int | None], str] = {
    (3, None): "destination unreachable",
    (3, 0): "network unreachable", (3, 1): "host unreachable", (3, 2): "protocol unreachable",
    (3, 3): "port unreachable", (3, 4): "fragmentation needed", (3, 5): "source route failed",
    (3, 6): "network unreachable", (3, 7): "host unreachable",
    (3, 9): "administratively prohibited", (3, 10): "administratively prohibited",
    (3, 11): "network unreachable", (3, 12): "host unreachable",
    (3, 13): "administratively prohibited",
    (3, 14): "host precedence violation", (3, 15): "precedence cutoff",
    (11, None): "time exceeded", (11, 0): "time exceeded", (11, 1): "fragment reassembly time exceeded",
    (12, None): "parameter problem",
}


# ICMPv6 errors (RFC 4443): type 1 destination unreachable, 2 packet too big, 3 time
# exceeded, 4 parameter problem.
V6_DEST_UNREACH, V6_PACKET_TOO_BIG, V6_TIME_EXCEEDED, V6_PARAMETER_PROBLEM = 1, 2, 3, 4
V6_ERRORS = (V6_DEST_UNREACH, V6_PACKET_TOO_BIG, V6_TIME_EXCEEDED, V6_PARAMETER_PROBLEM)
NAMES6: dict[tuple[int, int | None], str] = {
    (1, None): "destination unreachable",
    (1, 0): "network unreachable",              # no route to destination
    (1, 1): "administratively prohibited",
    (1, 2): "beyond scope of source address",
    (1, 3): "host unreachable",                 # address unreachable (no neighbour)
    (1, 4): "port unreachable",
    (1, 5): "source address failed ingress/egress policy",
    (1, 6): "reject route to destination",
    (2, None): "packet too big",
    (3, None): "time exceeded", (3, 0): "time exceeded", (3, 1): "fragment reassembly time exceeded",
    (4, None): "parameter problem",
}


def name(icmp_type: int, code: int, v6: bool = False) -> str:
    """The name of an ICMP (or, `v6`, ICMPv6) error (type, code)."""
    table, label = (NAMES6, "ICMPv6") if v6 else (NAMES, "ICMP")
    return table.get((icmp_type, code)) or table.get((icmp_type, None)) or f"{label} type {icmp_type}"


def describe(icmp_type: int, code: int, sender: str | None, mtu: int | None = None, v6: bool = False) -> str:
    """One phrase for a probe's ICMP error: "administratively prohibited (ICMP 3/13) from
    10.244.2.0"; a fragmentation needed (ICMPv6: a packet too big) says the MTU it carries."""
    what = f"{'ICMPv6' if v6 else 'ICMP'} {icmp_type}/{code}"
    if mtu and ((not v6 and icmp_type == DEST_UNREACH and code == FRAG_NEEDED)
                or (v6 and icmp_type == V6_PACKET_TOO_BIG)):
        what += f", MTU {mtu}"
    return f"{name(icmp_type, code, v6)} ({what})" + (f" from {sender}" if sender else "")


def from_icmp(data: bytes, ihl: int, sender: str | None) -> str:
    """The phrase for an ICMP error read on a raw socket (`data` from its IP header on,
    `ihl` that header's length)."""
    icmp_type, code = data[ihl], data[ihl + 1]
    mtu = struct.unpack("!H", data[ihl + 6: ihl + 8])[0] if len(data) >= ihl + 8 else None
    return describe(icmp_type, code, sender, mtu)


def from_icmp6(data: bytes, sender: str | None) -> str:
    """The phrase for an ICMPv6 error read on a raw ICMPv6 socket (`data` from the ICMPv6
    header on: a raw IPv6 socket gets no IP header); a packet too big says its MTU."""
    icmp_type, code = data[0], data[1]
    mtu = struct.unpack("!I", data[4:8])[0] if icmp_type == V6_PACKET_TOO_BIG and len(data) >= 8 else None
    return describe(icmp_type, code, sender, mtu, v6=True)


def enable(sock: socket.socket) -> None:
    """Ask the kernel to keep the ICMP (ICMPv6 for an IPv6 socket) errors this socket gets
    (its error queue)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def parse_ee(data: bytes) -> tuple[int, int, int, str | None] | None:
    """(type, code, info, sender) of an IP_RECVERR / IPV6_RECVERR control message that came
    from an ICMP or ICMPv6 error; None for a local error."""
    if len(data) < _EE.size:
        return None
    _errno, origin, icmp_type, code, _pad, info, _data = _EE.unpack_from(data)
    if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
        return None
    sender = None
    fam = struct.unpack_from("=H", data, _EE.size)[0] if len(data) >= _EE.size + 2 else None
    if fam == socket.AF_INET and len(data) >= _EE.size + 8:
        sender = socket.inet_ntoa(data[_EE.size + 4: _EE.size + 8])
    elif fam == socket.AF_INET6 and len(data) >= _EE.size + 24:   # sockaddr_in6: the address at +8
        sender = socket.inet_ntop(socket.AF_INET6, data[_EE.size + 8: _EE.size + 24])
    return icmp_type, code, info, sender


def read_queue(sock: socket.socket) -> str | None:
    """The phrase for the last ICMP error in a socket's error queue, or None."""
    found = None
    for _ in range(8):
        try:
            _, anc, _, _ = sock.recvmsg(512, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, OSError):
            break
        for level, kind, data in anc:
            if (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                ee = parse_ee(data)
                if ee is not None:
                    icmp_type, code, info, sender = ee
                    if data[4] == SO_EE_ORIGIN_ICMP6:
                        found = describe(icmp_type, code, sender,
                                         info if icmp_type == V6_PACKET_TOO_BIG else None, v6=True)
                    else:
                        found = describe(icmp_type, code, sender, info if code == FRAG_NEEDED else None)
    return found
