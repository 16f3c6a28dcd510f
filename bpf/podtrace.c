// podtrace kernel side: one packet parser shared by every hook, an address filter, skb
// following across NAT, per-CPU counters and a ring buffer of hop events.
//
// Kernel struct offsets arrive as -D flags read from BTF (tracer/kernel/btf.py); tracepoint
// argument structs, `struct event` and the kernel contract (selection flags, counter order,
// guard slots, hashes, map sizes, hook ids: tracer/kernel/contract.py) are generated and
// prepended by tracer/kernel/program.py. Nothing here trusts the substitute kernel headers
// for a layout, and no number shared with Python is written here.

#define ETH_P_IP_BE 0x0008      /* htons(0x0800) */
#define ETH_P_IPV6_BE 0xDD86    /* htons(0x86DD) */
#define ETH_P_TEB 0x6558        /* transparent ethernet bridging (Geneve payload) */
#define IPPROTO_ICMP_ 1
#define IPPROTO_IPIP_ 4
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ICMPV6_ 58
// IPv6 extension headers the parser skips (next-header values), and how many in one packet.
#define IP6_HOPOPTS 0
#define IP6_ROUTING 43
#define IP6_FRAGMENT 44
#define IP6_DSTOPTS 60
#define IP6_EXT_MAX 6
#define AF_INET6_ 10

// Room for what one read of a kernel struct brings back when a record is written (the
// sk_buff's dev/_nfct/len, the device's ifindex/nd_net/name, the conntrack tuples/status).
#define PT_SCRATCH 128
// A run's room in a map value: the packet's headers, PT_HDRS read at once (see hdr_load), with
// room past them for hdr_widen and the load mask; the record's reads reuse its start.
#define PT_HDRS 256
#define PT_ROOM (PT_HDRS + 64)

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(addrs, u32, u8, MAX_ADDRS);            // addresses under trace (network order)
struct addr6 {
    u8 a[16];
};
BPF_HASH(addrs6, struct addr6, u8, MAX_ADDRS);  // IPv6 addresses under trace (the same bits)
// skbs that matched once, with the identity of the packet they carried: followed (through
// NAT and encapsulation) until freed, and only while they still carry that packet — an
// address freed by a path no tracepoint sees, then reused, is not followed by mistake.
BPF_TABLE("lru_hash", u64, u32, tracked, MAX_TRACKED);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);
// Every packet on every hook asks two hash tables (is an address traced? is this skb
// followed?) and almost always hears no. Two arrays answer most of those "no"s first, with
// an inlined array read instead of a hash lookup: a clear bit / zero count means "certainly
// not there", anything else means "ask the table". False "maybe"s only cost the lookup.
// addr_bits: one bit per address hash, kept by user space with `addrs` (addr_bit_words in
// tracer/kernel/contract.py computes the same slots). tracked_cnt: how many `tracked` entries hash to
// each slot, counted here on insert and successful delete; LRU evictions leave a count too
// high, never too low.
BPF_ARRAY(addr_bits, u64, ADDR_BITS_WORDS);
BPF_ARRAY(tracked_cnt, u32, TRACKED_SLOTS);
BPF_ARRAY(config, u32, CONFIG_SLOTS);      // [CONFIG_SEL]: selection flags SEL_* (0 = both addresses in addrs)
// Capture selections (tracer/runs/capture.py): CIDRs and TCP/UDP ports, used only when their
// SEL_* flag is set, so the flow's filter (flags 0 or 1) costs what it did.
struct cidr_key {
    u32 prefixlen;
    u32 addr;                              // network order
};
BPF_LPM_TRIE(cidrs, struct cidr_key, u8, MAX_CIDRS);
struct cidr6_key {
    u32 prefixlen;
    u8 addr[16];
};
BPF_LPM_TRIE(cidrs6, struct cidr6_key, u8, MAX_CIDRS);
BPF_HASH(ports, u16, u8, MAX_PORTS);       // network order
// An agent sees only its own node: when netns_cfg[NETNS_FILTER_ON] is 1, events are kept
// only from the network namespaces listed in netns_allow (the node's and its pods').
BPF_HASH(netns_allow, u32, u8, MAX_NETNS);
BPF_ARRAY(netns_cfg, u32, NETNS_CFG_SLOTS);

// Addresses in 16 bytes (IPv4 in the first 4, the rest zero); `fam` holds FLAG_V6 and
// FLAG_OUTER_V6 for the inner and outer headers.
// The fields besides the addresses are also a struct of their own (pkt_l), so the parser
// can set the outer header's aside while it reads an inner one without a second struct pkt
// on the stack.
#define PKT_SCALARS                                                                         \
    u32 vni, tcp_seq, flow_lbl;                                                             \
    u16 sport, dport, ip_id, ip_len;                                                        \
    u8 proto, tcp_flags, icmp_type, encap, df, ttl, fam;
struct pkt_l {
    PKT_SCALARS
};
struct pkt {
    u8 saddr[16], daddr[16], osaddr[16], odaddr[16];
    union {
        struct pkt_l l;
        struct {
            PKT_SCALARS
        };
    };
};

// What an entry program already knows of a packet it hands on (parsed by the quick IPv4
// parser, which is the full parser's own code without IPv6: the same result), so the shared
// program neither reads nor parses the headers again, nor asks the tables again.
struct pt_pre {
    struct pkt p;
    u32 was;        // the `tracked` entry's packet id for this skb, 0 for none
    u8 parsed;      // 0: nothing here, the shared program reads the packet itself
    u8 want;        // wanted(&p)
};

static __always_inline u32 addr_u32(const u8 *a) {
    u32 v;
    __builtin_memcpy(&v, a, 4);
    return v;
}

// An IPv6 address folded to 32 bits for the prefilter slot (addr6_fold in contract.py).
static __always_inline u32 addr6_fold(const u8 *a) {
    u32 w[4];
    __builtin_memcpy(w, a, 16);
    return w[0] ^ w[1] ^ w[2] ^ w[3];
}

static __always_inline int addr_eq(const u8 *a, const u8 *b) {
    u64 x[2], y[2];
    __builtin_memcpy(x, a, 16);
    __builtin_memcpy(y, b, 16);
    return x[0] == y[0] && x[1] == y[1];
}

static __always_inline void count(u32 idx) {
    u64 *v = counters.lookup(&idx);
    if (v) *v += 1;
}

static __always_inline u64 rd64(const void *base, u32 off) {
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const u8 *)base + off);
    return v;
}

// Guardrails, so tracing never hurts the node it debugs:
// guard[GUARD_SAMPLE] = N: keep 1 packet in N, chosen by a hash of what identifies the packet on every
//            hop and node (IP ID, length, TCP sequence or ICMP id/seq — NAT and
//            encapsulation change none of them), so a kept packet is kept everywhere;
// guard[GUARD_BUDGET] = events per second per CPU; beyond it events are counted, not emitted.
BPF_ARRAY(guard, u32, GUARD_SLOTS);
struct budget {
    u64 window;
    u64 used;
};
BPF_PERCPU_ARRAY(budget_state, struct budget, 1);

// What identifies a packet on every hop and node: IP ID, length, TCP sequence, or the ICMP
// echo id/seq (which request and reply share). NAT and encapsulation change none of them.
// IPv6 has no IP ID (0 unless fragmented); a UDP packet's tcp_seq is its payload hash.
static __always_inline u32 packet_hash(struct pkt *p) {
    u32 h = (p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_) ? (((u32)p->sport << 16) | p->dport)
                                       : (((u32)p->ip_id << 16) ^ p->ip_len ^ (p->tcp_seq * SLOT_MULT));
    h ^= h >> 15;
    h *= HASH_MIX;
    h ^= h >> 13;
    return h | 1;   // never 0
}

static __always_inline int sampled_in(struct pkt *p) {
    u32 idx = GUARD_SAMPLE;
    u32 *n = guard.lookup(&idx);
    if (!n || *n <= 1) return 1;
    return ((packet_hash(p) >> 1) % *n) == 0;   /* >> 1: the low bit is forced to 1 */
}

static __always_inline int within_budget(u64 ts) {
    u32 zero = 0, idx = GUARD_BUDGET;
    u32 *limit = guard.lookup(&idx);
    if (!limit || !*limit) return 1;
    struct budget *b = budget_state.lookup(&zero);
    if (!b) return 1;
    u64 now = ts / 1000000000ULL;
    if (b->window != now) {
        b->window = now;
        b->used = 0;
    }
    if (b->used >= *limit) return 0;
    b->used += 1;
    return 1;
}

// Every emit passes here first: sampling, then the budget. `ts`: the record's time, taken
// once (bpf_ktime_get_ns) for both.
static __always_inline int guarded(struct pkt *p, u64 ts) {
    if (!sampled_in(p)) {
        count(C_SAMPLED_OUT);
        return 0;
    }
    if (!within_budget(ts)) {
        count(C_OVER_BUDGET);
        return 0;
    }
    return 1;
}

/* The shared program's parser reads the packet's headers once, PT_HDRS bytes into the run's
   room (a map value), and parses them there. A packet whose headers do not fit (IPv6 extension
   headers or Geneve options of hundreds of bytes) is skipped like one cut short: never
   misread. One instance of the parser, no per-header reads, the packet kept in the map value
   (see on_skb) and two offsets "widened" keep the verifier's walk of the shared program short:
   it checks the code after a branch once per distinct state it reaches it in, and exact
   offsets or differently written stack bytes make every way through the parser distinct. */
static __always_inline int hdr_load(const u8 *c, u32 off, void *dst, u32 len) {
    if (off > PT_HDRS || len > PT_HDRS - off) return -1;
    asm volatile("" : "+r"(off));   // keeps the mask: the verifier may not see the check's bound
    __builtin_memcpy(dst, c + (off & (PT_HDRS - 1)), len);
    return 0;
}
// A value passed through map memory comes back as "any u32" to the verifier: the ways into
// the code after it become one. Costs a store and a load. The room has PT_ROOM - PT_HDRS bytes
// past the headers for it (and for the mask above).
static __always_inline u32 hdr_widen(const u8 *c, u32 v) {
    volatile u32 *w = (volatile u32 *)(c + PT_HDRS);
    *w = v;
    return *w;
}
#define P_(name) hdr_##name
#define P_CTX const u8 *
#define P_LOAD(c, off, dst, len) hdr_load((c), (off), (dst), (len))
#define P_WIDEN(c, v) (v) = hdr_widen((c), (v))
#include "parser.h"
#undef P_
#undef P_CTX
#undef P_LOAD
#undef P_WIDEN
/* The entry programs read PT_BUF bytes onto their stack (see not_ours). */
#define PT_BUF 96
#define SPAN_LEN (SKB_HEAD + 8 - SKB_PROTOCOL)
static __always_inline int buf_load(const u8 *c, u32 off, void *dst, u32 len) {
    if (off > PT_BUF || len > PT_BUF - off) return -1;
    __builtin_memcpy(dst, c + (off & 127), len);
    return 0;
}
// The tracepoints' own IPv4-only instance (see pt_rx): small, so it is cheap to inline four times.
#undef P_WITH_V6
#define P_WITH_V6 0
#define P_(name) quick_##name
#define P_CTX const u8 *
#define P_LOAD(c, off, dst, len) buf_load((c), (off), (dst), (len))
#include "parser.h"
#undef P_
#undef P_CTX
#undef P_LOAD
#undef P_WITH_V6

// `addr`: an IPv4 address, or an IPv6 address folded by addr6_fold.
static __always_inline int addr_maybe(u32 addr) {
#ifdef PT_NO_PREFILTER
    return 1;
#else
    u32 h = (addr * SLOT_MULT) >> (32 - ADDR_SLOT_BITS);   // as addr_slot() in tracer/kernel/contract.py
    u32 w = h >> 6;
    u64 *v = addr_bits.lookup(&w);
    return v && ((*v >> (h & 63)) & 1);
#endif
}

static __always_inline u32 *tracked_slot(u64 skb) {
    u32 i = ((u32)(skb >> SKB_ALIGN_SHIFT) * SLOT_MULT) >> (32 - TRACKED_SLOT_BITS);
    return tracked_cnt.lookup(&i);
}

static __always_inline u32 *tracked_get(u64 *key) {
#ifndef PT_NO_PREFILTER
    u32 *c = tracked_slot(*key);
    if (c && *c == 0) return 0;
#endif
    return tracked.lookup(key);
}

static __always_inline void track(u64 *key, u32 *id) {
    u32 *c = tracked_slot(*key);
    if (c) __sync_fetch_and_add(c, 1);    // before the entry exists: never a false "no"
    tracked.update(key, id);
}

static __always_inline void untrack(u64 *key) {
    if (tracked.delete(key) == 0) {
        u32 *c = tracked_slot(*key);
        if (c) __sync_fetch_and_add(c, (u32)-1);
    }
}

static __always_inline int addr6_wanted(const u8 *addr, u32 sel) {
    struct addr6 a;
    __builtin_memcpy(a.a, addr, 16);
    if (addr_maybe(addr6_fold(addr)) && addrs6.lookup(&a)) return 1;
    if (!(sel & SEL_CIDRS)) return 0;
    struct cidr6_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, addr, 16);
    return cidrs6.lookup(&k) != 0;
}

static __always_inline int addr_wanted(struct pkt *p, const u8 *addr16, u32 sel) {
    if (p->fam & FLAG_V6) return addr6_wanted(addr16, sel);
    u32 addr = addr_u32(addr16);
    if (addr_maybe(addr) && addrs.lookup(&addr)) return 1;
    if (!(sel & SEL_CIDRS)) return 0;
    struct cidr_key k = {.prefixlen = 32, .addr = addr};
    return cidrs.lookup(&k) != 0;
}

static __always_inline int wanted(struct pkt *p) {
    u32 idx = CONFIG_SEL;
    u32 *mode = config.lookup(&idx);
    u32 sel = mode ? *mode : 0;
    if (sel & SEL_PORTS) {
        if (p->proto != IPPROTO_TCP_ && p->proto != IPPROTO_UDP_) return 0;
        if (!ports.lookup(&p->sport) && !ports.lookup(&p->dport)) return 0;
    }
    if (sel & SEL_ANY_ADDR) return 1;
    if (sel & SEL_EITHER) return addr_wanted(p, p->saddr, sel) || addr_wanted(p, p->daddr, sel);
    return addr_wanted(p, p->saddr, sel) && addr_wanted(p, p->daddr, sel);
}

// A followed packet's addresses join the trace under flow's filter (config 0: both
// addresses in `addrs`): a DNAT no inventory named (a hostPort, a NodePort, a hand-written
// rule) sent it to an address the flow did not list, and that target's answers belong to
// the flow. The `addr_bits` word is set as user space sets it (set_addrs).
static __always_inline int learn_bit(u32 addr) {
#ifndef PT_NO_PREFILTER
    u32 h = (addr * SLOT_MULT) >> (32 - ADDR_SLOT_BITS);   // as addr_maybe()
    u32 w = h >> 6;
    u64 *v = addr_bits.lookup(&w);
    if (!v) return 0;
    __sync_fetch_and_or(v, 1ULL << (h & 63));   // other CPUs set bits of the same word
#endif
    return 1;
}

static __always_inline void learn_addr(struct pkt *p, const u8 *addr16) {
    u32 idx = CONFIG_SEL;
    u8 one = 1;
    if (p->fam & FLAG_V6) {
        struct addr6 a;
        __builtin_memcpy(a.a, addr16, 16);
        u64 x[2];
        __builtin_memcpy(x, addr16, 16);
        if (!(x[0] | x[1]) || addrs6.lookup(&a)) return;
        u32 *mode = config.lookup(&idx);
        if (!mode || *mode != 0) return;
        if (learn_bit(addr6_fold(addr16))) addrs6.update(&a, &one);
        return;
    }
    u32 addr = addr_u32(addr16);
    if (!addr || addrs.lookup(&addr)) return;
    u32 *mode = config.lookup(&idx);
    if (!mode || *mode != 0) return;
    if (learn_bit(addr)) addrs.update(&addr, &one);
}

static __always_inline void clear_ct_addrs(struct event *e) {
    __builtin_memset(e->ct_orig_src, 0, 16);
    __builtin_memset(e->ct_orig_dst, 0, 16);
    __builtin_memset(e->ct_reply_src, 0, 16);
    __builtin_memset(e->ct_reply_dst, 0, 16);
}

// The conntrack entry attached to the skb (skb->_nfct: pointer | ctinfo in the low 3 bits):
// its state as this packet sees it, the original and reply tuples, and the IPS_* status,
// whose NAT bits tell whether DNAT/SNAT applies. Offsets from BTF; absent without conntrack.
// Where BTF lays the two tuples and the status in one span (x86-64 since 4.x: tuplehash[2]
// then status), one read of it instead of ten field by field: each read is a helper call,
// and a matched hop makes a dozen of them.
#define CT_SPAN (CT_STATUS + 4 - CT_TUPLEHASH)
#if CT_STATUS > CT_TUPLEHASH && CT_STATUS >= CT_TUPLEHASH + 2 * CT_TH_SIZE && CT_SPAN <= PT_SCRATCH
#define CT_ONE_READ 1
#endif
static __always_inline void ct_tuples(struct event *e, const u8 *o, const u8 *r, u16 l3num) {
    if (l3num == AF_INET6_) {   // the tuples are IPv6: all 16 bytes of nf_inet_addr
        e->flags |= FLAG_CT_V6;
        __builtin_memcpy(e->ct_orig_src, o + CT_T_SRC_U3, 16);
        __builtin_memcpy(e->ct_orig_dst, o + CT_T_DST_U3, 16);
        __builtin_memcpy(e->ct_reply_src, r + CT_T_SRC_U3, 16);
        __builtin_memcpy(e->ct_reply_dst, r + CT_T_DST_U3, 16);
    } else {
        __builtin_memcpy(e->ct_orig_src, o + CT_T_SRC_U3, 4);
        __builtin_memcpy(e->ct_orig_dst, o + CT_T_DST_U3, 4);
        __builtin_memcpy(e->ct_reply_src, r + CT_T_SRC_U3, 4);
        __builtin_memcpy(e->ct_reply_dst, r + CT_T_DST_U3, 4);
    }
    __builtin_memcpy(&e->ct_orig_sport, o + CT_T_SRC_PORT, 2);
    __builtin_memcpy(&e->ct_orig_dport, o + CT_T_DST_PORT, 2);
    __builtin_memcpy(&e->ct_reply_sport, r + CT_T_SRC_PORT, 2);
    __builtin_memcpy(&e->ct_reply_dport, r + CT_T_DST_PORT, 2);
}

static __always_inline void read_ct(u64 nfct, struct event *e, u8 *buf) {
    e->ct_info = 0;
    e->ct_status = 0;
    clear_ct_addrs(e);
    e->ct_orig_sport = e->ct_orig_dport = e->ct_reply_sport = e->ct_reply_dport = 0;
#if HAVE_CT
    if (!nfct) return;
    e->ct_info = (u8)(nfct & 7) + 1;
    const u8 *ct = (const u8 *)(nfct & ~7ULL);
    if (!ct) return;                     // untracked: ctinfo only
#ifdef CT_ONE_READ
    u8 *span = buf;
    if (bpf_probe_read_kernel(span, CT_SPAN, ct + CT_TUPLEHASH)) return;
    e->ct_status = *(u32 *)(span + (CT_STATUS - CT_TUPLEHASH));   // low half of an unsigned long (LE)
    const u8 *o = span + CT_TH_TUPLE;
    const u8 *r = span + CT_TH_SIZE + CT_TH_TUPLE;
    ct_tuples(e, o, r, *(u16 *)(o + CT_T_SRC_L3NUM));
#else
    u32 status = 0;
    bpf_probe_read_kernel(&status, 4, ct + CT_STATUS);   // low half of an unsigned long (LE)
    e->ct_status = status;
    const u8 *o = ct + CT_TUPLEHASH + CT_TH_TUPLE;
    const u8 *r = ct + CT_TUPLEHASH + CT_TH_SIZE + CT_TH_TUPLE;
    u8 *ot = buf, *rt = buf + PT_SCRATCH / 2;   // a tuple is 40 bytes
    bpf_probe_read_kernel(ot, CT_TH_SIZE - CT_TH_TUPLE, o);
    bpf_probe_read_kernel(rt, CT_TH_SIZE - CT_TH_TUPLE, r);
    ct_tuples(e, ot, rt, *(u16 *)(ot + CT_T_SRC_L3NUM));
#endif
#endif
}

// The packet part of an event, shared by every kind of hook.
static __always_inline void fill(struct event *e, struct pkt *p, u8 hook, u8 flags, u64 ts) {
    e->ts_ns = ts;
    __builtin_memcpy(e->saddr, p->saddr, 16);
    __builtin_memcpy(e->daddr, p->daddr, 16);
    __builtin_memcpy(e->outer_saddr, p->osaddr, 16);
    __builtin_memcpy(e->outer_daddr, p->odaddr, 16);
    e->flow_lbl = p->flow_lbl;
    e->vni = p->vni;
    e->tcp_seq = p->tcp_seq;
    e->sport = p->sport;
    e->dport = p->dport;
    e->ip_id = p->ip_id;
    e->ip_len = p->ip_len;
    e->hook = hook;
    e->proto = p->proto;
    e->tcp_flags = p->tcp_flags;
    e->icmp_type = p->icmp_type;
    e->flags = flags | p->fam | (p->df ? FLAG_DF : 0);
    e->encap = p->encap;
    e->cpu = bpf_get_smp_processor_id();
    e->ttl = p->ttl;
}

// The device's index, name and network namespace (its netns inode number, 0 without a
// device): where BTF lays ifindex, nd_net and name in one span (x86-64 since 5.x), one read.
#define DEV_LO (NETDEV_IFINDEX < NETDEV_ND_NET ? NETDEV_IFINDEX : NETDEV_ND_NET)
#define DEV_HI_ (NETDEV_IFINDEX + 4 > NETDEV_ND_NET + 8 ? NETDEV_IFINDEX + 4 : NETDEV_ND_NET + 8)
#define DEV_HI (DEV_HI_ > NETDEV_NAME + 16 ? DEV_HI_ : NETDEV_NAME + 16)
#define DEV_SPAN (DEV_HI - DEV_LO)
#if NETDEV_NAME >= DEV_LO && DEV_SPAN <= PT_SCRATCH
#define DEV_ONE_READ 1
#endif
// Reads the span into `buf` (where the name then is, at DEV_NAME_AT) and returns the netns
// inode number; `ifindex` set. Field by field where the span does not fit.
#ifdef DEV_ONE_READ
#define DEV_NAME_AT (NETDEV_NAME - DEV_LO)
#else
#define DEV_NAME_AT 0
#endif
static __always_inline u32 read_dev(const u8 *dev, u32 *ifindex, u8 *buf) {
    *ifindex = 0;
    __builtin_memset(buf + DEV_NAME_AT, 0, 16);
    if (!dev) return 0;
    const u8 *net;
#ifdef DEV_ONE_READ
    if (bpf_probe_read_kernel(buf, DEV_SPAN, dev + DEV_LO)) return 0;
    *ifindex = *(u32 *)(buf + (NETDEV_IFINDEX - DEV_LO));
    net = *(const u8 **)(buf + (NETDEV_ND_NET - DEV_LO));
#else
    bpf_probe_read_kernel(ifindex, 4, dev + NETDEV_IFINDEX);
    bpf_probe_read_kernel(buf, 16, dev + NETDEV_NAME);
    net = (const u8 *)rd64(dev, NETDEV_ND_NET);
#endif
    u32 inum = 0;
    if (net) bpf_probe_read_kernel(&inum, 4, net + NET_NS_INUM);
    return inum;
}

static __always_inline int netns_ok(u32 inum) {
    u32 idx = NETNS_FILTER_ON;
    u32 *on = netns_cfg.lookup(&idx);
    if (!on || !*on) return 1;
    return netns_allow.lookup(&inum) != 0;
}

// What a record reads of the sk_buff: its device, conntrack entry and length. dev, _nfct
// and len lie within 104 bytes on x86-64 since 5.x: one read.
#define SKB_REC_LO (SKB_DEV < SKB_NFCT ? SKB_DEV : SKB_NFCT)
#define SKB_REC_HI (SKB_LEN + 4 > SKB_NFCT + 8 ? SKB_LEN + 4 : SKB_NFCT + 8)
#define SKB_REC_SPAN (SKB_REC_HI - SKB_REC_LO)
#if SKB_LEN >= SKB_REC_LO && SKB_DEV + 8 <= SKB_REC_HI && SKB_REC_SPAN <= PT_SCRATCH
#define SKB_REC_ONE_READ 1
#endif

static __always_inline void emit(void *ctx, const u8 *skb, struct pkt *p, u8 hook, u8 flags,
                                 u64 location, u32 reason, u8 *buf) {
    const u8 *dev;
    u64 nfct;
    u32 len;
#ifdef SKB_REC_ONE_READ
    if (bpf_probe_read_kernel(buf, SKB_REC_SPAN, skb + SKB_REC_LO)) return;
    dev = *(const u8 **)(buf + (SKB_DEV - SKB_REC_LO));
    nfct = *(u64 *)(buf + (SKB_NFCT - SKB_REC_LO));
    len = *(u32 *)(buf + (SKB_LEN - SKB_REC_LO));
#else
    dev = (const u8 *)rd64(skb, SKB_DEV);
    nfct = HAVE_CT ? rd64(skb, SKB_NFCT) : 0;
    len = 0;
    bpf_probe_read_kernel(&len, 4, skb + SKB_LEN);
#endif
    u32 ifindex;
    u32 inum = read_dev(dev, &ifindex, buf);
    if (!netns_ok(inum)) return;
    u64 ts = bpf_ktime_get_ns();
    if (!guarded(p, ts)) return;
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(C_LOST);
        return;
    }
    fill(e, p, hook, flags, ts);
    e->skb = (u64)skb;
    e->location = location;
    e->reason = reason;
    e->netns = inum;
    e->ifindex = ifindex;
    __builtin_memcpy(e->ifname, buf + DEV_NAME_AT, sizeof(e->ifname));
    e->len = len;
    read_ct(nfct, e, buf);
    events.ringbuf_submit(e, 0);
    count(C_EMITTED);
}

static __always_inline u16 skb_u16(const u8 *skb, u32 off) {
    u16 v = 0;
    bpf_probe_read_kernel(&v, 2, skb + off);
    return v;
}

static __always_inline u32 skb_u32(const u8 *skb, u32 off) {
    u32 v = 0;
    bpf_probe_read_kernel(&v, 4, skb + off);
    return v;
}

// Bytes readable from `l3` to the end of the skb's linear area (head + tail): headers may
// already be pulled past `data` at a drop, yet they are still in the linear buffer.
static __always_inline u32 linear_from(const u8 *skb, const u8 *l3) {
    const u8 *head = (const u8 *)rd64(skb, SKB_HEAD);
    u32 tail = skb_u32(skb, SKB_TAIL);   // an offset from head on 64-bit kernels
    if (!head || l3 < head) return 0;
    u64 at = (u64)(l3 - head);
    if (at >= tail) return 0;
    return tail - (u32)at;
}

#define NOT_IPV4 (-2)

// skb->protocol is IPv4 or IPv6 (network order).
static __always_inline int is_ip(u16 proto) {
    return proto == ETH_P_IP_BE || proto == ETH_P_IPV6_BE;
}

// Reads and parses the packet of an skb: NOT_IPV4 when skb->protocol is neither IPv4 nor IPv6, else the
// parser's result (0, or -1 for a packet it would not read). `l3` is the network header;
// 0 means head + `nh` (skb->network_header, at a free). protocol, tail and head come from one
// read of the span they share (where BTF lays them so), the headers from one 96-byte read
// parsed on the stack, with per-header reads as the fallback.
static __always_inline int read_packet(const u8 *skb, const u8 *l3, u16 nh, struct pkt *p, u8 *buf) {
#if SKB_TAIL > SKB_PROTOCOL && SKB_HEAD > SKB_TAIL && SPAN_LEN <= 32
    u8 span[32];
    if (bpf_probe_read_kernel(span, SPAN_LEN, skb + SKB_PROTOCOL)) return NOT_IPV4;
    if (!is_ip(*(u16 *)span)) return NOT_IPV4;
    u8 v6 = *(u16 *)span == ETH_P_IPV6_BE;
    const u8 *head_ = *(const u8 **)(span + (SKB_HEAD - SKB_PROTOCOL));
    u32 tail_ = *(u32 *)(span + (SKB_TAIL - SKB_PROTOCOL));
    if (!l3) {
        if (!head_) return -1;
        l3 = head_ + nh;
    }
    u32 avail = 0;
    if (head_ && l3 >= head_ && (u64)(l3 - head_) < tail_) avail = tail_ - (u32)(l3 - head_);
#else
    u16 proto = skb_u16(skb, SKB_PROTOCOL);
    if (!is_ip(proto)) return NOT_IPV4;
    u8 v6 = proto == ETH_P_IPV6_BE;
    if (!l3) {
        const u8 *head = (const u8 *)rd64(skb, SKB_HEAD);
        if (!head) return -1;
        l3 = head + nh;
    }
    u32 avail = linear_from(skb, l3);
#endif
    if (avail < 20 || bpf_probe_read_kernel(buf, PT_HDRS, l3)) return -1;   // the stack has no room for it
    return hdr_parse_packet(buf, 0, avail < PT_HDRS ? avail : PT_HDRS, p, v6);
}

// The common path of every skb hook (tracepoints and kprobes): parse, filter, follow, emit.
// A packet at a device (`free` 0) or the end of a buffer (`free` 1: dropped at kfree_skb with
// the kernel's `location` and `reason`, or consumed). `l3` is the network header, 0 for head
// + `nh`. `buf`: PT_ROOM bytes of this run's own (a map value: the stack has no room left),
// where the headers and the record's reads land. `pre`, also the run's own in a map value:
// what the entry program found (`parsed`), else where the packet is parsed to.
// The packet is read at one place and the record written at one place, and the packet is
// kept in the map value, not on the stack: the verifier checks what follows the parser once
// for all the ways through it, instead of once per way it left the stack's bytes.
static __always_inline int on_skb(void *ctx, const u8 *skb, const u8 *l3, u16 nh, u8 hook, u8 free,
                                  u64 location, u32 reason, u8 *buf, struct pt_pre *pre) {
    struct pkt *p = &pre->p;
    u64 key = (u64)skb;
    u32 was;
    int want = -1;
    u8 flags = 0;
    if (pre->parsed) {
        was = pre->was;
        want = pre->want;
    } else {
        u32 *w = tracked_get(&key);
        was = w ? *w : 0;
        // A buffer never matched that is consumed (delivered, not dropped): nothing to say,
        // and this runs for every skb the machine frees, so it leaves before reading the packet.
        if (free && !was && hook != HOOK_DROP) return 0;
        __builtin_memset(p, 0, sizeof(*p));
        int ok = read_packet(skb, l3, nh, p, buf);
        if (ok == NOT_IPV4) {
            if (free && was) untrack(&key);
            return 0;
        }
        if (ok < 0) {
            if (!was) return 0;
            if (!free) {
                count(C_TRUNCATED);
                return 0;
            }
            untrack(&key);   // a followed buffer ends, its headers unreadable: say so all the same
            flags = FLAG_FOLLOWED;
            goto record;
        }
    }
    u32 id = packet_hash(p);
    if (free) {
        if (was) untrack(&key);
        if (was != id) {   // not the end of a followed packet (id is never 0)
            if (hook != HOOK_DROP || !wanted(p)) return 0;
            count(C_MATCHED);
        }
        goto record;
    }
    if (was && was != id) {
        untrack(&key);   // the buffer was reused for another packet
        was = 0;
    }
    if (want < 0) want = wanted(p);
    if (want) {
        if (!was && !sampled_in(p)) {   // sampled out: leave before tracking it
            count(C_MATCHED);
            count(C_SAMPLED_OUT);
            return 0;
        }
        if (!was) track(&key, &id);
    } else if (was) {
        flags = FLAG_FOLLOWED;
        learn_addr(p, p->saddr);
        learn_addr(p, p->daddr);
    } else {
        return 0;
    }
    count(C_MATCHED);
record:
    emit(ctx, skb, p, hook, flags, location, reason, buf);
    return 0;
}

// A packet at a hook that is not the end of its buffer; `aux`/`aux2` carry the hook's extra
// (a netfilter verdict, a route error, a NAT type).
static __always_inline int on_packet(void *ctx, const u8 *skb, const u8 *l3, u8 hook, u32 aux, u64 aux2,
                                     u8 *buf, struct pt_pre *pre) {
    return on_skb(ctx, skb, l3, 0, hook, 0, aux2, aux, buf, pre);
}

// The tracepoints run for every packet of the machine; most are not ours. Each one decides
// that itself with a small IPv4-only parse (the filter and the skb following, nothing else),
// and hands everything else (ours, followed, IPv6, headers beyond the quick read, the end of
// a buffer) to one shared program, `pt_common`, by a tail call: the full parser, the record
// and the conntrack view are then compiled and verified once instead of once per tracepoint.
// The arguments go in a per-CPU stack of slots. Perf tracepoints never nest on a CPU (the
// kernel skips a program that would run inside another), but raw tracepoints do: a
// consume_skb in a process's recvmsg can be interrupted by a softirq whose netif_receive_skb
// runs pt_rx before the first call reached pt_common. Each call takes the slot at `depth`,
// and pt_common gives it back on every way out. User space puts pt_common in pt_next before
// attaching anything.
struct pt_call {
    u64 skb;
    u64 l3;         // the network header; 0: head + nh
    u64 location;
    u32 reason;
    u16 nh;
    u8 hook;
    u8 free;        // kfree_skb / consume_skb: the end of a buffer
    u8 room[PT_ROOM];         // the headers read, then the record's reads (emit)
    struct pt_pre pre;        // at a device: what the entry program found
};
#define PT_NEST 4   // process, softirq, hardirq, NMI (a power of two)
struct pt_calls_t {
    u32 depth;
    u32 pad;
    struct pt_call at[PT_NEST];
};
BPF_PERCPU_ARRAY(pt_calls, struct pt_calls_t, 1);
BPF_PROG_ARRAY(pt_next, 1);

static __always_inline int pass_on(void *ctx, const u8 *skb, const u8 *l3, u16 nh, u8 hook, u8 free,
                                   u64 location, u32 reason, const struct pt_pre *pre) {
    u32 zero = 0;
    struct pt_calls_t *calls = pt_calls.lookup(&zero);
    if (!calls) return 0;
    u32 d = calls->depth;
    if (d >= PT_NEST) {   // deeper than interrupts nest: never expected, but never silent
        count(C_LOST);
        return 0;
    }
    asm volatile("" : "+r"(d));   // keeps the mask (as in pt_common)
    struct pt_call *call = &calls->at[d & (PT_NEST - 1)];
    call->skb = (u64)skb;
    call->l3 = (u64)l3;
    call->nh = nh;
    call->hook = hook;
    call->free = free;
    call->location = location;
    call->reason = reason;
    if (pre && pre->parsed)
        __builtin_memcpy(&call->pre, pre, sizeof(*pre));
    else
        call->pre.parsed = 0;
    calls->depth = d + 1;
    pt_next.call(ctx, 0);
    calls->depth = d;   // reached only when pt_common is not (yet) in pt_next
    return 0;
}

// What the entry programs read of the sk_buff before deciding: protocol, network header,
// tail, head, data. On this kind of layout (x86-64 since 5.x) they lie within 32 bytes from
// `protocol`: one read. Elsewhere field by field.
struct skb_view {
    u64 head;
    u64 data;
    u32 tail;       // an offset from head on 64-bit kernels
    u16 proto;
    u16 nh;         // the network header, an offset from head
};
#define VIEW_LEN (SKB_DATA + 8 - SKB_PROTOCOL)
#if SKB_NETWORK_HEADER > SKB_PROTOCOL && SKB_TAIL > SKB_NETWORK_HEADER && SKB_HEAD > SKB_TAIL && \
    SKB_DATA > SKB_HEAD && VIEW_LEN <= 32
#define VIEW_ONE_READ 1
#endif
static __always_inline int read_view(const u8 *skb, struct skb_view *v) {
#ifdef VIEW_ONE_READ
    u8 span[32];
    if (bpf_probe_read_kernel(span, VIEW_LEN, skb + SKB_PROTOCOL)) return -1;
    v->proto = *(u16 *)span;
    v->nh = *(u16 *)(span + (SKB_NETWORK_HEADER - SKB_PROTOCOL));
    v->tail = *(u32 *)(span + (SKB_TAIL - SKB_PROTOCOL));
    v->head = *(u64 *)(span + (SKB_HEAD - SKB_PROTOCOL));
    v->data = *(u64 *)(span + (SKB_DATA - SKB_PROTOCOL));
#else
    v->proto = skb_u16(skb, SKB_PROTOCOL);
    v->nh = skb_u16(skb, SKB_NETWORK_HEADER);
    v->tail = skb_u32(skb, SKB_TAIL);
    v->head = rd64(skb, SKB_HEAD);
    v->data = rd64(skb, SKB_DATA);
#endif
    return 0;
}

// 1 when the packet at `l3` is certainly not ours: IPv4 (or not IP at all), read and parsed
// from one copy of its headers, not followed, and not wanted by the filter or wanted but
// sampled out (a busy flow under the guard: most of its packets). 0: pt_common decides,
// with what was found here in `pre` when the quick parse read the packet.
static __always_inline int not_ours(const u8 *skb, const u8 *l3, const struct skb_view *v, struct pt_pre *pre) {
    if (v->proto != ETH_P_IP_BE) return v->proto != ETH_P_IPV6_BE;
    const u8 *head = (const u8 *)v->head;
    u32 avail = 0;
    if (head && l3 >= head && (u64)(l3 - head) < v->tail) avail = v->tail - (u32)(l3 - head);
    u8 pb[PT_BUF];
    if (avail < 20 || bpf_probe_read_kernel(pb, PT_BUF, l3)) return 0;
    if (quick_parse_packet(pb, 0, avail < PT_BUF ? avail : PT_BUF, &pre->p, 0) < 0) return 0;
    u64 key = (u64)skb;
    u32 *was = tracked_get(&key);
    pre->was = was ? *was : 0;
    pre->want = wanted(&pre->p);
    if (!pre->was && !pre->want) return 1;
    if (!pre->was && !sampled_in(&pre->p)) {   // ours, sampled out: as on_skb would, without the tail call
        count(C_MATCHED);
        count(C_SAMPLED_OUT);
        return 1;
    }
    pre->parsed = 1;
    return 0;
}

// The four entry points come in two builds. PT_RAW_TP (the default where the kernel allows
// it): raw tracepoints, whose context is the tracepoint's own arguments (ctx->args[], the skb
// first), so the kernel does not fill a perf tracepoint record (device name, a dozen skb
// fields) for every packet of the machine before calling us. Otherwise perf tracepoints,
// reading the same values from that record. Both builds' entry points are one line each,
// around at_device() and buffer_end() below.

// One packet at a device, once the entry program has its skb and where its network header
// is: `off` from skb->data (0 at netif_receive_skb, where the Ethernet header has been
// pulled; the perf record's network_offset at net_dev_start_xmit; OFF_FROM_SKB: head +
// network_header - data, what that record holds, computed here).
#define OFF_FROM_SKB 0x7fffffff
static __always_inline int at_device(void *ctx, const u8 *skb, s64 off, u8 hook) {
    struct skb_view v;
    if (read_view(skb, &v)) return 0;
    if (off == OFF_FROM_SKB) off = (s64)(v.head + v.nh) - (s64)v.data;
    if (off < 0 || off > 256) return 0;
    count(C_SEEN);
    const u8 *l3 = (const u8 *)v.data + off;
    struct pt_pre pre = {};
    if (not_ours(skb, l3, &v, &pre)) return 0;
    return pass_on(ctx, skb, l3, 0, hook, 0, 0, 0, &pre);
}

#if PT_RAW_TP
int pt_rx(struct bpf_raw_tracepoint_args *ctx) {
    return at_device(ctx, (const u8 *)ctx->args[0], 0, HOOK_RX);
}

int pt_tx(struct bpf_raw_tracepoint_args *ctx) {
    return at_device(ctx, (const u8 *)ctx->args[0], OFF_FROM_SKB, HOOK_TX);
}
#else
int pt_rx(struct tp_netif_receive_skb *args) {
    return at_device(args, (const u8 *)args->skbaddr, 0, HOOK_RX);
}

int pt_tx(struct tp_net_dev_start_xmit *args) {
    return at_device(args, (const u8 *)args->skbaddr, args->network_offset, HOOK_TX);
}
#endif

// The end of a buffer: dropped (kfree_skb, with the kernel's location and reason) or
// consumed (consume_skb). A buffer never matched that is consumed (delivered, not dropped)
// has nothing to say, and this runs for every skb the machine frees: it leaves at once.
static __always_inline int buffer_end(void *ctx, const u8 *skb, u8 hook, u64 location, u32 reason) {
    u64 key = (u64)skb;
    if (hook == HOOK_CONSUME && !tracked_get(&key)) return 0;
    return pass_on(ctx, skb, 0, skb_u16(skb, SKB_NETWORK_HEADER), hook, 1, location, reason, 0);
}

#if PT_RAW_TP
int pt_kfree(struct bpf_raw_tracepoint_args *ctx) {
    // kfree_skb(skb, location, reason, …)
    return buffer_end(ctx, (const u8 *)ctx->args[0], HOOK_DROP, (u64)ctx->args[1], (u32)ctx->args[2]);
}

int pt_consume(struct bpf_raw_tracepoint_args *ctx) {
    // consume_skb(skb, location)
    return buffer_end(ctx, (const u8 *)ctx->args[0], HOOK_CONSUME, (u64)ctx->args[1], 0);
}
#else
int pt_kfree(struct tp_kfree_skb *args) {
    return buffer_end(args, (const u8 *)args->skbaddr, HOOK_DROP, (u64)args->location, (u32)args->reason);
}

int pt_consume(struct tp_consume_skb *args) {
    return buffer_end(args, (const u8 *)args->skbaddr, HOOK_CONSUME, (u64)args->location, 0);
}
#endif

int pt_common(void *ctx) {
    u32 zero = 0;
    struct pt_calls_t *calls = pt_calls.lookup(&zero);
    if (!calls) return 0;
    u32 d = calls->depth;
    if (d == 0 || d > PT_NEST) return 0;
    u32 i = d - 1;
    asm volatile("" : "+r"(i));   // keeps the mask: clang drops it as redundant, the verifier needs it
    struct pt_call *call = &calls->at[i & (PT_NEST - 1)];
    const u8 *skb = (const u8 *)call->skb;
    int rc = on_skb(ctx, skb, (const u8 *)call->l3, call->nh, call->hook, call->free, call->location,
                    call->reason, call->room, &call->pre);
    calls->depth = d - 1;
    return rc;
}
