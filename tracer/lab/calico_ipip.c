// The calico lab's IP-in-IP tunnel, for kernels without the ipip driver (CONFIG_NET_IPIP):
// two tc programs that do what ipip_tunnel_xmit and ipip_rcv do for Calico's `tunl0`.
//
// encap, on tunl0's egress: the packet the node routed `via PEER-NODE-IP dev tunl0 onlink`
// gets an outer IPv4 header (protocol 4, from this node's underlay address to PEER-NODE-IP,
// DF, TTL and TOS of the inner packet) and leaves by the device the peer's address is
// routed through, its MAC header written by the neighbour subsystem.
// decap, on the uplink's ingress: a protocol-4 packet addressed to this host loses its outer
// header and is received again on tunl0 (as ipip_rcv hands it to the tunnel device).
//
// Both run after the filters at lower priorities (a tracer's observers see tunl0's inner
// packet and the uplink's outer one first). Helpers are called by number and the FIB
// lookup's struct declared here: the compiler's headers may predate them.

#define TC_ACT_OK_ 0
#define TC_ACT_SHOT_ 2
#define ETH_HLEN_ 14
#define IPV4_HLEN_ 20
#define IPPROTO_IPIP_ 4
#define PACKET_HOST_ 0
#define ADJ_ROOM_MAC_ 1
#define F_ADJ_ROOM_FIXED_GSO_ 1
#define F_ADJ_ROOM_ENCAP_L3_IPV4_ 2
#define FIB_LOOKUP_SKIP_NEIGH_ 4
#define FIB_LOOKUP_SRC_ 16
#define REDIRECT_INGRESS_ 1

struct fib4 {               // struct bpf_fib_lookup, IPv4 part (64 bytes)
    u8 family;
    u8 l4_protocol;
    u16 sport;
    u16 dport;
    u16 tot_len;            // mtu_result on output
    u32 ifindex;
    u32 tos;                // a union of tos, flowinfo and rt_metric
    u32 ipv4_src;
    u32 pad1[3];
    u32 ipv4_dst;
    u32 pad2[3];
    u16 h_vlan_proto;
    u16 h_vlan_TCI;
    u8 smac[6];
    u8 dmac[6];
};

static long (*fib_lookup_)(void *ctx, struct fib4 *params, int plen, u32 flags) = (void *)69;
static long (*adjust_room_)(struct __sk_buff *skb, s32 len_diff, u32 mode, u64 flags) = (void *)50;
static long (*redirect_neigh_)(u32 ifindex, void *params, int plen, u64 flags) = (void *)152;
static long (*redirect_)(u32 ifindex, u64 flags) = (void *)23;

struct ip4 {
    u8 vihl;
    u8 tos;
    u16 tot_len;
    u16 id;
    u16 frag_off;
    u8 ttl;
    u8 protocol;
    u16 check;
    u32 saddr;
    u32 daddr;
};

static __always_inline u16 ip_csum(struct ip4 *h) {
    u16 *w = (u16 *)h;
    u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++) sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

int calico_ipip_encap(struct __sk_buff *skb) {
    struct ip4 in = {};
    if (skb->protocol != bpf_htons(0x0800) || bpf_skb_load_bytes(skb, ETH_HLEN_, &in, sizeof(in)))
        return TC_ACT_SHOT_;
    // The route that sent it here names the peer node as gateway: that is the tunnel's far end.
    struct fib4 f = {};
    f.family = 2;
    f.ipv4_dst = in.daddr;
    f.ifindex = skb->ifindex;
    if (fib_lookup_(skb, &f, sizeof(f), FIB_LOOKUP_SKIP_NEIGH_) != 0 || f.ipv4_dst == in.daddr)
        return TC_ACT_SHOT_;
    u32 remote = f.ipv4_dst;
    struct fib4 o = {};
    o.family = 2;
    o.ipv4_dst = remote;
    o.ifindex = skb->ifindex;
    if (fib_lookup_(skb, &o, sizeof(o), FIB_LOOKUP_SKIP_NEIGH_ | FIB_LOOKUP_SRC_) != 0)
        return TC_ACT_SHOT_;
    struct ip4 out = {};
    out.vihl = 0x45;
    out.tos = in.tos;
    out.tot_len = bpf_htons(bpf_ntohs(in.tot_len) + IPV4_HLEN_);
    out.id = in.id;
    out.frag_off = bpf_htons(0x4000);
    out.ttl = in.ttl;
    out.protocol = IPPROTO_IPIP_;
    out.saddr = o.ipv4_src;
    out.daddr = remote;
    out.check = ip_csum(&out);
    if (adjust_room_(skb, IPV4_HLEN_, ADJ_ROOM_MAC_, F_ADJ_ROOM_FIXED_GSO_ | F_ADJ_ROOM_ENCAP_L3_IPV4_))
        return TC_ACT_SHOT_;
    if (bpf_skb_store_bytes(skb, ETH_HLEN_, &out, sizeof(out), 0))
        return TC_ACT_SHOT_;
    return redirect_neigh_(o.ifindex, 0, 0, 0);
}

int calico_ipip_decap(struct __sk_buff *skb) {
    struct ip4 out = {};
    if (skb->protocol != bpf_htons(0x0800) || skb->pkt_type != PACKET_HOST_
        || bpf_skb_load_bytes(skb, ETH_HLEN_, &out, sizeof(out))
        || out.protocol != IPPROTO_IPIP_ || out.vihl != 0x45
        || (out.frag_off & bpf_htons(0x3fff)))      // a fragment: the stack reassembles it
        return TC_ACT_OK_;
    if (adjust_room_(skb, -IPV4_HLEN_, ADJ_ROOM_MAC_, F_ADJ_ROOM_FIXED_GSO_))
        return TC_ACT_SHOT_;
    return redirect_(TUNL0_IFINDEX, REDIRECT_INGRESS_);
}
