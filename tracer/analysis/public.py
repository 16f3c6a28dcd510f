"""The frames a Trace hands out: documented columns only, with the types a person reads.

Both reconstructions keep numeric working columns (`_proto`, `_src`, …) for the flow join;
they go here. What stays gets its reading type: integers that may be missing as pandas
nullable `Int64` (not floats with NaN), drop reasons and other names as categoricals, the
fabric's hops labelled, and a wall-clock `time` (`datetime64[ns, UTC]`) beside every
monotonic timestamp, from the file's `clock.realtime_offset_ns` (NaT when the file has none).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FABRIC = "(fabric)"     # the `node` of a hop in the lab's fabric (between the nodes)

# columns of integers that are missing where they do not apply (ICMP ports, no tunnel, …)
INT_COLUMNS = {
    "packets": ["seq", "sport", "dport", "final_sport", "final_dport", "ip_id", "ip_len", "one_way_ns",
                "tuple_sport", "tuple_dport"],
    "hops": ["seq", "sport", "dport", "vni", "ifindex", "netns", "len", "ttl"],
    "flows": ["sport", "dport"],
}
NAME_COLUMNS = {   # names, few distinct values: categoricals
    "packets": ["reason", "location"],
    "drops": ["reason", "location"],
}
TIME_OF = {"events": "ts_ns", "hops": "ts_ns", "packets": "first_ts_ns", "flows": "first_ts_ns",
           "drops": "first_ts_ns"}


def realtime_offset(meta: dict) -> int | None:
    """ns to add to the trace's `ts_ns` for UTC nanoseconds since the epoch, if the file says."""
    off = (meta.get("clock") or {}).get("realtime_offset_ns")
    return int(off) if isinstance(off, (int, np.integer)) and not isinstance(off, bool) else None


def wall_clock(ts_ns, meta: dict) -> pd.DatetimeIndex:
    """The UTC time of monotonic `ts_ns` values (NaT without the file's clock offset)."""
    off = realtime_offset(meta)
    ts = np.asarray(ts_ns, dtype=np.int64)
    if off is None:
        return pd.DatetimeIndex(np.full(len(ts), np.datetime64("NaT"), dtype="datetime64[ns]")).tz_localize("UTC")
    return pd.DatetimeIndex((ts + off).view("datetime64[ns]")).tz_localize("UTC")


def publish(name: str, df: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """`df` (one of the Trace's tables) as the API hands it out, in place where possible."""
    private = [c for c in df.columns if str(c).startswith("_")]
    if private:
        df = df.drop(columns=private)
    for c in INT_COLUMNS.get(name, ()):
        if c in df.columns and df[c].dtype != "Int64":
            df[c] = _to_int64(df[c])
    for c in NAME_COLUMNS.get(name, ()):
        if c in df.columns and not isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(object).where(df[c].notna(), None).astype("category")
    if name == "hops":
        _fabric(df, meta)
    if name == "events" and "reason" in df.columns and "reason_name" not in df.columns:
        df["reason_name"] = _reason_names(df, meta)
    ts = TIME_OF.get(name)
    if ts in df.columns and "time" not in df.columns:
        df.insert(df.columns.get_loc(ts) + 1, "time", wall_clock(df[ts].to_numpy(), meta))
    return df


def _to_int64(s: pd.Series) -> pd.Series:
    vals = s.astype(object).where(s.notna(), None)
    return pd.array([None if v is None else int(v) for v in vals], dtype="Int64") if s.dtype == object \
        else s.astype("Int64")


def _fabric(hops: pd.DataFrame, meta: dict) -> None:
    """`fabric` (bool) per hop, and `node` "(fabric)" on those hops (a namespace the
    placement has with no node: the lab's fabric between the nodes)."""
    inodes = [int(k) for k, v in (meta.get("placement") or {}).items() if v and v[0] is None]
    fab = hops["netns"].isin(inodes).to_numpy(dtype=bool) if "netns" in hops and inodes \
        else np.zeros(len(hops), dtype=bool)
    fab &= hops["node"].isna().to_numpy()
    hops["fabric"] = fab
    if fab.any():
        node = hops["node"]
        if isinstance(node.dtype, pd.CategoricalDtype):
            if FABRIC not in node.cat.categories:
                node = node.cat.add_categories([FABRIC])
            hops["node"] = node.mask(fab, FABRIC)
        else:
            hops["node"] = node.astype(object).mask(fab, FABRIC)
    # vectorised hops carry 0 where no tunnel was seen: missing, as the per-packet path says
    if "encap" in hops:
        plain = hops["encap"].isna()
        for c in ("vni", "encap_src", "encap_dst"):
            if c in hops:
                hops[c] = hops[c].mask(plain)


def _reason_names(events: pd.DataFrame, meta: dict) -> pd.Categorical:
    """The kernel's drop reason name of each event (missing where reason is 0 / not a drop)."""
    names = {int(k): v for k, v in (meta.get("drop_reasons") or {}).items()}
    codes, uniq = pd.factorize(events["reason"].to_numpy())
    vals = [None if int(u) == 0 else names.get(int(u), f"reason {int(u)}") for u in uniq]
    cats = list(dict.fromkeys(v for v in vals if v is not None))
    remap = np.array([cats.index(v) if v is not None else -1 for v in vals] + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], categories=cats)
