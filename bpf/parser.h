// The packet parser, written once and instantiated per way of reading packet bytes:
// P_(name) names the instance, P_CTX is what locates the packet, P_LOAD(c, off, dst, len)
// copies `len` bytes at offset `off` (0 on success). Kernel hooks parse a copy of the
// headers read at once with bpf_probe_read_kernel; tc programs read with bpf_skb_load_bytes.
// P_WIDEN(c, v), when defined, makes the verifier forget what it knows of the offset v.
// P_WITH_V6 0 makes an IPv4-only instance (an IPv6 header, outer or inner, is "not read": -1).
#ifndef P_WITH_V6
#define P_WITH_V6 1
#endif

// The L4 header at `l4` (`left` bytes readable): ports, TCP sequence and flags, ICMP/ICMPv6
// type and echo id/seq. Returns what parse_ip returns (the UDP payload's offset from `base`).
static __always_inline int P_(parse_l4)(P_CTX c, u32 l4, u32 left, u32 base, struct pkt *p) {
    p->sport = p->dport = 0;
    p->tcp_flags = p->icmp_type = 0;
    p->tcp_seq = 0;
    if (p->proto == IPPROTO_TCP_) {
        u8 th[14];
        if (left < 14 || P_LOAD(c, l4, th, sizeof(th))) return -2;
        __builtin_memcpy(&p->sport, &th[0], 2);
        __builtin_memcpy(&p->dport, &th[2], 2);
        __builtin_memcpy(&p->tcp_seq, &th[4], 4);
        p->tcp_flags = th[13];
    } else if (p->proto == IPPROTO_UDP_) {
        u8 uh[8];
        if (left < 8 || P_LOAD(c, l4, uh, sizeof(uh))) return -2;
        __builtin_memcpy(&p->sport, &uh[0], 2);
        __builtin_memcpy(&p->dport, &uh[2], 2);
        // IPv6 has no IP ID: the first 8 payload bytes (NAT leaves them) stand in for it.
        u32 w[2];
        if ((p->fam & FLAG_V6) && left >= 16 && !P_LOAD(c, l4 + 8, w, sizeof(w)))
            p->tcp_seq = w[0] ^ (w[1] * SLOT_MULT);
        return (l4 - base) + 8;
    } else if (p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_) {
        u8 ih[8];
        if (left < 8 || P_LOAD(c, l4, ih, sizeof(ih))) return -2;
        p->icmp_type = ih[0];
        __builtin_memcpy(&p->sport, &ih[4], 2);   // echo id
        __builtin_memcpy(&p->dport, &ih[6], 2);   // echo seq
    }
    return 0;
}

static __always_inline int P_(parse_ip6)(P_CTX c, u32 off, u32 avail, struct pkt *p);

// Parse an IPv4 header at `off` (with `avail` bytes readable from there) and its L4 header;
// when the link layer said IPv6 (`v6`: skb->protocol or the inner ethertype) parse_ip6 reads
// it instead. The version nibble must agree with what the link layer said. Returns the offset of the UDP payload (to look for a
// tunnel), 0 when done, <0 when the packet is not IP or is truncated: such packets are
// skipped, never misread.
static __always_inline int P_(parse_ip)(P_CTX c, u32 off, u32 avail, struct pkt *p, u8 v6) {
    if (v6) return P_WITH_V6 ? P_(parse_ip6)(c, off, avail, p) : -1;
    u8 iph[20];
    if (avail < 20) return -1;
    if (P_LOAD(c, off, iph, sizeof(iph))) return -1;
    if ((iph[0] >> 4) != 4) return -1;
    u32 ihl = (iph[0] & 0x0f) * 4;
    if (ihl < 20 || ihl > avail) return -1;
    u16 tot = ((u16)iph[2] << 8) | iph[3];
    if (tot < ihl) return -1;
    p->ip_len = tot;
    p->ip_id = ((u16)iph[5] << 8) | iph[4];   // kept in network order, like the record
    p->df = (iph[6] & 0x40) ? 1 : 0;
    u16 frag = (((u16)iph[6] & 0x1f) << 8) | iph[7];
    p->ttl = iph[8];
    p->proto = iph[9];
    __builtin_memcpy(p->saddr, &iph[12], 4);   // the other 12 bytes stay zero (see parse_packet)
    __builtin_memcpy(p->daddr, &iph[16], 4);
    p->fam = 0;
    p->flow_lbl = 0;
    if (frag) {   // a non-first fragment has no L4 header
        p->sport = p->dport = 0;
        p->tcp_flags = p->icmp_type = 0;
        p->tcp_seq = 0;
        return 0;
    }
    return P_(parse_l4)(c, off + ihl, avail - ihl, off, p);
}

// Parse an IPv6 header at `off`, skipping the common extension headers (hop-by-hop, routing,
// fragment, destination options) in a bounded loop, then its L4 header; returns as parse_ip.
// Identity without an IP ID: ip_id is the fragment header's identification (low 16 bits) or
// 0, ip_len is 40 + the payload length (what IPv4's total length counts), flow_lbl the label.
static __always_inline int P_(parse_ip6)(P_CTX c, u32 off, u32 avail, struct pkt *p) {
    u8 h[8];   // the addresses are read straight into the packet (stack is short)
    if (avail < 40) return -1;
    if (P_LOAD(c, off, h, sizeof(h)) || P_LOAD(c, off + 8, p->saddr, 16) || P_LOAD(c, off + 24, p->daddr, 16))
        return -1;
    if ((h[0] >> 4) != 6) return -1;
    p->fam = FLAG_V6;
    p->ip_len = 40 + (((u16)h[4] << 8) | h[5]);
    p->flow_lbl = ((u32)(h[1] & 0x0f) << 16) | ((u32)h[2] << 8) | h[3];
    p->ip_id = 0;
    p->df = 1;           // routers never fragment IPv6: every packet is "don't fragment"
    p->ttl = h[7];       // hop limit
    u8 nh = h[6];
    u32 l4 = 40;
    u8 frag = 0;
    for (int i = 0; i < IP6_EXT_MAX; i++) {   // bounded: a chain longer than this is skipped
        if (nh != IP6_HOPOPTS && nh != IP6_ROUTING && nh != IP6_FRAGMENT && nh != IP6_DSTOPTS)
            break;
        u8 eh[8];
        if (l4 + 8 > avail || P_LOAD(c, off + l4, eh, sizeof(eh))) return -1;
        if (nh == IP6_FRAGMENT) {
            if ((((u16)eh[2] << 8) | eh[3]) & 0xfff8) frag = 1;   // offset != 0: not the first
            __builtin_memcpy(&p->ip_id, &eh[6], 2);   // identification, low 16 bits, network order
            l4 += 8;
        } else {
            l4 += ((u32)eh[1] + 1) * 8;
        }
        nh = eh[0];
        if (l4 > avail) return -1;
    }
    if (nh == IP6_HOPOPTS || nh == IP6_ROUTING || nh == IP6_FRAGMENT || nh == IP6_DSTOPTS)
        return -1;   // more extension headers than the loop reads: never guess the L4 header
#ifdef P_WIDEN
    P_WIDEN(c, l4);
#endif
    p->proto = nh;
    if (frag) {
        p->sport = p->dport = 0;
        p->tcp_flags = p->icmp_type = 0;
        p->tcp_seq = 0;
        return 0;
    }
    return P_(parse_l4)(c, off + l4, avail - l4, off, p);
}

// `off` is the IP header (IPv6 when `v6`). Decapsulates one level of VXLAN, Geneve or IP-in-IP
// (IPv4 in IPv4, protocol 4, as Calico's tunl0 sends it) so the event carries the inner packet
// and the outer addresses (and VNI).
static __always_inline int P_(parse_packet)(P_CTX c, u32 off, u32 avail, struct pkt *p, u8 v6) {
    int r = P_(parse_ip)(c, off, avail, p, v6);
    if (r < 0) return -1;
    u32 inner;      // the inner IP header's offset from `off`
    u8 kind;
    u32 vni = 0;
    u16 etype = ETH_P_IP_BE;   // the inner header's ethertype (IP-in-IP: IPv4 always)
    if (r == 0) {
        if (p->proto != IPPROTO_IPIP_ || v6) return 0;   // IPv4 in IPv4 only
        u8 h[8];
        if (P_LOAD(c, off, h, sizeof(h))) return 0;
        if ((h[6] & 0x1f) | h[7]) return 0;     // a later fragment: no inner header here
        inner = (u32)(h[0] & 0x0f) * 4;
        if (inner + 20 > avail) return -1;
        kind = ENCAP_IPIP;
    } else {
        u16 dport = ((p->dport & 0xff) << 8) | (p->dport >> 8);
        u32 hdr;        // tunnel header length before the inner Ethernet frame
        u8 th[8];
        u32 t = off + (u32)r;
        if (avail < (u32)r + 8) return 0;
        if (P_LOAD(c, t, th, sizeof(th))) return 0;
        if (dport == VXLAN_PORT || dport == VXLAN_PORT_LINUX) {
            if (!(th[0] & 0x08)) return 0;     // VNI-valid flag not set: not VXLAN
            kind = ENCAP_VXLAN;
            hdr = 8;
        } else if (dport == GENEVE_PORT) {
            u16 ptype = ((u16)th[2] << 8) | th[3];
            if ((th[0] >> 6) != 0 || ptype != ETH_P_TEB) return 0;
            kind = ENCAP_GENEVE;
            hdr = 8 + (u32)(th[0] & 0x3f) * 4;
        } else {
            return 0;
        }
        vni = ((u32)th[4] << 16) | ((u32)th[5] << 8) | th[6];
        inner = (u32)r + hdr + 14;
        if (inner > avail) return -1;
        if (P_LOAD(c, t + hdr + 12, &etype, 2)) return -1;
        if (etype != ETH_P_IP_BE && etype != ETH_P_IPV6_BE) return -1;
    }
#ifdef P_WIDEN
    P_WIDEN(c, inner);
#endif
    // The outer header set aside: its addresses where they will be reported, the rest here.
    struct pkt_l outer = p->l;
    __builtin_memcpy(p->osaddr, p->saddr, 16);
    __builtin_memcpy(p->odaddr, p->daddr, 16);
    if (outer.fam & FLAG_V6) {   // an IPv4 inner header fills 4 bytes: clear the outer's rest
        __builtin_memset(p->saddr, 0, 16);
        __builtin_memset(p->daddr, 0, 16);
    }
    if (P_(parse_ip)(c, off + inner, avail - inner, p, etype == ETH_P_IPV6_BE) < 0
        || (addr_eq(p->saddr, p->osaddr) && addr_eq(p->daddr, p->odaddr) && p->proto == outer.proto)) {
        // never report a half-parsed inner header as a packet
        __builtin_memcpy(p->saddr, p->osaddr, 16);
        __builtin_memcpy(p->daddr, p->odaddr, 16);
        __builtin_memset(p->osaddr, 0, 16);
        __builtin_memset(p->odaddr, 0, 16);
        p->l = outer;
        return -1;
    }
    if (outer.fam & FLAG_V6) p->fam |= FLAG_OUTER_V6;
    p->vni = vni;
    p->encap = kind;
    return 0;
}
