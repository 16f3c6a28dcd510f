"""DNAT the inventory does not know, read from the packets' own hops.

A hostPort (CNI portmap), a NodePort, an externalIP or a rule someone wrote rewrites a
request's destination on the way. Conntrack records it (the entry's reply tuple comes from
the target) and the hops show the destination changing. Arriving at the target is delivery,
the target's answers are the flow's replies, and an answer that reaches the client from the
target's own address (not the one the client sent to) is an un-reversed reply.
A Service's DNAT is the inventory's (its backends): this module leaves it alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from tracer.kernel.record import HOOK_IDS
from tracer.reconstruct.model import Hop, Packet

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd

# Annotations name FlowInput (packets.py) and Evidence (evidence.py) without importing them:
# packets.py imports this module.

IPS_DST_NAT = 0x20    # include/uapi/linux/netfilter/nf_conntrack_common.h


def applies(fi: "FlowInput") -> bool:
    """Whether the flow's destination may be DNATed without the inventory knowing (not a Service)."""
    return fi.dst.service is None and bool(fi.dst.ip)


def of_hops(hops: Iterable[Hop], dst: str) -> list[str]:
    """The addresses a request sent to `dst` was DNATed to along these hops: the reply tuple
    of a conntrack entry that rewrote `dst`, or the destination seen after it changed."""
    hops = list(hops)
    out: list[str] = []
    for h in hops:
        ct = h.ct
        if (ct is not None and ct.orig is not None and ct.reply is not None and ct.of != "outer"
                and ct.nat and "dnat" in ct.nat and ct.orig.dst == dst and ct.reply.src
                and ct.reply.src != dst and ct.reply.src not in out):
            out.append(ct.reply.src)
    for a, b in zip(hops, hops[1:]):
        if a.dst == dst and b.dst and b.dst != dst and b.dst not in out:
            out.append(b.dst)
    return out


def targets_in_events(df: pd.DataFrame, fi: "FlowInput") -> frozenset[str]:
    """The addresses the flow's requests were DNATed to, from the raw hop events (before the
    packets are built: the targets' answers are the flow's replies)."""
    if not applies(fi) or df.empty or "pkt" not in df:
        return frozenset()
    src, dst = fi.src.ip, fi.dst.ip
    hop = df[~df["hook"].isin([HOOK_IDS["drop"], HOOK_IDS["consume"]]) & (df["pkt"] >= 0)]
    s, d = hop["saddr_str"].astype(str), hop["daddr_str"].astype(str)
    out: set[str] = set()
    if "ct_orig_dst_str" in hop and "ct_status" in hop:
        rs = hop["ct_reply_src_str"].astype(str)
        m = ((hop["ct_orig_src_str"].astype(str) == src) & (hop["ct_orig_dst_str"].astype(str) == dst)
             & ((hop["ct_status"].astype("int64") & IPS_DST_NAT) != 0) & (rs != dst) & (rs != ""))
        out |= set(rs[m])
    # the destination changed within a packet the client sent to dst
    sent = set(hop.loc[(s == src) & (d == dst), "pkt"])
    if sent:
        m = hop["pkt"].isin(sent) & (s == src) & (d != dst) & (d != "")
        out |= set(d[m])
    return frozenset(out)


def client_aliases(df: pd.DataFrame, fi: "FlowInput") -> frozenset[str]:
    """The addresses the client's requests carried as source after an SNAT that came with
    the DNAT (a NodePort's masquerade, a Service's hairpin masquerade when the client is the
    backend chosen): the target answers to them before the reverse NAT."""
    targets = set(fi.dnat) | (set(fi.dst.service.backend_ips) if fi.dst.service else set())
    if not targets or df.empty or "pkt" not in df:
        return frozenset()
    src, dst = fi.src.ip, fi.dst.ip
    hop = df[~df["hook"].isin([HOOK_IDS["drop"], HOOK_IDS["consume"]]) & (df["pkt"] >= 0)]
    s, d = hop["saddr_str"].astype(str), hop["daddr_str"].astype(str)
    sent = set(hop.loc[(s == src) & (d == dst), "pkt"])
    m = hop["pkt"].isin(sent) & (s != src) & (s != "") & d.isin(targets)
    return frozenset(set(s[m]))


def target_netns(fi: "FlowInput", hops: Iterable[Hop], ip: str) -> set[int]:
    """The namespaces of a DNAT target: the pod or node the inventory gives that address
    (none when no traced pod or node has it), else, for a trace saved without the addresses,
    the one pod namespace the packet was received in with that destination."""
    pl = fi.placement
    node, pod = (fi.addresses or {}).get(ip, (None, None))
    if pod:
        return pl.pod_netns(pod)
    if node:
        return pl.node_netns(node)
    if fi.addresses:      # the traced pods and nodes are known, and none has that address
        return set()
    got = {h.netns for h in hops if h.point == "rx" and h.pod is not None and h.dst == ip}
    return got if len(got) == 1 else set()


def retarget(fi: "FlowInput", hops: list[Hop], direction: str, targets: set[int],
             want: set[str]) -> tuple[set[int], set[str]]:
    """(namespaces, addresses) where a request counts as arrived: the DNAT target's when the
    request was DNATed on the way, else the ones given."""
    if direction != "request" or not applies(fi):
        return targets, want
    found = [ip for ip in of_hops(hops, fi.dst.ip) if ip != fi.dst.ip]
    if not found:
        return targets, want
    ns: set[int] = set()
    for ip in found:
        ns |= target_netns(fi, hops, ip)
    return ns, set(found)


def learn(ev: "Evidence", packets: list[Packet]) -> "Evidence":
    """The evidence with the DNATs the requests show (target → the address the client sent
    to); a Service flow's evidence stays as it is."""
    if ev.vip or ev.dnat:
        return ev
    found: dict[str, str] = {}
    for p in packets:
        if p.direction != "request":
            continue
        dst = p.five_tuple.dst
        for ip in of_hops(p.hops, dst):
            found.setdefault(ip, dst)
    return ev.with_dnat(found) if found else ev


def unreversed(packet: Packet, ev: "Evidence") -> str | None:
    """The address the client sent to, when this reply reached it from the DNAT target's own
    address instead (no reverse NAT); else None."""
    if packet.direction != "reply" or ev.vip or not ev.dnat or not packet.hops:
        return None
    src = packet.hops[-1].src
    orig = ev.dnat.get(src)
    return orig if orig and orig != src else None


def mark_unreversed(packets: pd.DataFrame) -> None:
    """The capture tables' rule (vectorised.py): a delivered packet from a DNAT target back to
    the client that still carries the target's address (the DNATed packet's final
    destination, where the client sent to another) gets cause `unreversed-reply`, in place."""
    import pandas as pd
    if packets.empty or "_fdst" not in packets:
        return
    p = packets
    nat = p.loc[(p["_dst"] != p["_fdst"]) & (p["_fdst"] != 0)]
    if nat.empty:
        return
    want = pd.DataFrame({"_proto": nat["_proto"].to_numpy(), "_src": nat["_fdst"].to_numpy(),
                         "_sport": nat["_fdport"].to_numpy(),
                         "_dst": nat["_src"].to_numpy(), "_dport": nat["_sport"].to_numpy(),
                         "_orig": nat["_dst"].to_numpy(), "_orig_ip": nat["dst"].astype(str).to_numpy()})
    want = want.drop_duplicates(["_proto", "_src", "_sport", "_dst", "_dport"])
    cand = p[["_proto", "_src", "_sport", "_dst", "_dport", "_fsrc"]].reset_index()
    hit = cand.merge(want, on=["_proto", "_src", "_sport", "_dst", "_dport"], how="inner")
    delivered = (p["status"].astype(str) == "delivered").to_numpy()
    idx = hit["index"].to_numpy()
    ok = (hit["_fsrc"].to_numpy() == hit["_src"].to_numpy()) & (hit["_orig"].to_numpy() != hit["_src"].to_numpy())
    rows = [i for i, good in zip(idx, ok) if good and delivered[p.index.get_loc(i)]]
    if not rows:
        return
    orig = dict(zip(hit["index"], hit["_orig_ip"]))
    for i in rows:
        src = str(p.at[i, "src"])
        p.at[i, "cause"] = "unreversed-reply"
        p.at[i, "hint"] = (f"The reply from DNAT target {src} reached the client un-reversed (source should "
                           f"be {orig[i]}, the address the client sent to).")
        p.at[i, "runbook"] = "docs/runbooks/wrong-reply.md"
