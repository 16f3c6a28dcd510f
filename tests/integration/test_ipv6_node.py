"""IPv6 probes and node facts on real namespaces: a client, a router and a server joined by
veth pairs with IPv6 addresses only, the router's link to the server at MTU 1280. ICMPv6
echo is answered, TCP answered and refused, UDP answered and port-unreachable, a probe
larger than the path MTU gets "packet too big" with the MTU (then EMSGSIZE with the path
MTU the kernel learnt), and the node facts read IPv6 routes, NDP neighbours, forwarding
sysctls and ip6tables counters. Everything is removed afterwards, even on failure."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading

import pytest

from tracer.node import facts, netns, pods, prober, sourcefacts

P = f"v6n{os.getpid() % 10000}"
C, R, S = f"{P}-c", f"{P}-r", f"{P}-s"
C_IP, R_C, R_S, S_IP, S_IP2 = "fd00:6e::2", "fd00:6e::1", "fd00:6f::1", "fd00:6f::2", "fd00:6f::3"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def _down() -> None:
    for ns in (C, R, S):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def net():
    _down()
    try:
        for ns in (C, R, S):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for k in ("net.ipv6.icmp.ratelimit=0", "net.ipv6.conf.all.accept_dad=0",
                      "net.ipv6.conf.default.accept_dad=0"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", k)
        sh("ip", "link", "add", "c0", "netns", C, "type", "veth", "peer", "name", "r0", "netns", R)
        sh("ip", "link", "add", "r1", "netns", R, "type", "veth", "peer", "name", "s0", "netns", S)
        for ns, dev, addr, mtu in ((C, "c0", C_IP, 1500), (R, "r0", R_C, 1500), (R, "r1", R_S, 1280),
                                   (S, "s0", S_IP, 1280)):
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
            sh("ip", "-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        sh("ip", "-n", S, "-6", "addr", "add", f"{S_IP2}/64", "dev", "s0", "nodad")
        sh("ip", "netns", "exec", R, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh("ip", "-n", C, "-6", "route", "add", "default", "via", R_C, "dev", "c0")
        sh("ip", "-n", S, "-6", "route", "add", "default", "via", R_S, "dev", "s0")
        # the server: a TCP listener on 8080 (8081 refused with a RST) and a UDP echo on 9000
        tcp = netns.socket_in(S, socket.AF_INET6, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("::", 8080))
        tcp.listen(16)
        udps = []
        for addr in (S_IP, S_IP2):   # one socket per address: a reply leaves from the address asked
            u = netns.socket_in(S, socket.AF_INET6, socket.SOCK_DGRAM)
            u.bind((addr, 9000))
            udps.append(u)
        stop = threading.Event()

        def serve_udp():
            while not stop.is_set():
                ready, _, _ = select.select(udps, [], [], 0.2)
                for u in ready:
                    try:
                        _, peer = u.recvfrom(4096)
                        u.sendto(b"server\n", peer)
                    except OSError:
                        continue

        t = threading.Thread(target=serve_udp, daemon=True)
        t.start()
        # ready: the client reaches the server's address through the router (NDP resolved)
        r = prober.icmp_echo(C, C_IP, S_IP, 4242, 1, 5.0)
        assert r.outcome == "answered", r
        yield
        stop.set()
        t.join(2)
        tcp.close()
        for u in udps:
            u.close()
    finally:
        _down()


def test_icmpv6_echo_is_answered(net):
    rs = prober.send(C, C_IP, S_IP, "icmp", None, 2, timeout=2.0)
    assert [r.outcome for r in rs] == ["answered", "answered"], rs
    assert rs[0].reply_from == S_IP and rs[0].rtt_ns > 0


def test_tcp_over_ipv6_answered_and_refused(net):
    ok = prober.tcp_syn(C, C_IP, S_IP, 8080, 1, 2.0)
    assert ok.outcome == "answered" and ok.reply_from == S_IP, ok
    no = prober.tcp_syn(C, C_IP, S_IP, 8081, 2, 2.0)
    assert no.outcome == "refused" and no.detail == "connection refused (RST)", no


def test_udp_over_ipv6_answered_and_port_unreachable(net):
    ok = prober.udp_datagram(C, C_IP, S_IP, 9000, 1, 2.0)
    assert ok.outcome == "answered" and ok.detail == "server", ok
    no = prober.udp_datagram(C, C_IP, S_IP, 9001, 2, 2.0)
    assert no.outcome == "refused", no
    assert no.detail == f"port unreachable (ICMPv6 1/4) from {S_IP}", no


def test_tcp_to_an_unrouted_address_is_refused_by_the_router(net):
    sh("ip", "-n", R, "-6", "route", "add", "unreachable", "fd00:70::/64")
    try:
        r = prober.tcp_syn(C, C_IP, "fd00:70::5", 80, 1, 2.0)
        assert r.outcome == "refused" and "ICMPv6 1/0" in (r.detail or "") and R_C in r.detail, r
    finally:
        sh("ip", "-n", R, "-6", "route", "del", "unreachable", "fd00:70::/64")


def test_size_above_the_path_mtu_is_packet_too_big(net):
    first = prober.icmp_echo(C, C_IP, S_IP, 4343, 1, 2.0, size=1400)
    assert first.outcome == "refused", first
    assert first.detail == f"packet too big (ICMPv6 2/0, MTU 1280) from {R_C}", first
    again = prober.icmp_echo(C, C_IP, S_IP, 4343, 2, 2.0, size=1400)   # the path MTU is known now
    assert again.outcome == "error" and "path MTU 1280" in again.detail, again
    fits = prober.icmp_echo(C, C_IP, S_IP, 4343, 3, 2.0, size=1280)
    assert fits.outcome == "answered", fits
    udp = prober.udp_datagram(C, C_IP, S_IP2, 9000, 1, 2.0, size=1400)   # a destination of its own
    assert udp.outcome == "refused", udp
    assert udp.detail == f"packet too big (ICMPv6 2/0, MTU 1280) from {R_C}", udp
    small = prober.udp_datagram(C, C_IP, S_IP2, 9000, 2, 2.0, size=1200)
    assert small.outcome == "answered", small


def test_ipv6_node_facts(net):
    node = facts.NodeRef("router", R)
    f = facts.facts(node, src=C_IP, dst=S_IP, iif="r0", devs=["r0", "r1"])
    assert f["family"] == 6 and f["ip_forward"] == 1 and f["forwarding"] == {"r0": 1, "r1": 1}
    assert f["rp_filter"] == {} and f["sysctl_names"]["ip_forward"] == "net.ipv6.conf.all.forwarding"
    assert f["route"].get("dev") == "r1" and not f["route"].get("error"), f["route"]
    assert f["route_back"].get("dev") == "r0", f["route_back"]
    assert f["mtu"] == {"r0": 1500, "r1": 1280} and f["mtu6"] == {"r0": 1500, "r1": 1280}
    nh = f["next_hop"]
    assert nh["ip"] == S_IP and nh["dev"] == "r1" and nh["neigh"]["lladdr"], nh   # an NDP entry
    sh("ip", "netns", "exec", R, "sysctl", "-qw", "net.ipv6.conf.r1.forwarding=0")
    try:
        off = facts.facts(node, src=C_IP, dst=S_IP, iif="r0", devs=["r0", "r1"])
        assert off["forwarding"]["r1"] == 0
    finally:
        sh("ip", "netns", "exec", R, "sysctl", "-qw", "net.ipv6.conf.r1.forwarding=1")


def test_ip6tables_drops_are_counted(net):
    node = facts.NodeRef("router", R)
    sh("ip", "netns", "exec", R, "ip6tables", "-A", "FORWARD", "-d", S_IP2, "-p", "icmpv6",
       "--icmpv6-type", "echo-request", "-j", "DROP")
    try:
        before = facts.iptables_counters(node)
        r = prober.icmp_echo(C, C_IP, S_IP2, 4444, 1, 0.5)
        assert r.outcome == "timeout", r
        hits = facts.rule_hits(before, facts.iptables_counters(node))
        six = [h for h in hits if h["table"] == "ip6 filter"]
        assert six and six[0]["chain"] == "FORWARD" and six[0]["target"] == "DROP" and six[0]["packets"] >= 1, hits
    finally:
        sh("ip", "netns", "exec", R, "ip6tables", "-F", "FORWARD")


def test_pod_side_ipv6_facts(net):
    src = sourcefacts.read(C, S_IP)
    assert src["route"]["dev"] == "c0" and src["route"]["gateway"] == R_C, src["route"]
    assert src["next_hop"]["ip"] == R_C and src["next_hop"]["neigh"]["lladdr"], src["next_hop"]
    with netns.entered(C):
        text = open("/proc/thread-self/net/if_inet6").read()
    assert C_IP in pods.parse_if_inet6(text)
    assert not any(a.startswith("fe80") for a in pods.parse_if_inet6(text))


def test_nft_inet_drops_of_ipv6_are_counted(net):
    node = facts.NodeRef("router", R)
    sh("ip", "netns", "exec", R, "nft", "add table inet v6ntest; "
       "add chain inet v6ntest v6nfwd { type filter hook forward priority 0; policy accept; }; "
       f"add rule inet v6ntest v6nfwd ip6 daddr {S_IP2} meta l4proto ipv6-icmp counter drop")
    try:
        before = facts.iptables_counters(node)
        r = prober.icmp_echo(C, C_IP, S_IP2, 4545, 1, 0.5)
        assert r.outcome == "timeout", r
        hits = facts.rule_hits(before, facts.iptables_counters(node))
        inet = [h for h in hits if h["table"] == "inet v6ntest"]
        assert inet and inet[0]["target"] == "DROP" and inet[0]["packets"] >= 1, hits
        assert inet[0]["addrs"] == {"daddr": [S_IP2]}, inet[0]
    finally:
        sh("ip", "netns", "exec", R, "nft", "delete table inet v6ntest")
