"""The numbers bpf/ shares with Python, declared once: the kernel contract.

`c_header()` is prepended to the BPF source by tracer/kernel/program.py (after the event
record of tracer/kernel/record.py), so the C code names these values and never spells them:
tests/unit/test_kernel_contract.py fails on a literal or a `#define` of one of them in bpf/.
Python code imports them from here (or from record.py, which re-exports the record's values).
"""

from __future__ import annotations

import ipaddress

# --- Selection flags: config[CONFIG_SEL] (bpf/podtrace.c `wanted()`). 0: both addresses of
# a packet must be in `addrs` (what `flow` asks).
SEL_EITHER = 1      # one address matching is enough
SEL_ANY_ADDR = 2    # no address condition (every IPv4 packet)
SEL_CIDRS = 4       # an address also matches when inside a CIDR of `cidrs`
SEL_PORTS = 8       # TCP/UDP only, with sport or dport in `ports`

# --- Indexes of the small configuration arrays.
CONFIG_SEL = 0          # config[]: the SEL_* flags
CONFIG_SLOTS = 2
NETNS_FILTER_ON = 0     # netns_cfg[]: 1 = keep events only from namespaces in netns_allow
NETNS_CFG_SLOTS = 1
GUARD_SAMPLE = 0        # guard[]: keep 1 packet in N
GUARD_BUDGET = 1        # guard[]: events per second per CPU (0: no limit)
GUARD_SLOTS = 2

# --- Per-CPU counters, in the order of the `counters` array (C_SEEN = 0, ...).
COUNTER_NAMES = ("seen", "matched", "emitted", "lost", "truncated", "sampled_out", "over_budget")

# --- Hashes. SLOT_MULT spreads addresses and skb pointers over the prefilter slots (and mixes
# the TCP sequence into the packet hash); HASH_MIX finishes the packet hash (murmur3 fmix32).
SLOT_MULT = 2654435761
HASH_MIX = 2246822519
ADDR_SLOT_BITS = 16                      # addr_bits: one bit per 16-bit address hash
ADDR_BITS_WORDS = (1 << ADDR_SLOT_BITS) // 64
SKB_ALIGN_SHIFT = 8                      # skbs are 256-byte aligned slab objects
TRACKED_SLOT_BITS = 12                   # tracked_cnt: one counter per 12-bit skb hash
TRACKED_SLOTS = 1 << TRACKED_SLOT_BITS

# --- Map sizes (entries).
MAX_ADDRS = 4096        # addrs: addresses under trace
MAX_TRACKED = 65536     # tracked: skbs followed until freed (LRU)
MAX_CIDRS = 256         # cidrs: capture CIDRs (LPM trie)
MAX_PORTS = 64          # ports: capture ports
MAX_NETNS = 4096        # netns_allow: namespaces of an agent's node
MAX_STASHED = 4096      # stashed: kprobe entry/return pairs in flight
TC_SLOTS = 16           # tc_devs: devices per node and trace (a path has ~5)

# --- Values of the event record's fields.
# hook: 1-4 tracepoints; then kernel functions (kprobes); then tc. tracer/kernel/hooks.py
# says which hook produces which.
HOOKS = {1: "rx", 2: "tx", 3: "drop", 4: "consume",
         5: "ip_rcv", 6: "ip_forward", 7: "ip_output", 8: "ip_finish_output2",
         9: "br_forward", 10: "br_handle_frame", 11: "nf_verdict", 12: "nat", 13: "ct_confirm",
         14: "route_fail", 15: "neigh_output", 16: "vxlan_xmit", 17: "local_in",
         20: "tc_ingress", 21: "tc_egress"}
HOOK_IDS = {v: k for k, v in HOOKS.items()}
FLAG_FOLLOWED = 1   # emitted because the skb matched earlier (addresses no longer match)
FLAG_DF = 2         # IP don't-fragment bit set (always, for IPv6: routers never fragment it)
FLAG_V6 = 4         # saddr/daddr are IPv6
FLAG_OUTER_V6 = 8   # outer_saddr/outer_daddr are IPv6
FLAG_CT_V6 = 16     # the ct_* tuples are IPv6 (the tuple's l3num)
ENCAP_VXLAN = 1
ENCAP_GENEVE = 2
ENCAP_IPIP = 3      # IPv4 in IPv4 (protocol 4): outer addresses, no VNI (0)
ENCAP = {0: None, ENCAP_VXLAN: "vxlan", ENCAP_GENEVE: "geneve", ENCAP_IPIP: "ipip"}

# --- Tunnels the parser opens (UDP destination ports).
VXLAN_PORT = 4789
VXLAN_PORT_LINUX = 8472     # the Linux default, used by flannel and Cilium
GENEVE_PORT = 6081


def _u(v: int) -> str:
    return f"{v}u" if v > 0x7FFFFFFF else str(v)


def c_defines() -> dict[str, str]:
    """Every value the C code names, as C literals (unsigned where they exceed an int)."""
    out: dict[str, int] = {
        "SEL_EITHER": SEL_EITHER, "SEL_ANY_ADDR": SEL_ANY_ADDR, "SEL_CIDRS": SEL_CIDRS,
        "SEL_PORTS": SEL_PORTS,
        "CONFIG_SEL": CONFIG_SEL, "CONFIG_SLOTS": CONFIG_SLOTS,
        "NETNS_FILTER_ON": NETNS_FILTER_ON, "NETNS_CFG_SLOTS": NETNS_CFG_SLOTS,
        "GUARD_SAMPLE": GUARD_SAMPLE, "GUARD_BUDGET": GUARD_BUDGET, "GUARD_SLOTS": GUARD_SLOTS,
        "SLOT_MULT": SLOT_MULT, "HASH_MIX": HASH_MIX,
        "ADDR_SLOT_BITS": ADDR_SLOT_BITS, "ADDR_BITS_WORDS": ADDR_BITS_WORDS,
        "SKB_ALIGN_SHIFT": SKB_ALIGN_SHIFT, "TRACKED_SLOT_BITS": TRACKED_SLOT_BITS,
        "TRACKED_SLOTS": TRACKED_SLOTS,
        "MAX_ADDRS": MAX_ADDRS, "MAX_TRACKED": MAX_TRACKED, "MAX_CIDRS": MAX_CIDRS,
        "MAX_PORTS": MAX_PORTS, "MAX_NETNS": MAX_NETNS, "MAX_STASHED": MAX_STASHED,
        "TC_SLOTS": TC_SLOTS,
        "FLAG_FOLLOWED": FLAG_FOLLOWED, "FLAG_DF": FLAG_DF, "FLAG_V6": FLAG_V6,
        "FLAG_OUTER_V6": FLAG_OUTER_V6, "FLAG_CT_V6": FLAG_CT_V6,
        "ENCAP_VXLAN": ENCAP_VXLAN, "ENCAP_GENEVE": ENCAP_GENEVE, "ENCAP_IPIP": ENCAP_IPIP,
        "VXLAN_PORT": VXLAN_PORT, "VXLAN_PORT_LINUX": VXLAN_PORT_LINUX, "GENEVE_PORT": GENEVE_PORT,
    }
    out.update({f"C_{name.upper()}": i for i, name in enumerate(COUNTER_NAMES)})
    out["N_COUNTERS"] = len(COUNTER_NAMES)
    out.update({f"HOOK_{name.upper()}": i for i, name in HOOKS.items()})
    return {k: _u(v) for k, v in out.items()}


# What the C code relies on about these values, checked by the compiler at every build.
STATIC_ASSERTS = [
    ("ADDR_BITS_WORDS * 64 == (1u << ADDR_SLOT_BITS)", "addr_bits holds one bit per address slot"),
    ("TRACKED_SLOTS == (1u << TRACKED_SLOT_BITS)", "tracked_cnt holds one counter per skb slot"),
    ("N_COUNTERS == C_OVER_BUDGET + 1", "the over-budget counter is the last one"),
    ("(SEL_EITHER | SEL_ANY_ADDR | SEL_CIDRS | SEL_PORTS) == 15", "selection flags are distinct bits"),
    ("GUARD_SAMPLE < GUARD_SLOTS && GUARD_BUDGET < GUARD_SLOTS", "guard slots fit the guard array"),
    ("CONFIG_SEL < CONFIG_SLOTS && NETNS_FILTER_ON < NETNS_CFG_SLOTS", "config slots fit their arrays"),
]


def c_header() -> str:
    """The generated C text: one #define per value, then the compile-time checks."""
    lines = ["/* generated from tracer/kernel/contract.py: the kernel contract */"]
    lines += [f"#define {k} {v}" for k, v in c_defines().items()]
    lines += [f'_Static_assert({cond}, "{why}");' for cond, why in STATIC_ASSERTS]
    return "\n".join(lines)


# --- The hashes, as the C code computes them (tests and the prefilter maps use these).

def addr_key(a: str) -> int:
    """An IPv4 address as the kernel's u32 key: network order read as a host integer."""
    return int.from_bytes(ipaddress.IPv4Address(a).packed, "little")


def addr6_fold(a: str) -> int:
    """bpf/podtrace.c addr6_fold(): an IPv6 address's four 32-bit words (read as the kernel
    reads them, little-endian) xor-ed, the value its prefilter slot is computed from."""
    b = ipaddress.IPv6Address(a).packed
    w = [int.from_bytes(b[i:i + 4], "little") for i in range(0, 16, 4)]
    return w[0] ^ w[1] ^ w[2] ^ w[3]


def addr_slot(a: str) -> int:
    """The bit of `addr_bits` that bpf/podtrace.c addr_maybe() reads for an address (of
    either family)."""
    v = addr6_fold(a) if ipaddress.ip_address(a).version == 6 else addr_key(a)
    return ((v * SLOT_MULT) & 0xFFFFFFFF) >> (32 - ADDR_SLOT_BITS)


def addr_bit_words(addrs) -> dict[int, int]:
    """The non-zero 64-bit words of `addr_bits` for a set of addresses."""
    words: dict[int, int] = {}
    for a in addrs:
        h = addr_slot(a)
        words[h >> 6] = words.get(h >> 6, 0) | (1 << (h & 63))
    return words


def tracked_slot(skb: int) -> int:
    """The `tracked_cnt` slot of an skb address (bpf/podtrace.c tracked_slot())."""
    return ((((skb >> SKB_ALIGN_SHIFT) & 0xFFFFFFFF) * SLOT_MULT) & 0xFFFFFFFF) >> (32 - TRACKED_SLOT_BITS)


def packet_hash(proto: int, sport: int, dport: int, ip_id: int = 0, ip_len: int = 0, tcp_seq: int = 0) -> int:
    """bpf/podtrace.c packet_hash(), on the values as the kernel holds them (ports, IP ID and
    TCP sequence as copied from the packet: network order in a host integer)."""
    if proto in (1, 58):   # ICMP and ICMPv6: echo id/seq
        h = ((sport << 16) | dport) & 0xFFFFFFFF
    else:
        h = ((ip_id << 16) ^ ip_len ^ ((tcp_seq * SLOT_MULT) & 0xFFFFFFFF)) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * HASH_MIX) & 0xFFFFFFFF
    h ^= h >> 13
    return h | 1


def udp6_payload_hash(payload: bytes) -> int:
    """The tcp_seq of a UDP-over-IPv6 event as a decoded frame holds it (bpf/parser.h
    parse_l4: the first 8 payload bytes as two words read as the kernel reads them, word0 ^
    word1 * SLOT_MULT; the record's tcp_seq is decoded in network order). 0 with fewer than 8."""
    if len(payload) < 8:
        return 0
    w0, w1 = int.from_bytes(payload[:4], "little"), int.from_bytes(payload[4:8], "little")
    return int.from_bytes(((w0 ^ (w1 * SLOT_MULT)) & 0xFFFFFFFF).to_bytes(4, "little"), "big")


def sampled_in(h: int, n: int) -> bool:
    """bpf/podtrace.c sampled_in(): whether a packet of hash `h` is kept when keeping 1 in n."""
    return n <= 1 or ((h >> 1) % n) == 0


def sampled_mask(proto, sport, dport, ip_id, ip_len, tcp_seq, n: int):
    """Whole columns of events (as the record decodes them: ports, IP ID and TCP sequence in
    network order read big-endian): which packets packet_hash() keeps when keeping 1 in n.
    Sampling by powers of two nests: a packet kept at 1 in 4 is kept at 1 in 2."""
    import numpy as np

    def swap16(v):
        v = np.asarray(v).astype(np.uint32)
        return ((v & 0xFF) << 8) | ((v >> 8) & 0xFF)

    if n <= 1:
        return np.ones(len(proto), dtype=bool)
    proto = np.asarray(proto).astype(np.uint32)
    seq = np.asarray(tcp_seq).astype(np.uint32).byteswap()
    u64 = np.uint64
    icmp = ((swap16(sport).astype(u64) << u64(16)) | swap16(dport).astype(u64)) & u64(0xFFFFFFFF)
    other = ((swap16(ip_id).astype(u64) << u64(16)) ^ np.asarray(ip_len).astype(u64)
             ^ ((seq.astype(u64) * u64(SLOT_MULT)) & u64(0xFFFFFFFF))) & u64(0xFFFFFFFF)
    h = np.where((proto == 1) | (proto == 58), icmp, other)
    h ^= h >> u64(15)
    h = (h * u64(HASH_MIX)) & u64(0xFFFFFFFF)
    h ^= h >> u64(13)
    h |= u64(1)
    return ((h >> u64(1)) % u64(n)) == 0


def kept(fields, n: int):
    """Which events a trace keeps when keeping 1 in n: those of the packets packet_hash()
    keeps, and those without a protocol (a drop of an unparsed buffer). `fields`: anything
    whose fields index by name (a record array, its columns, a DataFrame)."""
    import numpy as np

    def col(name):
        return np.asarray(fields[name])
    proto = col("proto")
    if n <= 1:
        return np.ones(len(proto), dtype=bool)
    return sampled_mask(proto, col("sport"), col("dport"), col("ip_id"), col("ip_len"), col("tcp_seq"), n) \
        | (proto == 0)
