"""The kernel side with IPv6, on two namespaces joined by a veth pair (no lab): ICMPv6 echo,
TCP SYN and UDP over IPv6, an IPv6 packet with extension headers parsed to its L4 header,
fragments, IPv6 inside VXLAN over an IPv4 underlay and over an IPv6 underlay, conntrack
tuples of IPv6 connections, crafted hostile IPv6 headers (never reported), and an IPv4 flow
decoded exactly as before."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys

import pytest

from tests.integration.lab_fixture import drain_all, wait_until
from tracer import addrs
from tracer.kernel import contract, hooks
from tracer.kernel.record import FLAG_CT_V6, FLAG_OUTER_V6, FLAG_V6
from tracer.kernel.session import SessionConfig, TraceSession

NS_A, NS_B = "v6ka", "v6kb"
A6, B6 = "fd00:6b::1", "fd00:6b::2"             # on the veth pair
A4, B4 = "10.66.0.1", "10.66.0.2"
A6X, B6X = "fd00:6c::1", "fd00:6c::2"           # VXLAN (VNI 42) over the IPv4 underlay
A6Y, B6Y = "fd00:6d::1", "fd00:6d::2"           # VXLAN (VNI 43) over the IPv6 underlay
TRACED = [A6, B6, A4, B4, A6X, B6X, A6Y, B6Y]


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True, timeout=30)


def _teardown() -> None:
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def pair():
    _teardown()
    try:
        for ns in (NS_A, NS_B):
            sh("ip", "netns", "add", ns)
            sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "v6ka0", "netns", NS_A, "type", "veth", "peer", "name", "v6kb0", "netns", NS_B)
        for ns, dev, a6, a4, me, peer, me6, peer6 in (
                (NS_A, "v6ka0", A6, A4, A4, B4, A6, B6), (NS_B, "v6kb0", B6, B4, B4, A4, B6, A6)):
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
            sh("ip", "addr", "add", f"{a4}/24", "dev", dev, ns=ns)
            x6 = A6X if ns == NS_A else B6X
            y6 = A6Y if ns == NS_A else B6Y
            sh("ip", "link", "add", "vx4", "type", "vxlan", "id", "42", "local", me, "remote", peer,
               "dstport", "4789", "dev", dev, ns=ns)
            sh("ip", "link", "add", "vx6", "type", "vxlan", "id", "43", "local", me6, "remote", peer6,
               "dstport", "4789", "dev", dev, ns=ns)
            sh("ip", "link", "set", "vx4", "up", ns=ns)
            sh("ip", "link", "set", "vx6", "up", ns=ns)
            sh("ip", "addr", "add", f"{x6}/64", "dev", "vx4", "nodad", ns=ns)
            sh("ip", "addr", "add", f"{y6}/64", "dev", "vx6", "nodad", ns=ns)
        # conntrack in B for IPv6 (the match makes every packet tracked)
        sh("ip6tables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED,RELATED", "-j", "ACCEPT", ns=NS_B)
        sh("ip6tables", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED,RELATED", "-j", "ACCEPT", ns=NS_B)
        for dst in (B6, B6X, B6Y):   # neighbours resolved before tracing (readiness, not sleep)
            assert wait_until(lambda d=dst: sh("ping", "-6", "-c1", "-W1", d, ns=NS_A, check=False).returncode == 0, 10), dst
        assert sh("ping", "-4", "-c1", "-W1", B4, ns=NS_A, check=False).returncode == 0
        macs = {ns: json.loads(sh("ip", "-j", "link", "show", dev, ns=ns).stdout)[0]["address"]
                for ns, dev in ((NS_A, "v6ka0"), (NS_B, "v6kb0"))}
        s = TraceSession(SessionConfig(addrs=TRACED, budget=0,
                                       hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS]))
        s.start()
        try:
            yield s, macs
        finally:
            s.close()
    finally:
        _teardown()


def _run(session, *cmd, ns=NS_A):
    sh(*cmd, ns=ns, check=False)
    drain_all(session)
    return session.frame()


def _py(code: str, ns: str = NS_A) -> None:
    r = sh(sys.executable, "-c", code, ns=ns, check=False)
    assert r.returncode == 0, r.stderr


def test_icmpv6_echo_both_ways_with_conntrack(pair):
    s, _ = pair
    df = _run(s, "ping", "-6", "-c1", "-W2", "-p", "ab", "-s", "56", B6)
    ev = df[(df["proto"] == 58) & (df["saddr_str"] == A6) & (df["icmp_type"] == 128)]
    assert len(ev), df[["hook_name", "saddr_str", "daddr_str", "proto"]]
    e = ev.iloc[0]
    assert e["daddr_str"] == B6 and e["saddr"] == addrs.key(A6) and e["daddr"] == addrs.key(B6)
    assert e["flags"] & FLAG_V6 and not e["flags"] & FLAG_OUTER_V6
    assert e["ip_len"] == 40 + 64 and e["ip_id"] == 0 and e["ttl"] == 64
    rep = df[(df["proto"] == 58) & (df["saddr_str"] == B6) & (df["icmp_type"] == 129)]
    assert len(rep)
    assert rep.iloc[0]["sport"] == e["sport"] and rep.iloc[0]["dport"] == e["dport"]   # echo id/seq
    # B's reply leaves with B's conntrack entry: IPv6 tuples
    ct = rep[rep["ct_info"] > 0]
    assert len(ct), rep[["hook_name", "ct_info", "flags"]]
    c = ct.iloc[0]
    assert c["flags"] & FLAG_CT_V6
    assert c["ct_orig_src_str"] == A6 and c["ct_orig_dst_str"] == B6
    assert c["ct_reply_src_str"] == B6 and c["ct_reply_dst_str"] == A6
    assert c["ct_orig_src"] == addrs.key(A6)


def test_tcp_syn_and_udp_identity(pair):
    s, _ = pair
    payload = b"podtrace-v6k-udp"
    _py(f"import socket\ns=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        f"s.sendto({payload!r}, ('{B6}', 40001, 0, 0))")
    _py(f"import socket\ns=socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\ns.settimeout(1)\n"
        f"try:\n    s.connect(('{B6}', 40002, 0, 0))\nexcept OSError:\n    pass")
    drain_all(s)
    df = s.frame()
    u = df[(df["proto"] == 17) & (df["dport"] == 40001) & (df["saddr_str"] == A6)]
    assert len(u)
    e = u.iloc[0]
    assert e["ip_len"] == 40 + 8 + len(payload) and e["ip_id"] == 0
    assert e["tcp_seq"] == contract.udp6_payload_hash(payload)
    assert set(u["tcp_seq"]) == {e["tcp_seq"]}                       # the same on every hop
    t = df[(df["proto"] == 6) & (df["dport"] == 40002) & (df["saddr_str"] == A6)]
    assert len(t) and (t["tcp_flags"] & 0x02).all()                    # SYN
    assert t.iloc[0]["ip_len"] >= 40 + 20 and t.iloc[0]["ip_id"] == 0
    rst = df[(df["proto"] == 6) & (df["sport"] == 40002) & (df["saddr_str"] == B6)]
    assert len(rst) and (rst["tcp_flags"] & 0x04).all()                # B's reset


def test_fragments_and_extension_headers(pair):
    s, _ = pair
    # a 3000-byte datagram over a 1500 MTU: fragments with a fragment header; the first
    # carries the UDP header, the others none; all share the identification's low 16 bits
    _py(f"import socket\ns=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'x' * 3000, ('{B6}', 40003, 0, 0))")
    # hop-by-hop options (PadN) before UDP
    _py(f"import socket\ns=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        f"s.setsockopt(socket.IPPROTO_IPV6, 54, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n"
        f"s.sendto(b'hbh', ('{B6}', 40004, 0, 0))")
    drain_all(s)
    df = s.frame()
    v6 = df[(df["saddr_str"] == A6) & (df["daddr_str"] == B6) & (df["proto"] == 17)]
    frags = v6[v6["ip_len"] > 1000]
    first = frags[frags["dport"] == 40003]
    rest = frags[(frags["dport"] == 0) & (frags["sport"] == 0)]
    assert len(first) and len(rest), frags[["hook_name", "ip_len", "ip_id", "sport", "dport"]]
    assert first.iloc[0]["ip_id"] != 0 and set(rest["ip_id"]) == {first.iloc[0]["ip_id"]}
    hbh = v6[v6["dport"] == 40004]
    assert len(hbh) and hbh.iloc[0]["ip_len"] == 40 + 8 + 8 + 3


def test_ipv6_inside_vxlan_over_ipv4_and_over_ipv6(pair):
    s, _ = pair
    df = _run(s, "ping", "-6", "-c1", "-W2", B6X)
    ev = df[(df["saddr_str"] == A6X) & (df["encap"] == 1)]
    assert len(ev), df[["hook_name", "saddr_str", "encap", "outer_saddr_str"]]
    e = ev.iloc[0]
    assert e["vni"] == 42 and e["outer_saddr_str"] == A4 and e["outer_daddr_str"] == B4
    assert e["outer_saddr"] == addrs.key(A4) and e["flags"] & FLAG_V6 and not e["flags"] & FLAG_OUTER_V6
    assert e["proto"] == 58 and e["icmp_type"] == 128
    df = _run(s, "ping", "-6", "-c1", "-W2", B6Y)
    ev = df[(df["saddr_str"] == A6Y) & (df["encap"] == 1)]
    assert len(ev)
    e = ev.iloc[0]
    assert e["vni"] == 43 and e["outer_saddr_str"] == A6 and e["outer_daddr_str"] == B6
    assert e["flags"] & FLAG_V6 and e["flags"] & FLAG_OUTER_V6


def test_ipv4_flow_is_decoded_as_before(pair):
    s, _ = pair
    df = _run(s, "ping", "-4", "-c1", "-W2", B4)
    ev = df[(df["proto"] == 1) & (df["saddr_str"] == A4) & (df["icmp_type"] == 8)]
    assert len(ev)
    e = ev.iloc[0]
    assert e["saddr"] == int(ipaddress.IPv4Address(A4)) and e["daddr"] == int(ipaddress.IPv4Address(B4))
    assert not e["flags"] & (FLAG_V6 | FLAG_OUTER_V6 | FLAG_CT_V6)
    assert e["ip_len"] == 84 and e["flow_lbl"] == 0


# --- hostile IPv6 headers, written raw on A's veth -----------------------------------------

def _ip6(nh: int, payload: bytes, flow: int, plen: int | None = None) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | flow, len(payload) if plen is None else plen, nh, 64,
                       socket.inet_pton(socket.AF_INET6, A6), socket.inet_pton(socket.AF_INET6, B6)) + payload


def _ext(nh: int, n8: int = 0) -> bytes:
    """A destination-options-like header of (n8 + 1) * 8 bytes, PadN filled."""
    body = bytes([1, 4 + 8 * n8]) + bytes(4 + 8 * n8)
    return bytes([nh, n8]) + body


def _udp6(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def test_hostile_extension_headers_are_never_misread(pair):
    s, macs = pair
    good = _udp6(5000, 40005, b"good")
    frames = {
        # more extension headers than the parser's bound: skipped, not guessed
        0x11111: _ip6(60, b"".join(_ext(60) for _ in range(7)) + _ext(17) + good, 0x11111),
        # a header whose length runs past the packet
        0x22222: _ip6(60, bytes([17, 200]) + bytes(6) + good, 0x22222),
        # truncated inside the fixed header's claimed payload / inside an extension header
        0x33333: _ip6(0, bytes([17, 0, 1, 4]), 0x33333),
        # a fragment header loop (fragment after fragment) ending nowhere
        0x44444: _ip6(44, b"".join(bytes([44, 0, 0, 0, 0, 0, 0, 1]) for _ in range(8)), 0x44444),
        # readable: hop-by-hop, destination options, routing (type 0, no segments left), then UDP
        0x55555: _ip6(0, _ext(60) + _ext(43) + bytes([17, 0, 0, 0]) + bytes(4) + good, 0x55555),
        # readable: 160 bytes of headers (a 104-byte option header), within the 256 read at once
        0x66666: _ip6(60, _ext(60, 12) + _ext(17) + good, 0x66666),
        # headers running past the first 256 bytes (a 248-byte option header): skipped, not guessed
        0x77777: _ip6(60, _ext(60, 30) + _ext(17) + good, 0x77777),
    }
    dst = bytes.fromhex(macs[NS_B].replace(":", ""))
    src = bytes.fromhex(macs[NS_A].replace(":", ""))
    blobs = [(dst + src + struct.pack("!H", 0x86DD) + f).hex() for f in frames.values()]
    _py("import socket\ns=socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\ns.bind(('v6ka0', 0))\n"
        f"for h in {blobs!r}:\n    s.send(bytes.fromhex(h))")
    drain_all(s)
    df = s.frame()
    seen = set(df["flow_lbl"])
    for bad in (0x11111, 0x22222, 0x33333, 0x44444, 0x77777):
        assert bad not in seen, df[df["flow_lbl"] == bad][["hook_name", "proto", "sport", "dport"]]
    for label in (0x55555, 0x66666):
        ok = df[df["flow_lbl"] == label]
        assert len(ok), f"the packet labelled {label:#x} (extension headers, then UDP) was not parsed"
        assert set(ok["proto"]) == {17} and set(ok["dport"]) == {40005} and set(ok["sport"]) == {5000}


def _echo_events(s, dst: str, ns: str = NS_A) -> int:
    n = s.sink.count()
    sh("ping", "-6", "-c1", "-W2", dst, ns=ns, check=False)
    drain_all(s)
    new = s.frame().iloc[n:]
    return int(((new["proto"] == 58) & (new["daddr_str"] == dst)).sum())


def test_ipv6_addresses_leave_and_join_the_filter(pair):
    s, _ = pair
    s.set_addrs(remove=[B6])
    try:
        keys = {bytes(k.a) for k in s.loaded.bpf["addrs6"].keys()}
        assert socket.inet_pton(socket.AF_INET6, B6) not in keys
        assert socket.inet_pton(socket.AF_INET6, A6) in keys
        assert _echo_events(s, B6) == 0
    finally:
        s.set_addrs(add=[B6])
    assert _echo_events(s, B6) > 0


def test_ipv6_capture_cidr():
    """An IPv6 CIDR selects (LPM trie `cidrs6`) with no address listed."""
    c, d = "v6kc", "v6kd"   # its own pair: the module's may be up
    gone = lambda: [sh("ip", "netns", "del", ns, check=False) for ns in (c, d)]  # noqa: E731
    gone()
    try:
        for ns in (c, d):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "v6kc0", "netns", c, "type", "veth", "peer", "name", "v6kd0", "netns", d)
        for ns, dev, a6 in ((c, "v6kc0", "fd00:6e::1"), (d, "v6kd0", "fd00:6e::2")):
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
        assert wait_until(lambda: sh("ping", "-6", "-c1", "-W1", "fd00:6e::2", ns=c, check=False).returncode == 0, 10)
        s = TraceSession(SessionConfig(addrs=[], cidrs=["fd00:6e::/64"], match_either=True, budget=0,
                                       hooks=[hooks.BY_NAME[n] for n in hooks.DEFAULT_HOOKS]))
        s.start()
        try:
            assert _echo_events(s, "fd00:6e::2", c) > 0
            df = s.frame()
            assert set(df["saddr_str"].astype(str)) <= {"fd00:6e::1", "fd00:6e::2"}
        finally:
            s.close()
    finally:
        gone()
