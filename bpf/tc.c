// tc clsact programs: the portable view of a device (stable __sk_buff, no BTF needed) and
// what a Cilium datapath sees. They only observe: every return is TC_ACT_UNSPEC, so the
// next filter (someone else's, or none) decides as if we were not there.

#define TC_ACT_UNSPEC_ (-1)

#define P_(name) tc_##name
#define P_CTX struct __sk_buff *
#define P_LOAD(c, off, dst, len) bpf_skb_load_bytes((c), (off), (dst), (len))
#include "parser.h"
#undef P_
#undef P_CTX
#undef P_LOAD

// Which device a program runs on: one program serves many devices in many namespaces, and
// in tc neither the netns cookie (it is the socket's, or init_net's) nor ifindex (per-netns)
// tells them apart. On tcx the program reads the device from the sk_buff (pt_tcx_*, below).
// With clsact filters (kernels before tcx) each attachment is two filters at adjacent priorities: a tiny stub
// with its own slot number, which notes slot + 1 in a per-CPU scratch map and lets the packet
// go on (TC_ACT_UNSPEC), then the shared program, which takes the slot and clears it. Filters
// of one hook run one after the other on one CPU, so the scratch holds this packet's slot.
// (No tail call: a prog_array left behind by a killed run could outlive it in the kernel.)
// User space fills tc_devs[slot] with the device's namespace inode and name.
struct tc_dev {
    u32 inum;
    char name[16];
};
BPF_ARRAY(tc_devs, struct tc_dev, TC_SLOTS);
BPF_PERCPU_ARRAY(tc_slot, u32, 1);

static __always_inline int tc_stub(struct __sk_buff *skb, u32 slot) {
    u32 zero = 0, mark = slot + 1;
    tc_slot.update(&zero, &mark);
    return TC_ACT_UNSPEC_;   // on to the next filter: ours, the shared program
}

// `own_dev`: the tcx programs (below), which read their device from the sk_buff; else the
// clsact pair's shared program, which takes its slot from the stub.
static __always_inline int on_tc(struct __sk_buff *skb, u8 hook, int own_dev) {
    struct pkt p = {};
    u32 zero = 0, slot = 0;
    if (!own_dev) {
        u32 *mark = tc_slot.lookup(&zero);
        if (mark) {             // take this packet's slot, and leave none for the next one
            slot = *mark;
            *mark = 0;
        }
    }
    count(C_SEEN);
    if (!is_ip(skb->protocol) || skb->len < 14) return TC_ACT_UNSPEC_;
    if (tc_parse_packet(skb, 14, skb->len - 14, &p, skb->protocol == ETH_P_IPV6_BE) < 0) return TC_ACT_UNSPEC_;
    // No skb following here (the tracepoints follow; a tc observer sees one device): the
    // address filter alone decides, which is why it holds the Service's backends too.
    if (!wanted(&p)) return TC_ACT_UNSPEC_;
    count(C_MATCHED);
    u32 ifindex = skb->ifindex, inum = 0;
    u8 name[16] = {};
    if (own_dev) {
        // A tc program's context is the kernel's sk_buff: its device (ifindex, name,
        // namespace) is read from there, as the tracepoints do.
        u8 buf[PT_SCRATCH];
        inum = read_dev((const u8 *)rd64(skb, SKB_DEV), &ifindex, buf);
        if (!netns_ok(inum)) return TC_ACT_UNSPEC_;
        __builtin_memcpy(name, buf + DEV_NAME_AT, 16);
    } else if (slot) {
        u32 idx = slot - 1;
        struct tc_dev *d = tc_devs.lookup(&idx);
        if (d) {
            if (!netns_ok(d->inum)) return TC_ACT_UNSPEC_;
            inum = d->inum;
            __builtin_memcpy(name, d->name, 16);
        }
    }
    u64 ts = bpf_ktime_get_ns();
    if (!guarded(&p, ts)) return TC_ACT_UNSPEC_;
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(C_LOST);
        return TC_ACT_UNSPEC_;
    }
    fill(e, &p, hook, 0, ts);
    e->skb = 0;
    e->location = 0;
    e->reason = 0;
    e->len = skb->len;
    e->ifindex = ifindex;
    e->netns = inum;
    __builtin_memcpy(e->ifname, name, sizeof(e->ifname));
    e->ct_info = 0;
    e->ct_status = 0;
    clear_ct_addrs(e);
    e->ct_orig_sport = e->ct_orig_dport = e->ct_reply_sport = e->ct_reply_dport = 0;
    events.ringbuf_submit(e, 0);
    count(C_EMITTED);
    return TC_ACT_UNSPEC_;
}

// clsact: the shared program of each stub + program pair.
int pt_tc_ingress(struct __sk_buff *skb) {
    return on_tc(skb, HOOK_TC_INGRESS, 0);
}

int pt_tc_egress(struct __sk_buff *skb) {
    return on_tc(skb, HOOK_TC_EGRESS, 0);
}

// tcx (Linux 6.6+): one program per hook, no stub. Each tcx link costs the kernel an RCU
// grace period (~10 ms) under the RTNL lock, so half the links is half the attach time.
int pt_tcx_ingress(struct __sk_buff *skb) {
    return on_tc(skb, HOOK_TC_INGRESS, 1);
}

int pt_tcx_egress(struct __sk_buff *skb) {
    return on_tc(skb, HOOK_TC_EGRESS, 1);
}
