"""Native nftables rules: their counters before/after a trace, their drop rules, readable.

Read with `nft -j list ruleset` run in the node's namespace (a subprocess: the nftables
Python binding is not part of the tracer's environment, the `nft` command is wherever
nftables is). Tables that iptables-nft (or ebtables-nft/arptables-nft) manages are left out:
their rules are counted through `iptables-save -c` already. Nothing here changes anything.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Callable

# The tables the xtables-nft tools create, by family: those are not native tables.
COMPAT = {"ip": {"filter", "nat", "mangle", "raw", "security"},
          "ip6": {"filter", "nat", "mangle", "raw", "security"},
          "arp": {"filter"}, "bridge": {"filter", "nat", "broute"}}
DROPS = ("drop", "reject")
# kube-proxy's nftables mode: its table, the map of Services without endpoints and the
# chain their packets are rejected in.
KUBE_PROXY_TABLE = "kube-proxy"
KUBE_PROXY_NO_ENDPOINTS = "no-endpoint-services"
KUBE_PROXY_REJECT = "reject-chain"


def read(in_node: Callable) -> tuple[list[dict], str | None]:
    """The native rules of the node (`in_node(*argv)` → CompletedProcess in its namespace)."""
    try:
        r = in_node("nft", "-j", "list", "ruleset")
    except (OSError, ValueError) as exc:
        return [], f"nft: {exc}"
    if r.returncode != 0:
        return [], r.stderr.strip() or f"nft exit {r.returncode}"
    try:
        doc = json.loads(r.stdout or "{}")
    except json.JSONDecodeError:
        return [], "nft: unparsable output"
    return rules(doc), None


def rules(doc: dict) -> list[dict]:
    """`nft -j list ruleset` → one dict per rule of a native table."""
    items = doc.get("nftables") or []
    hooks = {}
    for it in items:
        c = it.get("chain") if isinstance(it, dict) else None
        if c:
            hooks[(c.get("family"), c.get("table"), c.get("name"))] = c.get("hook")
    unserved = no_endpoint_services(items)
    out = []
    for it in items:
        r = it.get("rule") if isinstance(it, dict) else None
        if not r or r.get("table") in COMPAT.get(r.get("family"), ()):
            continue
        exprs = r.get("expr") or []
        counter = next((e["counter"] for e in exprs if isinstance(e, dict) and "counter" in e), None)
        verdict = next((k for e in exprs if isinstance(e, dict) for k in e if k in DROPS), None)
        fam, table, chain = r.get("family"), r.get("table"), r.get("chain")
        comment = r.get("comment")
        if table == KUBE_PROXY_TABLE and chain == KUBE_PROXY_REJECT and unserved.get(fam):
            # kube-proxy's reject for Services without endpoints: say which ones it serves
            comment = f"{', '.join(unserved[fam])} has no endpoints"
        out.append({"family": fam, "table": table, "chain": chain, "handle": r.get("handle"),
                    "hook": hooks.get((fam, table, chain)), "rule": render(exprs),
                    "packets": counter.get("packets") if isinstance(counter, dict) else None,
                    "verdict": verdict, "addrs": _addrs(exprs), "comment": comment})
    return out


def no_endpoint_services(items: list) -> dict[str, list[str]]:
    """nft family → the Services (namespace/name) in kube-proxy's `no-endpoint-services`
    map, from its elements' comments ("namespace/name:port")."""
    out: dict[str, list[str]] = {}
    for it in items:
        m = it.get("map") if isinstance(it, dict) else None
        if not m or m.get("table") != KUBE_PROXY_TABLE or m.get("name") != KUBE_PROXY_NO_ENDPOINTS:
            continue
        for pair in m.get("elem") or []:
            key = pair[0] if isinstance(pair, list) and pair else None
            note = key.get("elem", {}).get("comment") if isinstance(key, dict) else None
            if note:
                name = note.rsplit(":", 1)[0]
                if name not in out.setdefault(m.get("family"), []):
                    out[m["family"]].append(name)
    return out


def hits(before: list[dict], after: list[dict]) -> list[dict]:
    """Counted native drop/reject rules whose counter moved, in the shape of iptables hits."""
    was = {_key(r): r.get("packets") or 0 for r in before}
    out = []
    for r in after:
        if r["verdict"] is None or r["packets"] is None:
            continue
        delta = r["packets"] - was.get(_key(r), 0)
        if delta > 0:
            out.append(hit(r, delta))
    return sorted(out, key=lambda h: -h["packets"])


def hit(r: dict, packets: int | None) -> dict:
    """One rule as a netfilter hit (packets None: the rule has no counter)."""
    return {"table": f"{r['family']} {r['table']}", "chain": r["chain"], "base_chain": r["chain"],
            "index": r["handle"], "rule": r["rule"], "target": (r["verdict"] or "").upper(),
            "packets": packets, "comment": r.get("comment"), "source": "nft", "hook": r.get("hook"),
            "addrs": r.get("addrs")}


def uncounted_drops(rules_: list[dict]) -> list[dict]:
    """Native drop/reject rules without a counter: they drop without leaving a count."""
    return [hit(r, None) for r in rules_ if r["verdict"] and r["packets"] is None]


def matches(rule: dict, addresses) -> bool:
    """A rule that names one of these addresses (as an address, a prefix or a set member)."""
    ips = []
    for a in addresses:
        try:
            ips.append(ipaddress.ip_address(a))
        except (TypeError, ValueError):
            continue
    for spec in (rule.get("addrs") or {}).values():
        for s in spec:
            try:
                net = ipaddress.ip_network(s, strict=False)
            except ValueError:
                continue
            if any(ip.version == net.version and ip in net for ip in ips):
                return True
    return False


def _key(r: dict) -> tuple:
    return r["family"], r["table"], r["chain"], r["handle"]


def _addrs(exprs: list) -> dict[str, list[str]]:
    """saddr/daddr → the addresses or prefixes a rule matches with `==` (or a set of them)."""
    out: dict[str, list[str]] = {}
    for e in exprs:
        m = e.get("match") if isinstance(e, dict) else None
        if not m or m.get("op") not in ("==", "in"):
            continue
        left = (m.get("left") or {}).get("payload") if isinstance(m.get("left"), dict) else None
        if not left or left.get("field") not in ("saddr", "daddr") or left.get("protocol") not in ("ip", "ip6"):
            continue
        out.setdefault(left["field"], []).extend(_values(m.get("right")))
    return out


def _values(right) -> list[str]:
    if isinstance(right, str):
        return [right]
    if isinstance(right, dict):
        if "prefix" in right:
            return [f"{right['prefix']['addr']}/{right['prefix']['len']}"]
        if "set" in right:
            return [v for x in right["set"] for v in _values(x)]
        if "range" in right:
            return []
    if isinstance(right, list):
        return [v for x in right for v in _values(x)]
    return []


def render(exprs: list) -> str:
    """A rule's expressions in nft's own words (enough to recognise it; not a full printer)."""
    words = []
    for e in exprs:
        if not isinstance(e, dict) or not e:
            continue
        k, v = next(iter(e.items()))
        if k == "match":
            op = v.get("op")
            words.append(f"{_operand(v.get('left'))} {'' if op in ('==', 'in') else op + ' '}"
                         f"{_operand(v.get('right'))}")
        elif k == "counter":
            words.append("counter")
        elif k in ("accept", "drop", "continue", "return"):
            words.append(k)
        elif k == "reject":
            words.append("reject" + (f" with {v['type']}" if isinstance(v, dict) and v.get("type") else ""))
        elif k in ("jump", "goto"):
            words.append(f"{k} {v.get('target')}")
        elif k == "log":
            words.append("log")
        else:
            words.append(k)
    return " ".join(words)


def _operand(x) -> str:
    if isinstance(x, dict):
        if "payload" in x:
            p = x["payload"]
            return f"{p.get('protocol', 'raw')} {p.get('field', '')}".strip()
        if "meta" in x:
            return x["meta"].get("key", "meta")
        if "ct" in x:
            return f"ct {x['ct'].get('key')}"
        if "prefix" in x:
            return f"{x['prefix']['addr']}/{x['prefix']['len']}"
        if "set" in x:
            return "{ " + ", ".join(_operand(y) for y in x["set"]) + " }"
        if "range" in x:
            return "-".join(_operand(y) for y in x["range"])
        return json.dumps(x, separators=(",", ":"))
    if isinstance(x, list):
        return "{ " + ", ".join(_operand(y) for y in x) + " }"
    return str(x)
