// The lab's own eBPF datapath (`podtrace lab up --cni cilium --datapath ebpf`): small tc
// programs that forward pod traffic the way Cilium's do, so podtrace can be tried on such a
// path. Not a tracer program: the lab loads it once per node (its maps are that node's).
//
//   cil_from_container  lxc* ingress (what a pod sends): Service DNAT, then a local pod by
//                       bpf_redirect_peer, a remote pod by bpf_redirect_neigh into
//                       cilium_vxlan, anything else up the host stack
//   cil_from_overlay    cilium_vxlan ingress (decapsulated traffic): reverse NAT, policy,
//                       bpf_redirect_peer into the pod
//   cil_from_host       cilium_host egress (the node's own traffic to pods): bpf_redirect
//                       to the lxc device, or bpf_redirect_neigh into cilium_vxlan
//
// Policy (the endpoint's ingress policy) is enforced where a packet is delivered to a local
// pod: a deny entry (source, destination) in cil_policy makes the program return
// TC_ACT_SHOT. Replies to a Service are reverse-NATed from cil_revnat, which the DNAT fills
// (no conntrack: netfilter never sees these packets).
// Defined by the loader: VXLAN_IFINDEX (cilium_vxlan's ifindex on this node).

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#define IP_OFF 14
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)
#define AF_INET_ 2
// Map sizes: a lab has at most 16 nodes of 8 pods and two Services.
#define LAB_PODS 256
#define LAB_NODES 64
#define LAB_SERVICES 64
#define LAB_FLOWS 4096
#define LAB_PICK_MULT 0xcc9e2d51u   // spreads flows over a Service's backends

struct ep {            // a pod on this node, by its IPv4 address
    u32 ifindex;       // its lxc device
    u8 mac[6];         // the pod's eth0 MAC
    u8 lxc_mac[6];     // the lxc device's MAC
};
BPF_HASH(cil_endpoints, u32, struct ep, LAB_PODS);
BPF_HASH(cil_tunnel, u32, u32, LAB_NODES);            // remote pod /24 → that node's router IP

struct svc_key { u32 vip; u16 port; u8 proto; u8 pad; };
BPF_HASH(cil_services, struct svc_key, u32, LAB_SERVICES);    // → number of backends
struct be_key { u32 vip; u16 port; u8 proto; u8 idx; };
struct be_val { u32 ip; u16 port; u16 pad; };
BPF_HASH(cil_backends, struct be_key, struct be_val, LAB_PODS);
struct rev_key { u32 client; u32 backend; u16 cport; u16 bport; u8 proto; u8 pad[3]; };
struct rev_val { u32 vip; u16 vport; u16 pad; };
BPF_TABLE("lru_hash", struct rev_key, struct rev_val, cil_revnat, LAB_FLOWS);
struct pol_key { u32 src; u32 dst; };
BPF_HASH(cil_policy, struct pol_key, u32, LAB_SERVICES);      // deny entries

static __always_inline int csum_off(u8 proto, int l4off) {
    if (proto == IPPROTO_TCP) return l4off + 16;
    if (proto == IPPROTO_UDP) return l4off + 6;
    return 0;
}

static __always_inline void set_addr(struct __sk_buff *skb, u8 proto, int l4off, int where,
                                     u32 old, u32 new) {
    int c = csum_off(proto, l4off);
    if (c)
        bpf_l4_csum_replace(skb, c, old, new, BPF_F_PSEUDO_HDR | sizeof(new) |
                            (proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0));
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new));
    bpf_skb_store_bytes(skb, where, &new, sizeof(new), 0);
}

static __always_inline void set_port(struct __sk_buff *skb, u8 proto, int l4off, int which,
                                     u16 old, u16 new) {
    int c = csum_off(proto, l4off);
    if (c)
        bpf_l4_csum_replace(skb, c, old, new, sizeof(new) |
                            (proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0));
    bpf_skb_store_bytes(skb, l4off + which, &new, sizeof(new), 0);
}

static __always_inline int dec_ttl(struct __sk_buff *skb, struct iphdr *ip) {
    if (ip->ttl <= 1) return -1;
    u16 old, new;
    u8 w[2] = {ip->ttl, ip->protocol};
    __builtin_memcpy(&old, w, 2);
    w[0] = ip->ttl - 1;
    __builtin_memcpy(&new, w, 2);
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 2);
    bpf_skb_store_bytes(skb, IP_OFF + 8, w, 1, 0);
    return 0;
}

static __always_inline int forward(struct __sk_buff *skb, int at_ingress, int do_svc) {
    struct iphdr ip;
    if (skb->protocol != bpf_htons(ETH_P_IP)) return TC_ACT_OK;
    if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0) return TC_ACT_OK;
    if (ip.version != 4 || ip.ihl < 5) return TC_ACT_OK;
    int l4off = IP_OFF + ip.ihl * 4;
    u16 ports[2] = {};
    int have_ports = (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP)
                     && !(ip.frag_off & bpf_htons(0x1fff));
    if (have_ports && bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0) return TC_ACT_OK;

    // Service DNAT (what a pod sends to a ClusterIP).
    if (do_svc && have_ports) {
        struct svc_key sk = {.vip = ip.daddr, .port = ports[1], .proto = ip.protocol};
        u32 *n = cil_services.lookup(&sk);
        if (n) {
            if (*n == 0) return TC_ACT_SHOT;        // a Service without backends
            u32 h = (ip.saddr ^ ((u32)ports[0] << 16) ^ ports[0]) * LAB_PICK_MULT;
            u32 idx = (h >> 24) % *n;
            struct be_key bk = {.vip = ip.daddr, .port = ports[1], .proto = ip.protocol,
                                .idx = (u8)idx};
            struct be_val *be = cil_backends.lookup(&bk);
            if (be && be->ip == ip.saddr && *n > 1) {
                // Not the client itself (hairpin would need SNAT, which the lab leaves out).
                bk.idx = (u8)((idx + 1) % *n);
                be = cil_backends.lookup(&bk);
            }
            if (!be) return TC_ACT_SHOT;
            struct rev_key rk = {.client = ip.saddr, .backend = be->ip, .cport = ports[0],
                                 .bport = be->port, .proto = ip.protocol};
            struct rev_val rv = {.vip = ip.daddr, .vport = ports[1]};
            cil_revnat.update(&rk, &rv);
            u32 bip = be->ip;
            u16 bport = be->port;
            set_addr(skb, ip.protocol, l4off, IP_DST_OFF, ip.daddr, bip);
            set_port(skb, ip.protocol, l4off, 2, ports[1], bport);
            ip.daddr = bip;
            ports[1] = bport;
        }
    }

    struct ep *e = cil_endpoints.lookup(&ip.daddr);
    if (e) {
        // The destination endpoint's ingress policy.
        struct pol_key pk = {.src = ip.saddr, .dst = ip.daddr};
        if (cil_policy.lookup(&pk)) return TC_ACT_SHOT;
        if (have_ports) {       // a reply from a Service backend: back to the ClusterIP
            struct rev_key rk = {.client = ip.daddr, .backend = ip.saddr, .cport = ports[1],
                                 .bport = ports[0], .proto = ip.protocol};
            struct rev_val *rv = cil_revnat.lookup(&rk);
            if (rv) {
                u32 vip = rv->vip;
                u16 vport = rv->vport;
                set_addr(skb, ip.protocol, l4off, IP_SRC_OFF, ip.saddr, vip);
                set_port(skb, ip.protocol, l4off, 0, ports[0], vport);
            }
        }
        if (dec_ttl(skb, &ip) < 0) return TC_ACT_OK;   // let the stack send the ICMP error
        u8 macs[12];
        __builtin_memcpy(macs, e->mac, 6);
        __builtin_memcpy(macs + 6, e->lxc_mac, 6);
        bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0);
        return at_ingress ? bpf_redirect_peer(e->ifindex, 0) : bpf_redirect(e->ifindex, 0);
    }
    u32 net = ip.daddr & bpf_htonl(0xffffff00);
    u32 *nh = cil_tunnel.lookup(&net);
    if (nh) {
        if (dec_ttl(skb, &ip) < 0) return TC_ACT_OK;
        struct bpf_redir_neigh p = {};
        p.nh_family = AF_INET_;
        p.ipv4_nh = *nh;
        // BCC's own declaration of this helper predates its plen argument.
        return ((long (*)(u32, struct bpf_redir_neigh *, int, u64))BPF_FUNC_redirect_neigh)(
            VXLAN_IFINDEX, &p, sizeof(p), 0);
    }
    return TC_ACT_OK;       // not for a pod: the host stack routes it
}

int cil_from_container(struct __sk_buff *skb) {
    return forward(skb, 1, 1);
}

int cil_from_overlay(struct __sk_buff *skb) {
    return forward(skb, 1, 0);
}

int cil_from_host(struct __sk_buff *skb) {
    return forward(skb, 0, 1);
}
