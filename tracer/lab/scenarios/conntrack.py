"""The conntrack-table scenarios: a full table, INVALID drops, a stale UDP entry.

The table is filled and the filler flushed over ctnetlink from a socket opened inside the
node's namespace; the stale entry is made with conntrack(8) there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import time
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab.scenarios import changes as C
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab, Node
from tracer.node import netns

# stale-udp-conntrack: the client's fixed source port and the vanished backend's host part.
STALE_SPORT = 40000
STALE_HOST = 99
# conntrack-full: a conntrack mark that only the filler entries carry, so `fix` removes them
# and nothing else with one filtered flush.
CT_FILL_MARK = 0x50540001
CT_FILL_TIMEOUT = 7 * 24 * 3600
CT_FILL_LIMIT = 2_000_000  # beyond this the fill would take too long and too much memory
# ctnetlink (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
_NETLINK_NETFILTER = 12
_CT_NEW = (1 << 8) | 0      # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
_CT_DELETE = (1 << 8) | 2   # IPCTNL_MSG_CT_DELETE
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_TIMEOUT, _CTA_MARK = 1, 2, 3, 7, 8
_CTA_MARK_MASK = 21
_IPS_SEEN_REPLY, _IPS_ASSURED, _IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3


def conntrack_full(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    count = int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    limit = int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_max"))
    need = limit - count
    if need > CT_FILL_LIMIT:
        raise EnvironmentProblem(
            f"nf_conntrack_max is {limit}: filling {node}'s table would need {need} entries "
            f"(~{need * _ct_object_size() >> 20} MiB, tens of seconds)",
            "conntrack-full is only offered where nf_conntrack_max is at most "
            f"{CT_FILL_LIMIT}; the global value is not changed for a lab")
    started = time.monotonic()
    # Registered before the fill: if it fails part-way, the flush removes whatever was made.
    ch.undo.append({"op": "ct-flush-mark", "ns": n.netns, "mark": CT_FILL_MARK})
    # No slot may free up while broken: entries of earlier traffic that would expire (or that
    # the kernel would evict for new flows) would let flows after the break through. Those the
    # kernel may evict from a full table (not ASSURED, or TCP closing: its garbage collector
    # evicts those after the first refused flow) go now and the fill takes their place; the
    # other short-lived ones live as long as the filler until `fix` gives them back their time.
    dropped, pinned = _pin_others(n)
    ch.undo.append({"op": "ct-timeouts", "ns": n.netns, "entries": pinned})
    if dropped or pinned:
        ch.lines.append(f"{node}: {dropped} entries of earlier traffic the kernel could evict from a "
                        "full table (not ASSURED, or TCP closing) deleted, "
                        f"{len(pinned)} short-lived ASSURED ones kept alive while broken")
    made = used = 0
    for _ in range(5):
        # Entries of the node's own traffic may expire while the table fills: top it up.
        need = limit - int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
        if need <= 0:
            break
        made += _ct_fill(n, need, start=used)
        used += need
    elapsed = time.monotonic() - started
    ch.lines.append(f"{node}: {made} ASSURED UDP conntrack entries (mark {CT_FILL_MARK:#x}) fill "
                    f"the table to nf_conntrack_max={limit} in {elapsed:.1f} s, "
                    f"~{made * _ct_object_size() >> 20} MiB of kernel memory")
    now = int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    if now < limit:
        raise EnvironmentProblem(f"the conntrack table of {node} holds {now} of {limit} entries "
                                 f"after the fill", "run `podtrace lab fix conntrack-full`")


def conntrack_invalid(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    notrack = (f"PREROUTING -s {n.pod_cidr} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
               "-j CT --notrack")
    invalid = "FORWARD -m conntrack --ctstate INVALID -j DROP"
    ch.iptables_restore(n.netns, f"*raw\n-A {notrack}\nCOMMIT\n", f"*raw\n-D {notrack}\nCOMMIT\n",
                        f"{node}: raw PREROUTING: TCP SYNs from {n.pod_cidr} are NOTRACKed, so "
                        "their SYN-ACKs find no connection")
    ch.iptables_restore(n.netns, f"*filter\n-I {invalid.replace('FORWARD', 'FORWARD 1', 1)}\nCOMMIT\n",
                        f"*filter\n-D {invalid}\nCOMMIT\n",
                        f"{node}: filter FORWARD rule 1: -m conntrack --ctstate INVALID -j DROP")


def stale_udp_conntrack(ch: Changes, lab: Lab, node: str) -> None:
    n = lab.node(node)
    client = lab.pods_on(node)[0]
    svc = lab.web()
    port = lab.web_port("UDP")
    stale = stale_backend(lab)
    tuple_ = ["-p", "udp", "-s", client.ip, "-d", svc["cluster_ip"],
              "--sport", str(STALE_SPORT), "--dport", str(port["port"])]
    if (C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count")
            == C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_max")):
        raise EnvironmentProblem(f"the conntrack table of {node} is full: no room for the stale entry",
                                 "fix conntrack-full first: podtrace lab fix conntrack-full")
    existing = C.run_cmd(["ip", "netns", "exec", n.netns, "conntrack", "-L", *tuple_], ok=["0 flow entries"])
    if existing.strip():
        raise EnvironmentProblem(f"{node} already has a conntrack entry for {client.ip}:{STALE_SPORT} "
                                 f"-> {svc['cluster_ip']}:{port['port']}/udp",
                                 f"delete it: ip netns exec {n.netns} conntrack -D {' '.join(tuple_)}")
    ch.run(["ip", "netns", "exec", n.netns, "conntrack", "-I", *tuple_,
            "--dst-nat", f"{stale}:{port['target_port']}", "-t", "86400", "-u", "SEEN_REPLY,ASSURED"],
           f"{node}: conntrack entry udp {client.ip}:{STALE_SPORT} -> {svc['cluster_ip']}:"
           f"{port['port']} DNATed to {stale}:{port['target_port']} (no such pod), ASSURED, "
           "timeout 86400 s",
           ["ip", "netns", "exec", n.netns, "conntrack", "-D", *tuple_, "-r", stale],
           undo_ok=["0 flow entries"])


def stale_backend(lab: Lab) -> str:
    """An address in the pod CIDR of web's backend node that no pod has."""
    backend_node = lab.node(lab.pod(lab.web()["backends"][0].split("/", 1)[1]).node)
    net = ipaddress.ip_network(backend_node.pod_cidr)
    return str(net.network_address + STALE_HOST)


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _nla(kind | 0x8000, b"".join(parts))


def _ct_tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return _nest(kind,
                 _nest(1, _nla(1, src), _nla(2, dst)),
                 _nest(2, _nla(1, bytes([socket.IPPROTO_UDP])), _nla(2, struct.pack("!H", sport)),
                       _nla(3, struct.pack("!H", dport))))


def _nlmsg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    payload = struct.pack("=BBH", socket.AF_INET, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _ct_socket(ns: str) -> socket.socket:
    sock = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock


def _ct_fill(n: Node, count: int, start: int = 0) -> int:
    """Insert `count` ASSURED UDP entries into the node's own conntrack table, like the
    flows of DNS queries from many clients to the node's address: pod-CIDR source addresses
    no pod has (.100 and up), source ports 1024-64999, destination the node's cni0 address
    port 53. ASSURED UDP entries are never evicted, so the table stays full. Messages go
    in large batches without acks; returns how many entries the table gained."""
    net = ipaddress.ip_network(n.pod_cidr)
    gateway = (net.network_address + 1).packed
    per_ip = 64000
    if start + count > per_ip * 150:
        raise EnvironmentProblem(f"cannot make {count} distinct conntrack entries on {n.name}")
    tail = (_nla(_CTA_STATUS, struct.pack("!I", _IPS_SEEN_REPLY | _IPS_ASSURED | _IPS_CONFIRMED))
            + _nla(_CTA_TIMEOUT, struct.pack("!I", CT_FILL_TIMEOUT))
            + _nla(_CTA_MARK, struct.pack("!I", CT_FILL_MARK)))
    flags = _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_EXCL
    before = int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count"))
    sock = _ct_socket(n.netns)
    try:
        batch: list[bytes] = []
        size = 0
        for k in range(start, start + count):
            src = (net.network_address + 100 + k // per_ip).packed
            sport = 1024 + k % per_ip
            msg = _nlmsg(_CT_NEW, flags, k + 1,
                         _ct_tuple(_CTA_TUPLE_ORIG, src, gateway, sport, 53)
                         + _ct_tuple(_CTA_TUPLE_REPLY, gateway, src, 53, sport) + tail)
            batch.append(msg)
            size += len(msg)
            if size > 60000:
                sock.sendall(b"".join(batch))
                batch, size = [], 0
        if batch:
            sock.sendall(b"".join(batch))
    finally:
        sock.close()  # unread error replies (a racing flow took the last slots) go with it
    return int(C.read_sysctl(n.netns, "net/netfilter/nf_conntrack_count")) - before


_CT_GET = (1 << 8) | 1        # IPCTNL_MSG_CT_GET
_NLM_F_DUMP, _NLMSG_DONE = 0x300, 3
PIN_BELOW = 24 * 3600        # entries with less time left than this are kept alive while full


def _attrs(data: bytes, offset: int, end: int):
    while offset + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return
        yield kind & 0x7FFF, data[offset:offset + size]
        offset += (size + 3) & ~3


# TCP states (enum tcp_conntrack) of a closing connection: once an allocation has failed for a
# full table, the kernel's conntrack garbage collector evicts these even when ASSURED
# (nf_conntrack_proto_tcp.c, tcp_can_early_drop), as it does entries that are not ASSURED.
_CTA_PROTOINFO, _CTA_PROTOINFO_TCP, _CTA_PROTOINFO_TCP_STATE = 4, 1, 1
TCP_CLOSING_STATES = {4: "FIN_WAIT", 5: "CLOSE_WAIT", 6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE"}


def _tcp_state(raw: bytes) -> int | None:
    """The TCP state in a CTA_PROTOINFO attribute (header included), None if it has none."""
    for kind, tcp in _attrs(raw, 4, len(raw)):
        if kind == _CTA_PROTOINFO_TCP:
            for skind, value in _attrs(tcp, 4, len(tcp)):
                if skind == _CTA_PROTOINFO_TCP_STATE and len(value) > 4:
                    return value[4]
    return None


def _dump(ns: str) -> list[tuple[bytes, int, int, int, int | None]]:
    """Every entry of the table: (its original tuple attribute as sent, status, timeout, mark,
    TCP state or None)."""
    sock = _ct_socket(ns)
    out = []
    try:
        sock.settimeout(30)
        sock.sendall(_nlmsg(_CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, 1, b""))
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, offset)
                if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    return out
                orig, status, timeout, mark, state = b"", 0, 0, 0, None
                for akind, raw in _attrs(data, offset + 20, offset + size):
                    if akind == _CTA_TUPLE_ORIG:
                        orig = raw
                    elif akind == _CTA_PROTOINFO:
                        state = _tcp_state(raw)
                    elif akind in (_CTA_STATUS, _CTA_TIMEOUT, _CTA_MARK):
                        value = struct.unpack_from("!I", raw, 4)[0]
                        status = value if akind == _CTA_STATUS else status
                        timeout = value if akind == _CTA_TIMEOUT else timeout
                        mark = value if akind == _CTA_MARK else mark
                if orig:
                    out.append((orig, status, timeout, mark, state))
                offset += (size + 3) & ~3
    finally:
        sock.close()


def _send_each(ns: str, kind: int, bodies: list[bytes]) -> None:
    """One request per body, acked; a vanished entry (ENOENT) is not an error."""
    if not bodies:
        return
    sock = _ct_socket(ns)
    try:
        sock.settimeout(30)
        for seq, body in enumerate(bodies, 1):
            sock.sendall(_nlmsg(kind, _NLM_F_REQUEST | _NLM_F_ACK, seq, body))
            while True:
                data = sock.recv(65536)
                _, mkind, _, mseq, _ = struct.unpack_from("=IHHII", data)
                if mkind == _NLMSG_ERROR and mseq == seq:
                    err = struct.unpack_from("=i", data, 16)[0]
                    if err not in (0, -2):
                        raise EnvironmentProblem(f"conntrack update in {ns} failed: {os.strerror(-err)}")
                    break
    finally:
        sock.close()


def _evictable(status: int, tcp_state: int | None) -> bool:
    """Whether the kernel may evict the entry to make room in a full table: not ASSURED, or a
    closing TCP connection."""
    return not status & _IPS_ASSURED or tcp_state in TCP_CLOSING_STATES


def _pin_others(n: Node) -> tuple[int, list[list]]:
    """Delete the node's entries the kernel could evict from a full table (fill marks aside)
    and give the other ones with less than a day left the filler's timeout; returns (deleted,
    [[tuple hex, timeout they had]])."""
    entries = [e for e in _dump(n.netns) if e[3] != CT_FILL_MARK]
    loose = [orig for orig, status, _, _, state in entries if _evictable(status, state)]
    short = [(orig, timeout) for orig, status, timeout, _, state in entries
             if not _evictable(status, state) and timeout < PIN_BELOW]
    _send_each(n.netns, _CT_DELETE, loose)
    _send_each(n.netns, _CT_NEW, [orig + _nla(_CTA_TIMEOUT, struct.pack("!I", CT_FILL_TIMEOUT))
                                  for orig, _ in short])
    return len(loose), [[orig.hex(), timeout] for orig, timeout in short]


def unpin(ns: str, entries: list[list]) -> int:
    """Give the entries `conntrack-full` kept alive the time they had left (at least 10 s);
    returns how many were still there to update."""
    bodies = [bytes.fromhex(orig) + _nla(_CTA_TIMEOUT, struct.pack("!I", max(10, int(timeout))))
              for orig, timeout in entries]
    _send_each(ns, _CT_NEW, bodies)
    return len(bodies)


def flush_mark(ns: str, mark: int) -> None:
    """Delete every conntrack entry of `ns` carrying `mark` (one filtered flush)."""
    sock = _ct_socket(ns)
    try:
        sock.settimeout(30)
        body = _nla(_CTA_MARK, struct.pack("!I", mark)) + _nla(_CTA_MARK_MASK, struct.pack("!I", 0xFFFFFFFF))
        sock.sendall(_nlmsg(_CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, 1, body))
        while True:
            data = sock.recv(65536)
            _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
            if kind == _NLMSG_ERROR and seq == 1:
                err = struct.unpack_from("=i", data, 16)[0]
                if err not in (0, -2):  # -ENOENT: nothing carried the mark
                    raise EnvironmentProblem(f"conntrack flush in {ns} failed: {os.strerror(-err)}")
                return
    finally:
        sock.close()


def _ct_object_size() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/slabinfo").read_text().splitlines():
            if line.startswith("nf_conntrack "):
                return int(line.split()[3])
    return 256
