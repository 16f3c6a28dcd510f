"""ICMP errors a probe gets back, named by type and code (RFC 792, RFC 1812).

A raw ICMP socket sees the error itself; a TCP or UDP socket learns it through its error
queue (IP_RECVERR), which keeps the type, the code, the MTU a "fragmentation needed" carries
and the address of the router that sent it.
"""

from __future__ import annotations

import socket
import struct

IP_RECVERR = 11              # <linux/in.h>
SO_EE_ORIGIN_ICMP = 2        # <linux/errqueue.h>
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


def name(icmp_type: int, code: int) -> str:
    """The name of an ICMP error (type, code)."""
    return NAMES.get((icmp_type, code)) or NAMES.get((icmp_type, None)) or f"ICMP type {icmp_type}"


def describe(icmp_type: int, code: int, sender: str | None, mtu: int | None = None) -> str:
    """One phrase for a probe's ICMP error: "administratively prohibited (ICMP 3/13) from
    10.244.2.0"; a fragmentation needed says the MTU it carries."""
    what = f"ICMP {icmp_type}/{code}"
    if icmp_type == DEST_UNREACH and code == FRAG_NEEDED and mtu:
        what += f", MTU {mtu}"
    return f"{name(icmp_type, code)} ({what})" + (f" from {sender}" if sender else "")


def from_icmp(data: bytes, ihl: int, sender: str | None) -> str:
    """The phrase for an ICMP error read on a raw socket (`data` from its IP header on,
    `ihl` that header's length)."""
    icmp_type, code = data[ihl], data[ihl + 1]
    mtu = struct.unpack("!H", data[ihl + 6: ihl + 8])[0] if len(data) >= ihl + 8 else None
    return describe(icmp_type, code, sender, mtu)


def enable(sock: socket.socket) -> None:
    """Ask the kernel to keep the ICMP errors this socket gets (its error queue)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def parse_ee(data: bytes) -> tuple[int, int, int, str | None] | None:
    """(type, code, info, sender) of an IP_RECVERR control message that came from an ICMP
    error; None for a local error."""
    if len(data) < _EE.size:
        return None
    _errno, origin, icmp_type, code, _pad, info, _data = _EE.unpack_from(data)
    if origin != SO_EE_ORIGIN_ICMP:
        return None
    sender = None
    if len(data) >= _EE.size + 8 and struct.unpack_from("=H", data, _EE.size)[0] == socket.AF_INET:
        sender = socket.inet_ntoa(data[_EE.size + 4: _EE.size + 8])
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
            if level == socket.IPPROTO_IP and kind == IP_RECVERR:
                ee = parse_ee(data)
                if ee is not None:
                    icmp_type, code, info, sender = ee
                    found = describe(icmp_type, code, sender, info if code == FRAG_NEEDED else None)
    return found
