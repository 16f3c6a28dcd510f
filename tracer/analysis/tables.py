"""Summary tables from the packets of either path: flows (5-tuples, NAT joined), drops by place."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracer.analysis.frames import _by_ip, _factorize, _lookup
from tracer.analysis.trace import COLUMNS, STATUSES

def _ep_keys(*pairs: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """One code per (address key, port), in one code space for all the pairs given (address
    keys are 64 bits: no room to pack a port beside them)."""
    ips = np.concatenate([np.asarray(ip).astype(np.int64) for ip, _ in pairs])
    ports = np.concatenate([np.asarray(port).astype(np.int64) & 0xFFFF for _, port in pairs])
    code = _factorize(ips, ports)
    return np.split(code, np.cumsum([len(ip) for ip, _ in pairs])[:-1])


def flow_table(packets: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """One row per flow: a 5-tuple, with the tuples NAT turned it into joined to it."""
    if packets.empty:
        out = pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS["flows"]})
        out.attrs["packet_flow"] = np.zeros(0, dtype=np.int64)
        return out
    proto = packets["_proto"].to_numpy().astype(np.int64)
    a, b, fa, fb = _ep_keys(*((packets[ip].to_numpy(), packets[port].to_numpy()) for ip, port in
                              (("_src", "_sport"), ("_dst", "_dport"), ("_fsrc", "_fsport"), ("_fdst", "_fdport"))))
    t2_raw = np.stack([proto, np.minimum(fa, fb), np.maximum(fa, fb)])
    # one code space for first- and last-hop tuples
    allk = np.concatenate([np.stack([proto, np.minimum(a, b), np.maximum(a, b)]), t2_raw], axis=1)
    code = _factorize(allk[0], allk[1], allk[2])
    t1, t2 = code[: len(proto)], code[len(proto):]
    root = np.arange(code.max() + 1)
    changed = t1 != t2
    if changed.any():
        edges = np.unique(np.stack([t1[changed], t2[changed]], axis=1), axis=0)
        parent = list(range(len(root)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for x, y in edges.tolist():
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        root = np.array([find(i) for i in range(len(root))])
    comp = root[t1]
    first_ts = packets["first_ts_ns"].to_numpy()
    # flows numbered by their first packet; the first packet's tuple stands for the flow
    order = np.lexsort((first_ts, comp))
    firsts = order[np.r_[True, comp[order][1:] != comp[order][:-1]]]
    firsts = firsts[np.argsort(first_ts[firsts], kind="stable")]
    flow_of_comp = np.empty(comp.max() + 1, dtype=np.int64)
    flow_of_comp[comp[firsts]] = np.arange(len(firsts))
    flow = flow_of_comp[comp]
    rep = firsts[flow]
    fwd = (a == a[rep]) | (fb == b[rep])
    if packets["direction"].isna().all():
        packets["direction"] = pd.Categorical.from_codes(np.where(fwd, 0, 1), categories=["forward", "reverse"])
    nf = len(firsts)
    st = packets["status"]
    st_codes = (st.cat.codes.to_numpy() if hasattr(st, "cat") and list(st.cat.categories) == STATUSES
                else pd.Categorical(st.astype(str), categories=STATUSES).codes)
    pods, svcs = _by_ip(meta)
    ow = packets["one_way_ns"].astype("float64").to_numpy()
    by_time = np.lexsort((first_ts, flow))      # packets by flow, then time
    svc = _first_per(flow, by_time, nf, [_lookup(packets[cc].to_numpy(), svcs) for cc in ("_dst", "_src", "_fdst", "_fsrc")])
    peer = _first_per(flow, by_time, nf, [np.where(fwd, _lookup(packets["_fdst"].to_numpy(), pods),
                                                   _lookup(packets["_fsrc"].to_numpy(), pods))])
    # the destination pod's own port: after DNAT (a Service's backend listens on its targetPort)
    dst_pod_port = _first_per(flow, by_time, nf, [
        np.where(fwd & ~pd.isna(_lookup(packets["_fdst"].to_numpy(), pods)),
                 packets["final_dport"].astype("Int64").to_numpy(dtype=object, na_value=None), None),
        np.where(~fwd & ~pd.isna(_lookup(packets["_src"].to_numpy(), pods)),
                 packets["sport"].astype("Int64").to_numpy(dtype=object, na_value=None), None)])
    q = (pd.DataFrame({"flow": flow, "ow": ow}).groupby("flow")["ow"].quantile([0.5, 0.99]).unstack()
         .reindex(range(nf)))
    p = packets.iloc[firsts]
    dst_pod = _lookup(p["_dst"].to_numpy(), pods)
    out = pd.DataFrame({
        "flow": np.arange(nf),
        "proto": p["proto"].to_numpy(),
        "src": p["src"].astype(str).to_numpy(), "sport": p["sport"].astype("Int64").array,
        "dst": p["dst"].astype(str).to_numpy(), "dport": p["dport"].astype("Int64").array,
        "src_pod": _lookup(p["_src"].to_numpy(), pods),
        # the pod itself, or for a Service (NATed) flow the backend it turned out to be
        "dst_pod": np.where(pd.isna(dst_pod), peer, dst_pod),
        "dst_pod_port": pd.array(np.where(pd.isna(dst_pod_port), p["dport"].astype("Int64").to_numpy(
            dtype=object, na_value=None), dst_pod_port), dtype="Int64"),
        "service": svc,
        "packets": np.bincount(flow, minlength=nf),
        "forward": np.bincount(flow, weights=fwd, minlength=nf).astype(np.int64),
        **{s: np.bincount(flow[st_codes == i], minlength=nf) for i, s in enumerate(STATUSES)},
        "bytes": np.bincount(flow, weights=packets["ip_len"].to_numpy(), minlength=nf).astype(np.int64),
        "p50_ns": q[0.5].to_numpy(), "p99_ns": q[0.99].to_numpy(),
        "first_ts_ns": first_ts[firsts],
        "last_ts_ns": _max_per(flow, packets["last_ts_ns"].to_numpy(), nf),
        "nodes": _flow_nodes(packets, flow, nf),
        "tcp_flags": _flow_tcp_flags(packets, flow, nf),
    })
    out.insert(out.columns.get_loc("forward") + 1, "reverse", out["packets"] - out["forward"])
    out.attrs["packet_flow"] = flow
    return out


def _first_per(group: np.ndarray, order: np.ndarray, n: int, candidates: list[np.ndarray]) -> np.ndarray:
    """Per group, the first (in `order`) non-missing value, trying candidates in turn."""
    out = np.full(n, None, dtype=object)
    for cand in candidates:
        vals = cand[order]
        ok = ~pd.isna(vals)
        idx = np.flatnonzero(ok)
        g = group[order][idx]
        ug, at = np.unique(g, return_index=True)
        fill = pd.isna(out[ug])
        out[ug[fill]] = vals[idx[at]][fill]
    return out


def _max_per(group: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(out, group, v.astype(np.int64))
    return out


def _flow_nodes(packets: pd.DataFrame, flow: np.ndarray, n: int) -> np.ndarray:
    """Nodes each flow's packets were seen on (first and last hop), as "node-1,node-2":
    one bit per node OR-ed per flow, then each distinct set named once."""
    names = pd.concat([packets["first_node"], packets["last_node"]]).to_numpy()
    codes, uniq = pd.factorize(names)
    if len(uniq) > 62:
        return np.full(n, "", dtype=object)
    bits = np.where(codes >= 0, np.left_shift(1, np.maximum(codes, 0)), 0).astype(np.int64)
    mask = np.zeros(n, dtype=np.int64)
    np.bitwise_or.at(mask, np.concatenate([flow, flow]), bits)
    mcodes, muniq = pd.factorize(mask)
    label = [",".join(sorted(str(uniq[i]) for i in range(len(uniq)) if m >> i & 1)) for m in muniq]
    return np.array(label, dtype=object)[mcodes]


def _flow_tcp_flags(packets: pd.DataFrame, flow: np.ndarray, n: int) -> np.ndarray:
    """The TCP flags each flow's packets carried, each once, in the order first seen
    ("S S. . P. F."); None for a flow without TCP packets."""
    out = np.full(n, None, dtype=object)
    if "tcp_flags" not in packets or not n:
        return out
    cat = pd.Categorical(packets["tcp_flags"])
    codes = cat.codes.astype(np.int64)
    has = codes >= 0
    if not has.any():
        return out
    pairs = pd.DataFrame({"flow": flow[has], "flags": np.asarray(cat.categories, dtype=object)[codes[has]],
                          "t": packets["first_ts_ns"].to_numpy()[has]})
    firsts = pairs.groupby(["flow", "flags"], sort=False)["t"].min().reset_index()
    firsts = firsts.sort_values(["flow", "t"], kind="stable")
    joined = firsts.groupby("flow", sort=False)["flags"].agg(" ".join)
    out[joined.index.to_numpy()] = joined.to_numpy()
    return out


def drop_table(packets: pd.DataFrame) -> pd.DataFrame:
    """Dropped packets by reason, node, device and kernel location."""
    cols = COLUMNS["drops"]
    d = packets[packets["status"].astype(str) == "dropped"] if len(packets) else packets
    if d.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("count", "flows") else "object")
                             for c in cols})
    keys = ["reason", "verdict_node", "verdict_dev", "location"]
    d = d.assign(**{k: d[k].astype(object).where(d[k].notna(), "") for k in keys})
    g = d.groupby(keys, sort=False, observed=True)
    out = g.agg(count=("packet", "size"), flows=("flow", "nunique"),
                first_ts_ns=("first_ts_ns", "min"), last_ts_ns=("last_ts_ns", "max")).reset_index()
    out = out.rename(columns={"verdict_node": "node", "verdict_dev": "dev"})
    for k in ("reason", "node", "dev", "location"):
        out[k] = out[k].replace("", None)
    return out.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)[cols]
