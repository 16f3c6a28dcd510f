"""Verdicts: what happened to a packet, in one sentence, with the runbook to follow."""

from __future__ import annotations

from dataclasses import replace

from tracer.node import ipvsfacts
from tracer.reconstruct import arrival, checked, dnat, loops, source
from tracer.reconstruct.evidence import Evidence, fact_query
from tracer.reconstruct.model import ConntrackView, Hop, Packet, Verdict

RUNBOOK_DIR = "docs/runbooks"

# Drop reason (kernel name without SKB_DROP_REASON_) → (hint, runbook file).
REASON_HINTS: dict[str, tuple[str, str]] = {
    "NETFILTER_DROP": (checked.chain_sentence(None), "netfilter-drop.md"),
    "IP_RPFILTER": ("reverse-path filtering rejected the source address (rp_filter strict with an "
                    "asymmetric route)", "rp-filter.md"),
    "IP_OUTNOROUTES": ("the node has no route for the destination", "no-route.md"),
    "IP_INNOROUTES": ("the node has no route for the destination", "no-route.md"),
    "NEIGH_FAILED": ("the next hop's MAC address could not be resolved (ARP/neighbour entry "
                     "missing)", "neighbour.md"),
    "NEIGH_QUEUEFULL": ("too many packets waiting for ARP resolution of the next hop", "neighbour.md"),
    "PKT_TOO_BIG": ("the packet is larger than the path MTU and has DF set", "mtu.md"),
    "NO_SOCKET": ("nothing listens on the destination port", "no-socket.md"),
    "OTHERHOST": ("the frame was addressed to another host's MAC", "neighbour.md"),
    "IP_INADDRERRORS": ("the destination address is not valid on this node", "no-route.md"),
    "VXLAN_INVALID_HDR": ("the overlay received a malformed VXLAN header", "overlay.md"),
    "VXLAN_VNI_NOT_FOUND": ("the overlay has no device for this VNI (VNI mismatch between nodes)", "overlay.md"),
    "NO_TX_TARGET": ("the overlay device has no FDB entry (no VTEP) for the destination MAC", "overlay.md"),
    "TC_INGRESS": ("a tc ingress program or filter dropped it", "tc-drop.md"),
    "TC_EGRESS": ("a tc egress program or filter dropped it", "tc-drop.md"),
}


def _where(node: str | None, dev: str | None) -> str:
    return f"{node or 'the fabric'}" + (f" ({dev})" if dev else "")


def delivered(node: str | None, dev: str | None, point: str | None) -> Verdict:
    """Arrived where it was addressed (at that node, device and point)."""
    return Verdict("delivered", node, dev, point)


def dropped(node: str | None, dev: str | None, reason: str, location: str | None,
            last: Hop | None = None) -> Verdict:
    """A drop event named the reason: the hint and runbook of that reason (`last`: the hop
    seen before the drop, which says which netfilter chain a NETFILTER_DROP met)."""
    hint, book = REASON_HINTS.get(reason, (f"the kernel dropped it ({reason})", "kernel-drop.md"))
    if reason == "NETFILTER_DROP" and last is not None:
        hint = checked.chain_sentence(last)
    return Verdict("dropped", node, dev, "drop", reason, location,
                   f"Dropped on {_where(node, dev)}: {hint}.", f"{RUNBOOK_DIR}/{book}")


def lost(node: str | None, dev: str | None, point: str | None) -> Verdict:
    """Seen last at a place, with no drop event after it."""
    return Verdict("lost", node, dev, point,
                   hint=(f"Last seen on {_where(node, dev)} ({point}); no drop "
                         "was observed after it: check routes, neighbour/FDB entries and MTU there."),
                   runbook=f"{RUNBOOK_DIR}/packet-lost.md")


# Causes: rules that read the evidence (node facts, netfilter counters, conntrack).
# Each rule looks only at what the trace and the node show; none knows how a fault was made.

def _set(v: Verdict, cause: str, hint: str, book: str, evidence: dict | None = None) -> Verdict:
    """The verdict with a cause, its sentence and runbook (and more evidence)."""
    return replace(v, cause=cause, hint=hint, runbook=f"{RUNBOOK_DIR}/{book}",
                   evidence=_with(v, **evidence) if evidence else v.evidence)


def _with(v: Verdict, **more) -> dict:
    """The verdict's evidence with more entries (a new dict)."""
    return {**(v.evidence or {}), **more}


def _rule_sentence(node: str, hit: dict) -> str:
    if hit.get("source") == "nft":
        return f"dropped on {node} by {checked.nft_where(hit)} rule `{hit['rule']}`"
    where = f"the {hit['chain']} chain of the {hit['table']} table"
    if hit["base_chain"] != hit["chain"]:
        where += f" (reached from {hit['base_chain']})"
    return f"dropped on {node} in {where} by rule `{hit['rule']}`"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def judge(packets: list[Packet], ev: Evidence) -> list[Packet]:
    """The packets with their verdicts refined by the evidence (new packets; the input stays)."""
    ev = dnat.learn(ev, packets)
    return [replace(p, verdict=explain(p, ev)) for p in packets]


def facts_needed(packets: list[Packet], ev: Evidence) -> dict[str, list[dict]]:
    """node → the fact queries `explain` will look up for these packets (no duplicates).
    Only the Service part of `ev` is read: it decides which replies are suspect."""
    out: dict[str, list[dict]] = {}
    ev = dnat.learn(ev, packets)
    for p in packets:
        for node in loops.loop_nodes(p) or [_facts_node(p, ev)]:
            also = checked.sender_node(p, node) if node and checked.overlay_suspect(p, p.verdict.reason) else None
            for n in (node, also):
                if n is not None:
                    q = fact_query(n, p)
                    if q not in out.setdefault(n, []):
                        out[n].append(q)
    return out


def _facts_node(packet: Packet, ev: Evidence) -> str | None:
    """The node whose facts `explain` consults for this packet, if any."""
    v = packet.verdict
    if v.status == "partial":
        return None
    if v.status == "delivered":
        return packet.hops[-1].node if _unreversed(packet, ev) else None
    if v.cause or _stale(packet, ev) is not None or source.inside_pod(packet):
        return None
    return v.node


def explain(packet: Packet, ev: Evidence) -> Verdict:
    """The packet's verdict refined with the cause the evidence supports (a new verdict)."""
    if packet.verdict.status == "partial":   # no view beyond: nothing to blame
        return packet.verdict
    v = _stale_dnat(packet, packet.verdict, ev)
    if v.status == "delivered" or (arrival.after(v) and _unreversed(packet, ev)):
        return _explain_delivered(packet, v, ev)
    loop = loops.find_loop(packet.hops)
    if loop is not None:
        return _routing_loop(packet, v, ev, loop)
    if v.cause or v.node is None:
        return v
    if source.inside_pod(packet) and not arrival.after(v):
        return source.explain_packet(packet, v, ev)   # the source pod's facts, not its node's
    if arrival.after(v):
        return arrival.explain(packet, v, ev)
    return _explain_lost(packet, v, ev)


def _explain_lost(packet: Packet, v: Verdict, ev: Evidence) -> Verdict:
    """A dropped or lost packet's cause, from its node's facts and rule hits."""
    node = v.node
    hops = packet.hops
    f = ev.facts(node, packet)
    if f is None:
        return replace(v, evidence=_with(v, node_facts=f"not available for {node} (not on this machine)"))
    v = replace(v, evidence=_with(v, node={k: f[k] for k in ("ip_forward", "rp_filter", "bridge_nf_call_iptables",
                                                             "conntrack", "mtu", "route", "next_hop") if k in f},
                                  links=checked.path_links(packet, node, f)))
    reason = v.reason
    last = hops[-1]
    hits = ev.rule_hits.get(node, [])
    if checked.overlay_suspect(packet, reason):
        sender = checked.sender_node(packet, node)
        found, compared = checked.overlay_port(packet, node, f, ev.facts(sender, packet) if sender else None)
        if found:
            return _set(v, *found)
        v = replace(v, evidence=_with(v, **compared))
    found = checked.link_down(packet, reason, node, f)
    if found:
        return _set(v, *found)
    if reason in ("TC_INGRESS", "TC_EGRESS"):
        return _bpf_drop(v, node, f)
    ct = f.get("conntrack") or {}
    # 1. forwarding disabled: the node received pod traffic it had to route
    if f.get("ip_forward") == 0 and last.point == "rx" and last.pod is None:
        return _set(v, "ip-forward-off",
                    f"ip_forward is off on {node} (net.ipv4.ip_forward=0): it received the packet on "
                    f"{last.dev} but does not route it on.", "ip-forward.md")
    dev_fwd = (f.get("forwarding") or {}).get(last.dev)
    if dev_fwd == 0 and last.point == "rx" and last.pod is None:
        return _set(v, "ip-forward-off",
                    f"Forwarding is off on {node}'s {last.dev} (net.ipv4.conf.{last.dev}.forwarding=0): "
                    "packets arriving there are not routed on.", "ip-forward.md")
    # 2a. kube-proxy's ipvs mode: the Service's virtual server takes no new connection
    # (IPVS drops the packet in LOCAL_IN and answers port unreachable; no rule counts it)
    found = _ipvs_unserved(packet, v, node, f)
    if found is not None:
        return found
    # 2. a netfilter rule counted our packets (the one naming the packet's addresses first)
    if hits and (reason in (None, "NETFILTER_DROP") or v.status == "lost"):
        return _netfilter(packet, replace(v, evidence=_with(v, netfilter=hits)), node, hits)
    found = checked.uncounted_rule(packet, node, f) if reason == "NETFILTER_DROP" else None
    if found:
        return _set(v, *found)
    # 3. conntrack table full: new connections are dropped before any rule
    if ct.get("count") is not None and ct.get("max") and ct["count"] >= ct["max"] * 0.98:
        return _set(v, "conntrack-full",
                    f"The conntrack table on {node} is full ({ct['count']}/{ct['max']} entries): new "
                    "connections are dropped.", "conntrack-full.md")
    # 4. reverse-path filter
    rb = f.get("route_back") or {}
    rpf = f.get("rp_filter") or {}
    arrived = last.dev if last.point == "rx" else None
    strict = max([x for x in (rpf.get("all"), rpf.get(arrived or "")) if isinstance(x, int)] or [0]) == 1
    if reason == "IP_RPFILTER" or (strict and arrived and rb.get("dev") and rb["dev"] != arrived):
        return _set(v, "rp-filter",
                    f"Strict reverse-path filtering on {node} (rp_filter all={rpf.get('all')}, "
                    f"{arrived}={rpf.get(arrived)}): the route back to {hops[0].src} leaves via "
                    f"{rb.get('dev')}, not {arrived} where the packet came in.", "rp-filter.md")
    # 5. no route
    rt = f.get("route") or {}
    if rt.get("error") or reason in ("IP_INNOROUTES", "IP_OUTNOROUTES"):
        return _set(v, "no-route", f"{node} has no route to {last.dst}"
                    + (f" ({rt['error']})" if rt.get("error") else "") + ".", "no-route.md")
    # 6a. a link refused a frame larger than its far end's MTU (veth/dev_forward_skb's check:
    # the kernel gives no reason, but the location says it)
    loc = (v.location or "").split("+")[0]
    if loc in ("__dev_forward_skb", "__dev_forward_skb2", "is_skb_forwardable", "dev_forward_skb"):
        frame = max((h.len or 0) for h in hops if h.node == node) or None
        return _set(v, "mtu", f"A {frame}-byte frame leaving {node}'s {v.dev or last.dev} is larger "
                    "than the other end of that link accepts (its MTU): an MTU mismatch on the link drops it "
                    "without any ICMP error (a black hole for full-size packets).", "mtu.md")
    # 6. MTU: the packet does not fit a device on the way out
    size = max(h.len or 0 for h in hops)
    ip_len = packet.ip_len or 0
    out_dev = rt.get("dev")
    out_mtu = (f.get("links") or {}).get(out_dev, {}).get("mtu") if out_dev else None
    # seen leaving through that device, it did fit (a GSO packet is cut to the MTU there)
    left_by_it = any(h.node == node and h.dev == out_dev and h.point == "tx" for h in hops)
    if reason == "PKT_TOO_BIG" or (out_mtu and ip_len > out_mtu and packet.df and not left_by_it):
        if ":" in (packet.five_tuple.src or ""):   # IPv6: routers never fragment, DF or not
            return _set(v, "mtu", f"A {ip_len or size}-byte IPv6 packet does not fit {out_dev} on {node} "
                        f"(MTU {out_mtu}); IPv6 is never fragmented on the way, so it is dropped (the "
                        "sender should get an ICMPv6 packet too big).", "mtu.md")
        return _set(v, "mtu", f"A {ip_len or size}-byte packet with DF set does not fit {out_dev} on {node} "
                    f"(MTU {out_mtu}); it is dropped instead of fragmented.", "mtu.md")
    # a netfilter drop is not the next hop's fault: its neighbour state is a consequence
    out = _next_hop(v, node, f, ev) if reason != "NETFILTER_DROP" else v
    return out if out.cause else _checked(packet, out, node, f, ev)


def _bpf_drop(v: Verdict, node: str, f: dict) -> Verdict:
    """A tc hook returned TC_ACT_SHOT: the program(s) attached there (from the node's tc
    filters) are what dropped it; no netfilter rule is involved, so none is looked for."""
    direction = "ingress" if v.reason == "TC_INGRESS" else "egress"
    progs = ((f.get("tc") or {}).get(v.dev or "") or {}).get(direction) or []
    where = f"{node}'s {v.dev} (tc {direction})"
    if not progs:
        return replace(v, hint=f"Dropped in BPF on {where}: a tc program or filter returned TC_ACT_SHOT "
                       "(none is attached there now: it may have been removed since).",
                       evidence=_with(v, tc={"dev": v.dev, "direction": direction, "programs": []}))

    def name(p: dict) -> str:
        return f"{p['prog_name']} (id {p['id']}, tc pref {p['pref']}{', filter ' + p['name'] if p.get('name') else ''})"

    if len(progs) == 1:
        what = f"BPF program {name(progs[0])} returned TC_ACT_SHOT"
    else:
        what = f"one of the BPF programs {', '.join(name(p) for p in progs)} returned TC_ACT_SHOT"
    return _set(v, "bpf-drop", f"Dropped in BPF on {where}: {what}; netfilter never saw the packet "
                "(a CNI's eBPF datapath: its policy, or a Service without backends).", "tc-drop.md",
                {"tc": {"dev": v.dev, "direction": direction, "programs": progs}})


def _checked(packet: Packet, v: Verdict, node: str, f: dict, ev: Evidence) -> Verdict:
    """No cause fits: the kernel's reason and place stay, the hint adds what was checked."""
    hint = v.hint or ""
    if v.reason == "NETFILTER_DROP":
        ips = [x.get("ip") for x in ev.vtep.values()]
        hint = f"Dropped on {_where(v.node, v.dev)}: {checked.chain_sentence(packet.hops[-1], ips)}."
    said = checked.all_normal(node, f, packet)
    return replace(v, hint=(hint.rstrip(".") + f"; {said}." if said else hint) or None)


def _routing_loop(packet: Packet, v: Verdict, ev: Evidence, loop: dict) -> Verdict:
    """The routing-loop cause, with the route of every node the loop crosses."""
    routes = {}
    for node in loop["nodes"]:
        f = ev.facts(node, packet)
        routes[node] = f.get("route") if f else None
    sentence, evidence = loops.describe(packet, loop, routes)
    return _set(v, "routing-loop", sentence, "routing-loop.md", evidence)


def _netfilter(packet: Packet, v: Verdict, node: str, hits: list[dict]) -> Verdict:
    """The cause a counted netfilter rule gives (the rule naming the packet's addresses first)."""
    hit = sorted(hits, key=lambda h: -_matches(h, packet))[0]
    if hit.get("policy"):
        return _set(v, "netfilter-policy",
                    f"Dropped on {node} by the {hit['policy']} policy of the {hit['chain']} chain "
                    f"({hit['table']} table): no rule accepted the packet.", "netfilter-drop.md")
    if "--ctstate INVALID" in hit["rule"] or "--state INVALID" in hit["rule"]:
        return _set(v, "conntrack-invalid", _cap(_rule_sentence(node, hit))
                    + ": conntrack classified the packet as INVALID (no connection it belongs to, "
                    "or outside that connection's TCP window).", "conntrack-invalid.md")
    if hit.get("comment") and "has no endpoints" in hit["comment"]:
        return _set(v, "service-no-endpoints",
                    f"Service {hit['comment'].split(' has no endpoints')[0]} has no endpoints: kube-proxy's "
                    f"{hit['target']} rule on {node} ({hit['table']}/{hit['chain']}) answered instead of a pod.",
                    "service-no-endpoints.md")
    return _set(v, "netfilter-rule", _cap(_rule_sentence(node, hit)) + ".", "netfilter-drop.md")


def _ipvs_unserved(packet: Packet, v: Verdict, node: str, f: dict) -> Verdict | None:
    """The service-no-endpoints cause when the IPVS virtual server of the packet's
    destination has no real server, or only real servers of weight 0."""
    t = packet.five_tuple
    vs = ipvsfacts.unserved(f.get("ipvs"), t.dst, t.dport, t.proto)
    if vs is None or v.reason not in (None, "NETFILTER_DROP"):
        return None
    where = f"{vs['vip']}:{vs['port']}" if ":" not in vs["vip"] else f"[{vs['vip']}]:{vs['port']}"
    why = ("has no real servers" if not vs["reals"] else
           f"has only real servers of weight 0 ({', '.join(r['ip'] for r in vs['reals'])}: terminating "
           "endpoints take no new connection)")
    return _set(v, "service-no-endpoints",
                f"The IPVS virtual server {where}/{vs['proto']} on {node} {why}: the Service has no "
                "usable endpoints, so IPVS dropped the packet (answering port unreachable) instead of "
                "forwarding it to a pod.", "service-no-endpoints.md", {"ipvs": vs})


def _next_hop(v: Verdict, node: str, f: dict, ev: Evidence) -> Verdict:
    """The cause the next hop gives: its neighbour entry and, on an overlay, the FDB."""
    nh = f.get("next_hop") or {}
    nb = nh.get("neigh")
    noarp = (f.get("links") or {}).get(nh.get("dev"), {}).get("noarp")
    if nh and not noarp and (nb is None or not nb.get("lladdr") or set(nb.get("state", [])) & {"FAILED", "INCOMPLETE"}):
        return _set(v, "neighbour-missing", f"{node} has no usable neighbour entry for the next hop "
                    f"{nh['ip']} on {nh['dev']} ({', '.join(nb['state']) if nb else 'none'}).", "neighbour.md")
    if nh.get("vxlan") is not None:
        owner = ev.vtep.get(nh["ip"])
        if owner and nb and nb.get("lladdr") != owner["mac"]:
            return _set(v, "neighbour-wrong",
                        f"On {node} the neighbour entry for {nh['ip']} ({owner['node']}'s {nh['dev']}) says "
                        f"{nb['lladdr']}, but that VTEP's MAC is {owner['mac']}.", "neighbour.md")
        if nh.get("fdb") is None:
            return _set(v, "fdb-missing", f"{node}'s {nh['dev']} has no FDB entry for {nb['lladdr'] if nb else '?'} "
                        f"(the VTEP of {owner['node'] if owner else nh['ip']}): VXLAN does not know where to send it.",
                        "overlay.md")
        if owner and owner.get("ip") and nh["fdb"].get("dst") != owner["ip"]:
            return _set(v, "fdb-wrong", f"{node}'s {nh['dev']} FDB sends {nb['lladdr']} to {nh['fdb']['dst']}, "
                        f"but {owner['node']} is at {owner['ip']}.", "overlay.md")
    return v


def _matches(hit: dict, packet: Packet) -> int:
    """How many of the packet's addresses a rule names (to prefer it over a rule that only
    happened to count other traffic during the trace)."""
    text = hit.get("rule", "")
    addrs = {a for h in packet.hops for a in (h.src, h.dst)}
    return sum(1 for a in addrs if a and ((a + "/32") in text or (a + "/128") in text or f" {a} " in text))


def _stale(packet: Packet, ev: Evidence) -> tuple[Hop, ConntrackView] | None:
    """(hop, conntrack view) of a Service request DNATed (by an existing conntrack entry) to
    an address that is no longer one of the Service's backends."""
    if not ev.vip or packet.direction != "request":
        return None
    for h in packet.hops:
        ct = h.ct
        if ct is None or not ct.orig or not ct.reply or ct.of == "outer":
            continue
        if ct.orig.dst == ev.vip and ct.reply.src != ev.vip and ct.reply.src not in ev.backends:
            return h, ct
    return None


def _stale_dnat(packet: Packet, v: Verdict, ev: Evidence) -> Verdict:
    """The verdict with the stale-conntrack cause when an old entry DNATed the request."""
    found = _stale(packet, ev)
    if found is None:
        return v
    h, ct = found
    reply = ct.reply
    return _set(v, "stale-conntrack",
                f"A conntrack entry on {h.node} ({ct.state}) still DNATs this flow to "
                f"{reply.src}:{reply.sport}, which is no longer a backend of {ev.service} "
                f"(backends now: {', '.join(ev.backends) or 'none'}).", "stale-conntrack.md",
                {"conntrack": ct.as_json()})


def _unreversed(packet: Packet, ev: Evidence) -> bool:
    """A reply that reached the client from the backend's address instead of the VIP (or
    from a DNAT target's address instead of the one the client sent to)."""
    if not ev.vip and packet.direction == "reply":
        return dnat.unreversed(packet, ev) is not None
    if not ev.vip or packet.direction != "reply":
        return False
    src = packet.hops[-1].src
    return src != ev.vip and src in ev.backends


def _explain_delivered(packet: Packet, v: Verdict, ev: Evidence) -> Verdict:
    """A delivered packet's verdict, flagged as a problem when it is an un-reversed reply."""
    if not _unreversed(packet, ev):
        return v
    last = packet.hops[-1]
    node = last.node
    f = ev.facts(node, packet) if node else None
    on_node = [h for h in packet.hops if h.node == node and h.pod is None]
    skipped = all(not h.ct for h in on_node)
    sentence = (f"The reply from backend {last.src} reached the client un-reversed (source should be "
                f"the VIP {ev.vip})")
    if not ev.vip:
        sentence = (f"The reply from DNAT target {last.src} reached the client un-reversed (source should "
                    f"be {dnat.unreversed(packet, ev)}, the address the client sent to)")
    if f and f.get("bridge_nf_call_iptables") == 0:
        sentence += (f": it was bridged on {node} without passing conntrack because "
                     f"bridge-nf-call-iptables is 0 there, so the reverse DNAT never happened.")
    elif skipped:
        sentence += f": it never passed conntrack on {node}, so the reverse DNAT never happened."
    else:
        sentence += "."
    v = _set(v, "unreversed-reply", sentence, "wrong-reply.md",
             {"node": {"bridge_nf_call_iptables": f.get("bridge_nf_call_iptables")} if f else None,
              "conntrack_seen_on_node": not skipped})
    return replace(v, problem=True)
