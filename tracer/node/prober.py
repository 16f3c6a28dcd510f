"""Probe packets sent from inside the source pod's network namespace: ICMP echo (ICMPv6
echo to an IPv6 destination), TCP SYN (SYN-ACK answers, RST refuses) and UDP datagrams (the
responder's datagram answers), over IPv4 or IPv6 as the destination address says.

Don't-fragment semantics: IPv4 probes carry DF (IP_PMTUDISC_DO); IPv6 probes are never
fragmented by this host either (IPV6_PMTUDISC_DO, IPV6_DONTFRAG), so a packet larger than
the path MTU comes back as "fragmentation needed" (IPv4) or "packet too big" (ICMPv6 2),
both with the MTU, or fails at once with EMSGSIZE once the kernel knows the path MTU.

Sockets are created inside the pod's namespace (tracer.netns.socket_in) and used from here:
no helper process, nothing left running if we are interrupted.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass

from tracer import testhooks
from tracer.node import icmperr, netns

PAYLOAD = b"podtrace-probe"


@dataclass
class ProbeResult:
    seq: int
    proto: str
    src: str
    dst: str
    sport: int | None       # TCP/UDP source port; ICMP echo id
    dport: int | None       # TCP/UDP destination port; ICMP echo seq
    sent_ns: int            # CLOCK_MONOTONIC, comparable with bpf_ktime_get_ns()
    outcome: str            # answered | refused | timeout | error
    reply_from: str | None = None
    rtt_ns: int | None = None
    detail: str | None = None
    source: dict | None = None   # the source verdict when the request never left the pod

    def as_json(self) -> dict:
        out = asdict(self)
        if out["source"] is None:
            del out["source"]
        return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2     # set DF, never fragment locally: an MTU black hole shows as a loss
IPV6_MTU_DISCOVER = 23     # <linux/in6.h>
IPV6_PMTUDISC_DO = 2
IPV6_MTU = 24
IPV6_DONTFRAG = 62
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129


def is_v6(addr: str) -> bool:
    return ":" in addr


def _payload(size: int | None, header: int, ip_header: int = 20) -> bytes:
    """Probe payload padded so the IP packet is `size` bytes (None: just the marker);
    `ip_header` is 40 for IPv6."""
    if size is None:
        return PAYLOAD
    n = max(size - ip_header - header, len(PAYLOAD))
    return (PAYLOAD * (n // len(PAYLOAD) + 1))[:n]


def _df(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


def _v6_tag(seq: int) -> bytes:
    """The first 8 bytes of an IPv6 UDP probe's payload, distinct per probe: IPv6 has no IP
    ID, and the tracer tells UDP datagrams over IPv6 apart by a hash of these bytes."""
    return b"pt" + struct.pack("!HI", seq & 0xFFFF, random.getrandbits(32))


def _too_long(sock: socket.socket, dst: str, exc: OSError) -> str:
    """An EMSGSIZE of an IPv6 probe says the path MTU the kernel knows (learnt from a
    packet too big, or the route's)."""
    text = exc.strerror or str(exc)
    if exc.errno != errno.EMSGSIZE or sock.family != socket.AF_INET6:
        return text
    try:
        if sock.type == socket.SOCK_RAW:
            sock.connect((dst, 0))
        mtu = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
    except OSError:
        return text
    return f"{text} (path MTU {mtu})"


def icmp_echo(ns: str, src: str, dst: str, ident: int, seq: int, timeout: float,
              size: int | None = None) -> ProbeResult:
    if is_v6(dst):
        return icmp6_echo(ns, src, dst, ident, seq, timeout, size)
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        _df(sock)
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + _payload(size, 8)
        body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
        t0 = _now()
        try:
            sock.sendto(body, (dst, 0))
        except OSError as exc:
            return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "error", detail=exc.strerror)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "timeout")
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                continue
            data, (peer, _) = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl: ihl + 8])
            if typ == 0 and rid == ident and rseq == seq:
                return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "answered", peer, _now() - t0)
            if typ in (3, 11, 12) and len(data) >= ihl + 8 + 28:
                # ICMP error quoting our echo: unreachable / time exceeded / parameter problem
                inner = data[ihl + 8:]
                iihl = (inner[0] & 0x0F) * 4
                qid, qseq = struct.unpack("!HH", inner[iihl + 4: iihl + 8])
                if qid == ident and qseq == seq:
                    return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "refused", peer,
                                       _now() - t0, icmperr.from_icmp(data, ihl, peer))
    finally:
        sock.close()


def icmp6_echo(ns: str, src: str, dst: str, ident: int, seq: int, timeout: float,
               size: int | None = None) -> ProbeResult:
    """An ICMPv6 echo request from a raw ICMPv6 socket (the kernel fills the checksum, with
    its pseudo-header); a raw IPv6 socket reads from the ICMPv6 header on."""
    sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        _df(sock)
        body = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, seq) + _payload(size, 8, 40)
        t0 = _now()
        try:
            sock.sendto(body, (dst, 0))
        except OSError as exc:   # EMSGSIZE: larger than the path MTU known here
            return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "error", detail=_too_long(sock, dst, exc))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "timeout")
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                continue
            data, addr = sock.recvfrom(2048)
            peer = addr[0].split("%", 1)[0]
            if len(data) < 8:
                continue
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if typ == ICMPV6_ECHO_REPLY and rid == ident and rseq == seq:
                return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "answered", peer, _now() - t0)
            if typ in icmperr.V6_ERRORS and len(data) >= 8 + 40 + 8:
                # An ICMPv6 error quoting our echo (its IPv6 header, then the echo header).
                inner = data[8:]
                qtype = inner[40]
                qid, qseq = struct.unpack("!HH", inner[44:48])
                if inner[6] == socket.IPPROTO_ICMPV6 and qtype == ICMPV6_ECHO_REQUEST and qid == ident and qseq == seq:
                    return ProbeResult(seq, "icmp", src, dst, ident, seq, t0, "refused", peer,
                                       _now() - t0, icmperr.from_icmp6(data, peer))
    finally:
        sock.close()


def tcp_syn(ns: str, src: str, dst: str, port: int, seq: int, timeout: float,
            sport: int = 0) -> ProbeResult:
    v6 = is_v6(dst)
    sock = netns.socket_in(ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
        # Reset instead of FIN on close: one packet, no TIME_WAIT left in the pod.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        icmperr.enable(sock)   # the ICMP error that fails the connect, by type and code
        sock.bind(("::" if v6 else "0.0.0.0", sport))
        sport = sock.getsockname()[1]
        sock.setblocking(False)
        t0 = _now()
        rc = sock.connect_ex((dst, port))
        if rc not in (0, errno.EINPROGRESS):
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "error", detail=os.strerror(rc))
        _, w, _ = select.select([], [sock], [], timeout)
        if not w:
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "timeout")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        rtt = _now() - t0
        if err == 0:
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "answered", dst, rtt)
        icmp = icmperr.read_queue(sock)   # an ICMP error (a REJECT's port unreachable too), not a RST
        if icmp or err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "refused", None, rtt, icmp or os.strerror(err))
        if err == errno.ECONNREFUSED:
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "refused", dst, rtt, "connection refused (RST)")
        if err == errno.ETIMEDOUT:
            return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "timeout")
        return ProbeResult(seq, "tcp", src, dst, sport, port, t0, "error", detail=os.strerror(err))
    finally:
        sock.close()


def udp_datagram(ns: str, src: str, dst: str, port: int, seq: int, timeout: float,
                 size: int | None = None, sport: int = 0) -> ProbeResult:
    # A connected socket: its datagrams get distinct IP IDs (the tracer tells probes apart
    # by them; an unconnected socket with DF sends ID 0) and an ICMP port unreachable comes
    # back as ECONNREFUSED. A reply from the wrong address (a backend instead of the VIP) is
    # not accepted by it; the trace shows that reply arriving instead.
    v6 = is_v6(dst)
    sock = netns.socket_in(ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _df(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        icmperr.enable(sock)   # every ICMP error, by type and code, not only port unreachable
        sock.bind(("::" if v6 else "0.0.0.0", sport))
        sport = sock.getsockname()[1]
        t0 = _now()
        try:
            sock.connect((dst, port))
            sock.send(_v6_tag(seq) + _payload(size, 16, 40) if v6 else _payload(size, 8))
        except OSError as exc:   # EMSGSIZE: larger than the route MTU known to the pod
            return ProbeResult(seq, "udp", src, dst, sport, port, t0, "error",
                               detail=_too_long(sock, dst, exc) if v6 else exc.strerror)
        r, _, _ = select.select([sock], [], [], timeout)
        if not r:
            return ProbeResult(seq, "udp", src, dst, sport, port, t0, "timeout")
        try:
            data = sock.recv(2048)
        except ConnectionRefusedError:
            return ProbeResult(seq, "udp", src, dst, sport, port, t0, "refused", None, _now() - t0,
                               icmperr.read_queue(sock) or "ICMP port unreachable")
        except OSError as exc:
            return ProbeResult(seq, "udp", src, dst, sport, port, t0, "refused", None, _now() - t0,
                               icmperr.read_queue(sock) or f"ICMP error: {exc.strerror}")
        return ProbeResult(seq, "udp", src, dst, sport, port, t0, "answered", dst, _now() - t0,
                           data.decode(errors="replace").strip() or None)
    finally:
        sock.close()


def send(ns: str, src: str, dst: str, proto: str, port: int | None, count: int,
         timeout: float = 1.0, interval: float = 0.05, on_result=None,
         size: int | None = None, sport: int | None = None, stop=None) -> list[ProbeResult]:
    """Send `count` probes one after the other; each waits for its answer or its timeout.
    `sport` pins the source port of TCP/UDP probes (to hit one conntrack entry). `stop` (a
    threading.Event): once set, no further probe is sent (the one in flight ends first)."""
    results = []
    ident = random.randint(1, 0xFFFE)
    for i in range(1, count + 1):
        if stop is not None and stop.is_set():
            break
        if proto == "icmp":
            r = icmp_echo(ns, src, dst, ident, i, timeout, size)
        elif proto == "tcp":
            r = tcp_syn(ns, src, dst, port, i, timeout, sport or 0)
        else:
            r = udp_datagram(ns, src, dst, port, i, timeout, size, sport or 0)
        results.append(r)
        if on_result:
            on_result(r)
        testhooks.pause("probing")
        if i < count:
            if stop is not None:
                stop.wait(interval)
            else:
                time.sleep(interval)
    return results
