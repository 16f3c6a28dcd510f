// The packet parser, written once and instantiated per way of reading packet bytes:
// P_(name) names the instance, P_CTX is what locates the packet, P_LOAD(c, off, dst, len)
// copies `len` bytes at offset `off` (0 on success). Kernel hooks read through an sk_buff's
// linear data with bpf_probe_read_kernel; tc programs with bpf_skb_load_bytes.

// Parse an IPv4 header at `off` (with `avail` bytes readable from there) and its L4 header.
// Returns the offset of the UDP payload (to look for a tunnel), 0 when done, <0 when the
// packet is not IPv4 or is truncated: such packets are skipped, never misread.
static __always_inline int P_(parse_ip)(P_CTX c, u32 off, u32 avail, struct pkt *p) {
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
    __builtin_memcpy(&p->saddr, &iph[12], 4);
    __builtin_memcpy(&p->daddr, &iph[16], 4);
    p->sport = p->dport = 0;
    p->tcp_flags = p->icmp_type = 0;
    p->tcp_seq = 0;
    if (frag) return 0;   // a non-first fragment has no L4 header
    u32 l4 = off + ihl;
    u32 left = avail - ihl;
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
        return ihl + 8;
    } else if (p->proto == IPPROTO_ICMP_) {
        u8 ih[8];
        if (left < 8 || P_LOAD(c, l4, ih, sizeof(ih))) return -2;
        p->icmp_type = ih[0];
        __builtin_memcpy(&p->sport, &ih[4], 2);   // echo id
        __builtin_memcpy(&p->dport, &ih[6], 2);   // echo seq
    }
    return 0;
}

// `off` is the IP header. Decapsulates one level of VXLAN or Geneve so the event carries the
// inner packet and the outer addresses and VNI.
static __always_inline int P_(parse_packet)(P_CTX c, u32 off, u32 avail, struct pkt *p) {
    int r = P_(parse_ip)(c, off, avail, p);
    if (r <= 0) return r == 0 ? 0 : -1;
    u16 dport = ((p->dport & 0xff) << 8) | (p->dport >> 8);
    u32 hdr;        // tunnel header length before the inner Ethernet frame
    u8 kind;
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
    u32 vni = ((u32)th[4] << 16) | ((u32)th[5] << 8) | th[6];
    u32 inner = (u32)r + hdr + 14;
    if (inner > avail) return -1;
    u16 etype = 0;
    if (P_LOAD(c, t + hdr + 12, &etype, 2)) return -1;
    if (etype != ETH_P_IP_BE) return -1;
    struct pkt outer = *p;
    if (P_(parse_ip)(c, off + inner, avail - inner, p) < 0) {
        *p = outer;   // never report a half-parsed inner header as a packet
        return -1;
    }
    if (p->saddr == outer.saddr && p->daddr == outer.daddr && p->proto == outer.proto) return -1;
    p->osaddr = outer.saddr;
    p->odaddr = outer.daddr;
    p->vni = vni;
    p->encap = kind;
    return 0;
}
