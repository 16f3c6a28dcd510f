"""The hook catalog: every hook podtrace can use, declared once, with its availability here.

Each hook has its kind, what it tells, the BPF function that serves it and what stands in
when it is unavailable; `detect()` says which hooks this kernel offers (shared by `flow`
and `doctor`)."""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from tracer.kernel import formats
from tracer.errors import EnvironmentProblem


@dataclass(frozen=True)
class Hook:
    name: str                # stable id, e.g. "kprobe:ip_forward"
    kind: str                # tracepoint | kprobe | kretprobe | fentry | tc
    target: str              # "net:netif_receive_skb", a kernel function, or "ingress"/"egress"
    tells: str               # what the hook shows about a packet
    fn: str                  # BPF function (bpf/*.c)
    fallback: str | None     # the hook that covers for it when unavailable
    source: str              # bpf/ file holding fn
    ret_fn: str | None = None  # kretprobe companion


CATALOG: list[Hook] = [
    Hook("tp:netif_receive_skb", "tracepoint", "net:netif_receive_skb", "device rx", "pt_rx", "tc:ingress", "podtrace.c"),
    Hook("tp:net_dev_start_xmit", "tracepoint", "net:net_dev_start_xmit", "device tx", "pt_tx", "tc:egress", "podtrace.c"),
    Hook("tp:kfree_skb", "tracepoint", "skb:kfree_skb", "drop (reason, location)", "pt_kfree", None, "podtrace.c"),
    Hook("tp:consume_skb", "tracepoint", "skb:consume_skb", "end of a buffer (delivered/consumed)", "pt_consume", None, "podtrace.c"),
    Hook("tc:ingress", "tc", "ingress", "device rx as the datapath sees it (tc; by default only where another tc program runs)", "pt_tc_ingress", None, "tc.c"),
    Hook("tc:egress", "tc", "egress", "device tx as the datapath sees it (tc; by default only where another tc program runs)", "pt_tc_egress", None, "tc.c"),
    Hook("kprobe:ip_rcv_core", "kprobe", "ip_rcv_core", "IP receive", "kp_ip_rcv_core", "tp:netif_receive_skb", "kprobes.c"),
    Hook("kprobe:ip_forward", "kprobe", "ip_forward", "routing decision: forward", "kp_ip_forward", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:ip_output", "kprobe", "ip_output", "routing decision: local output", "kp_ip_output", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:ip_finish_output2", "kprobe", "ip_finish_output2", "IP output to the neighbour layer", "kp_ip_finish_output2", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:br_handle_frame", "kprobe", "br_handle_frame", "bridge port receive", "kp_br_handle_frame", "tp:netif_receive_skb", "kprobes.c"),
    Hook("kprobe:br_forward", "kprobe", "br_forward", "bridge forward", "kp_br_forward", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kretprobe:nf_hook_slow", "kretprobe", "nf_hook_slow", "netfilter hook and verdict", "kp_nf_hook_slow", "tp:kfree_skb", "kprobes.c", "krp_nf_hook_slow"),
    Hook("kprobe:nf_nat_manip_pkt", "kprobe", "nf_nat_manip_pkt", "NAT rewrite", "kp_nf_nat_manip_pkt", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:__nf_conntrack_confirm", "kprobe", "__nf_conntrack_confirm", "conntrack confirm", "kp_nf_conntrack_confirm", None, "kprobes.c"),
    Hook("kretprobe:ip_route_input_noref", "kretprobe", "ip_route_input_noref", "route lookup failure", "kp_ip_route_input", "tp:kfree_skb", "kprobes.c", "krp_ip_route_input"),
    Hook("kprobe:neigh_resolve_output", "kprobe", "neigh_resolve_output", "neighbour (ARP) resolution", "kp_neigh_resolve_output", "tp:kfree_skb", "kprobes.c"),
    Hook("kprobe:vxlan_xmit", "kprobe", "vxlan_xmit", "overlay transmit (before encapsulation)", "kp_vxlan_xmit", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:tcp_v4_rcv", "kprobe", "tcp_v4_rcv", "local delivery to TCP", "kp_tcp_v4_rcv", "tp:consume_skb", "kprobes.c"),
    Hook("kprobe:udp_rcv", "kprobe", "udp_rcv", "local delivery to UDP", "kp_udp_rcv", "tp:consume_skb", "kprobes.c"),
    Hook("kprobe:icmp_rcv", "kprobe", "icmp_rcv", "local delivery to ICMP", "kp_icmp_rcv", "tp:consume_skb", "kprobes.c"),
    # IPv6: the same hop points (their events carry the IPv4 functions' hook ids)
    Hook("kprobe:ip6_rcv_core", "kprobe", "ip6_rcv_core", "IPv6 receive", "kp_ip6_rcv_core", "tp:netif_receive_skb", "kprobes.c"),
    Hook("kprobe:ip6_forward", "kprobe", "ip6_forward", "routing decision: forward (IPv6)", "kp_ip6_forward", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:ip6_output", "kprobe", "ip6_output", "routing decision: local output (IPv6)", "kp_ip6_output", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:ip6_finish_output2", "kprobe", "ip6_finish_output2", "IPv6 output to the neighbour layer", "kp_ip6_finish_output2", "tp:net_dev_start_xmit", "kprobes.c"),
    Hook("kprobe:tcp_v6_rcv", "kprobe", "tcp_v6_rcv", "local delivery to TCP (IPv6)", "kp_tcp_v6_rcv", "tp:consume_skb", "kprobes.c"),
    Hook("kprobe:udpv6_rcv", "kprobe", "udpv6_rcv", "local delivery to UDP (IPv6)", "kp_udpv6_rcv", "tp:consume_skb", "kprobes.c"),
    Hook("kprobe:icmpv6_rcv", "kprobe", "icmpv6_rcv", "local delivery to ICMPv6", "kp_icmpv6_rcv", "tp:consume_skb", "kprobes.c"),
]
BY_NAME = {h.name: h for h in CATALOG}
DEFAULT_HOOKS = ["tp:netif_receive_skb", "tp:net_dev_start_xmit", "tp:kfree_skb", "tp:consume_skb"]


@dataclass(frozen=True)
class Status:
    hook: Hook
    available: bool
    reason: str | None = None     # why not, when unavailable


@functools.lru_cache(maxsize=1)
def kernel_config() -> dict[str, str]:
    """CONFIG_* values from /proc/config.gz or /boot/config-$(uname -r); {} when neither."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        out = {}
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                out[line[2:-11]] = "n"
        return out
    return {}


@functools.lru_cache(maxsize=1)
def _kallsyms() -> frozenset[str]:
    try:
        with open("/proc/kallsyms") as f:
            return frozenset(line.split()[2] for line in f)
    except OSError:
        return frozenset()


def _tracepoint_ok(target: str) -> tuple[bool, str | None]:
    cat, ev = target.split(":")
    try:
        root = formats.tracefs_root()
    except EnvironmentProblem as exc:
        return False, exc.line()
    if not (root / "events" / cat / ev / "format").exists():
        return False, f"tracepoint {target} does not exist on this kernel"
    return True, None


def _kprobes_ok() -> tuple[bool, str | None]:
    cfg = kernel_config()
    if cfg.get("CONFIG_KPROBES") == "n":
        return False, "kprobes are disabled in this kernel (CONFIG_KPROBES is not set)"
    if not cfg and not Path("/sys/kernel/tracing/kprobe_events").exists() \
            and not Path("/sys/kernel/debug/tracing/kprobe_events").exists():
        return False, "no kprobe_events in tracefs (kprobes unavailable or tracefs not mounted)"
    return True, None


def status(hook: Hook) -> Status:
    if hook.kind == "tracepoint":
        ok, why = _tracepoint_ok(hook.target)
        return Status(hook, ok, why)
    if hook.kind in ("kprobe", "kretprobe"):
        ok, why = _kprobes_ok()
        if ok and hook.target not in _kallsyms():
            ok, why = False, f"{hook.target} is not a kernel symbol here (inlined or renamed)"
        return Status(hook, ok, why)
    if hook.kind == "tc":
        from tracer import settings
        from tracer.kernel import tcx

        if settings.tc_attach() != "clsact" and tcx.supported():
            return Status(hook, True, "by tcx links where a device has no clsact qdisc (nothing added to it)")
        cfg = kernel_config()
        if cfg and (cfg.get("CONFIG_NET_CLS_BPF") == "n" or cfg.get("CONFIG_NET_SCH_INGRESS") == "n"):
            return Status(hook, False, "tc BPF classifier or clsact qdisc not built in this kernel")
        return Status(hook, True)
    return Status(hook, False, f"unknown hook kind {hook.kind}")


def detect() -> list[Status]:
    return [status(h) for h in CATALOG]


def select(statuses: list[Status], tc: bool = True) -> tuple[list[Hook], list[str]]:
    """The hooks a trace uses on this kernel, and one line per degradation.

    Tracepoints always (they are the backbone); every available kprobe; tc when asked. An
    unavailable hook is reported with what covers for it."""
    chosen: list[Hook] = []
    degraded: list[str] = []
    missing_kprobes = []
    for st in statuses:
        h = st.hook
        if h.kind == "tc" and not tc:
            continue
        if st.available:
            chosen.append(h)
        elif h.kind in ("kprobe", "kretprobe"):
            missing_kprobes.append(st)
        else:
            degraded.append(f"{h.name} unavailable ({st.reason})"
                            + (f"; {h.fallback} covers it" if h.fallback else ""))
    if missing_kprobes:
        reasons = sorted({st.reason for st in missing_kprobes})
        degraded.append(f"{len(missing_kprobes)} kernel-function hooks unavailable ({'; '.join(reasons)}); "
                        "device tracepoints and tc show every hop, without routing/netfilter verdict detail")
    if not any(h.kind == "tracepoint" for h in chosen):
        raise EnvironmentProblem("no usable tracepoint (net:netif_receive_skb …)",
                                 "mount tracefs: mount -t tracefs tracefs /sys/kernel/tracing")
    return chosen, degraded
