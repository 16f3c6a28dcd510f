// Kernel-function hooks (kprobes/kretprobes). They share the parser, the filter, the skb
// following and the event record with the tracepoints; each tells one thing the device
// hooks cannot: a routing decision, a bridge forward, a netfilter verdict, a NAT rewrite, a
// conntrack confirm, a neighbour resolution, an overlay transmit, a local delivery.
// Where the kernel has no kprobes (CONFIG_KPROBES=n) these still compile and load; only the
// attach fails, and tracer/kernel/hooks.py falls back to the tracepoints.

// Argument and return registers, at pt_regs offsets read from BTF (KP_ARG*, KP_RC): the
// substitute headers' struct pt_regs is never used.
#define ARG(ctx, off) rd64((ctx), (off))
#define ARG1(ctx) ARG(ctx, KP_ARG1)
#define ARG2(ctx) ARG(ctx, KP_ARG2)
#define ARG3(ctx) ARG(ctx, KP_ARG3)
#define RC(ctx) ARG(ctx, KP_RC)

// Follow an skb seen inside a kernel function: the network header is set at every one of
// these functions, so the packet is read from head + network_header.
// Inlined into each program (BCC 0.26 cannot relocate bpf-to-bpf calls; kprobes cannot tail-call
// the tracepoints' shared program, another program type): compiling all of
// them costs ~0.6 s, so kprobes.c is compiled only where kprobes can attach (see tracer/kernel/hooks.py).
struct kp_scratch_t {
    u8 b[PT_ROOM];
    struct pt_pre pre;
};
BPF_PERCPU_ARRAY(kp_scratch, struct kp_scratch_t, 1);   // kprobes do not nest on a CPU

static __always_inline int on_kfunc(const u8 *skb, u8 hook, u32 aux, u64 aux2) {
    if (!skb) return 0;
    u32 zero = 0;
    struct kp_scratch_t *buf = kp_scratch.lookup(&zero);
    if (!buf) return 0;
    const u8 *head = (const u8 *)rd64(skb, SKB_HEAD);
    count(C_SEEN);
    buf->pre.parsed = 0;
    return on_packet(0, skb, head + skb_u16(skb, SKB_NETWORK_HEADER), hook, aux, aux2, buf->b, &buf->pre);
}

int kp_ip_rcv_core(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_IP_RCV, 0, 0);
}

int kp_ip_forward(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_IP_FORWARD, 0, 0);
}

int kp_ip_output(void *ctx) {          // ip_output(net, sk, skb)
    return on_kfunc((const u8 *)ARG3(ctx), HOOK_IP_OUTPUT, 0, 0);
}

int kp_ip_finish_output2(void *ctx) {  // ip_finish_output2(net, sk, skb)
    return on_kfunc((const u8 *)ARG3(ctx), HOOK_IP_FINISH_OUTPUT2, 0, 0);
}

int kp_br_forward(void *ctx) {         // br_forward(to, skb, local_rcv, local_orig)
    return on_kfunc((const u8 *)ARG2(ctx), HOOK_BR_FORWARD, 0, 0);
}

int kp_br_handle_frame(void *ctx) {    // br_handle_frame(struct sk_buff **pskb)
    const u8 *skb = (const u8 *)rd64((const void *)ARG1(ctx), 0);
    return on_kfunc(skb, HOOK_BR_HANDLE_FRAME, 0, 0);
}

int kp_nf_nat_manip_pkt(void *ctx) {   // nf_nat_manip_pkt(skb, ct, mtype, dir)
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_NAT, (u32)ARG3(ctx), 0);
}

int kp_nf_conntrack_confirm(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_CT_CONFIRM, 0, 0);
}

int kp_neigh_resolve_output(void *ctx) {   // neigh_resolve_output(neigh, skb)
    return on_kfunc((const u8 *)ARG2(ctx), HOOK_NEIGH_OUTPUT, 0, 0);
}

int kp_vxlan_xmit(void *ctx) {         // vxlan_xmit(skb, dev): the inner frame
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_VXLAN_XMIT, 0, 0);
}

int kp_tcp_v4_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_TCP_, 0);
}

int kp_udp_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_UDP_, 0);
}

int kp_icmp_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_ICMP_, 0);
}

// IPv6: the same hop points, under the same hook ids. (A failed IPv6 route lookup has no
// return value to read, ip6_route_input() is void: its drop shows at kfree_skb.)
int kp_ip6_rcv_core(void *ctx) {       // ip6_rcv_core(skb, dev, net)
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_IP_RCV, 0, 0);
}

int kp_ip6_forward(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_IP_FORWARD, 0, 0);
}

int kp_ip6_output(void *ctx) {         // ip6_output(net, sk, skb)
    return on_kfunc((const u8 *)ARG3(ctx), HOOK_IP_OUTPUT, 0, 0);
}

int kp_ip6_finish_output2(void *ctx) { // ip6_finish_output2(net, sk, skb)
    return on_kfunc((const u8 *)ARG3(ctx), HOOK_IP_FINISH_OUTPUT2, 0, 0);
}

int kp_tcp_v6_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_TCP_, 0);
}

int kp_udpv6_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_UDP_, 0);
}

int kp_icmpv6_rcv(void *ctx) {
    return on_kfunc((const u8 *)ARG1(ctx), HOOK_LOCAL_IN, IPPROTO_ICMPV6_, 0);
}

// Entry/return pairs: the return value is the verdict, the skb comes from the entry.
struct stash {
    u64 skb;
    u32 aux;
};
BPF_HASH(stashed, u64, struct stash, MAX_STASHED);

static __always_inline int stash_skb(const u8 *skb, u32 aux) {
    u64 id = bpf_get_current_pid_tgid();
    struct stash s = {.skb = (u64)skb, .aux = aux};
    stashed.update(&id, &s);
    return 0;
}

static __always_inline struct stash *unstash(void) {
    u64 id = bpf_get_current_pid_tgid();
    return stashed.lookup(&id);
}

// nf_hook_slow(skb, state, e, s): 1 = accepted, 0 = stolen or queued, <0 = dropped.
int kp_nf_hook_slow(void *ctx) {
    const u8 *state = (const u8 *)ARG2(ctx);
    u8 hooknum = 0;
    bpf_probe_read_kernel(&hooknum, 1, state + NF_HOOK_STATE_HOOK);
    return stash_skb((const u8 *)ARG1(ctx), hooknum);
}

int krp_nf_hook_slow(void *ctx) {
    struct stash *s = unstash();
    if (!s) return 0;
    u64 skb = s->skb;
    u32 hooknum = s->aux;
    u64 id = bpf_get_current_pid_tgid();
    stashed.delete(&id);
    int ret = (int)RC(ctx);
    if (ret == 1) return 0;   // accepted: the device hooks show where it went next
    return on_kfunc((const u8 *)skb, HOOK_NF_VERDICT, (u32)ret, hooknum);
}

// ip_route_input_noref(): nonzero return = the route lookup failed (an errno, or a drop
// reason on kernels where it returns enum skb_drop_reason).
int kp_ip_route_input(void *ctx) {
    return stash_skb((const u8 *)ARG1(ctx), 0);
}

int krp_ip_route_input(void *ctx) {
    struct stash *s = unstash();
    if (!s) return 0;
    u64 skb = s->skb;
    u64 id = bpf_get_current_pid_tgid();
    stashed.delete(&id);
    int ret = (int)RC(ctx);
    if (ret == 0) return 0;
    return on_kfunc((const u8 *)skb, HOOK_ROUTE_FAIL, (u32)ret, 0);
}
