"""ICMPv6 errors named as ICMP errors are: by type and code, a packet too big with its MTU,
read from a raw ICMPv6 socket's message or from an IPV6_RECVERR control message."""

from __future__ import annotations

import socket
import struct

import pytest

from tracer.node import icmperr, prober


@pytest.mark.parametrize("typ,code,mtu,said", [
    (1, 0, None, "network unreachable (ICMPv6 1/0) from fd00::1"),
    (1, 1, None, "administratively prohibited (ICMPv6 1/1) from fd00::1"),
    (1, 3, None, "host unreachable (ICMPv6 1/3) from fd00::1"),
    (1, 4, None, "port unreachable (ICMPv6 1/4) from fd00::1"),
    (1, 6, None, "reject route to destination (ICMPv6 1/6) from fd00::1"),
    (2, 0, 1280, "packet too big (ICMPv6 2/0, MTU 1280) from fd00::1"),
    (3, 0, None, "time exceeded (ICMPv6 3/0) from fd00::1"),
    (4, 1, None, "parameter problem (ICMPv6 4/1) from fd00::1"),
    (1, 9, None, "destination unreachable (ICMPv6 1/9) from fd00::1"),
])
def test_icmpv6_errors_are_named(typ, code, mtu, said):
    assert icmperr.describe(typ, code, "fd00::1", mtu, v6=True) == said


def test_ipv4_names_are_unchanged():
    assert icmperr.describe(3, 4, "10.0.0.1", 1400) == "fragmentation needed (ICMP 3/4, MTU 1400) from 10.0.0.1"
    assert icmperr.describe(3, 13, None) == "administratively prohibited (ICMP 3/13)"


def test_packet_too_big_read_on_a_raw_socket():
    msg = struct.pack("!BBHI", 2, 0, 0, 1400) + bytes(48)
    assert icmperr.from_icmp6(msg, "fd00::9") == "packet too big (ICMPv6 2/0, MTU 1400) from fd00::9"


def test_recverr_of_an_ipv6_socket():
    ee = struct.pack("=IBBBBII", 90, icmperr.SO_EE_ORIGIN_ICMP6, 2, 0, 0, 1280, 0)
    sin6 = struct.pack("=HHI", socket.AF_INET6, 0, 0) + socket.inet_pton(socket.AF_INET6, "fd00:6e::1") + bytes(4)
    assert icmperr.parse_ee(ee + sin6) == (2, 0, 1280, "fd00:6e::1")
    local = struct.pack("=IBBBBII", 90, 1, 0, 0, 0, 1280, 0)      # SO_EE_ORIGIN_LOCAL
    assert icmperr.parse_ee(local + sin6) is None


def test_ipv6_probe_payloads():
    assert len(prober._payload(1400, 8, 40)) == 1400 - 48
    a, b = prober._v6_tag(1), prober._v6_tag(2)
    assert len(a) == 8 and a[:2] == b"pt" and a[2:4] != b[2:4]
