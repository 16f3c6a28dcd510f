"""Column helpers: integer columns turned into group codes, categoricals, lookups, without per-row Python."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from tracer.reconstruct.drops import ip_num as _ip_num

def _factorize(*cols: np.ndarray) -> np.ndarray:
    """Dense group codes for rows of several integer columns (hash-based, no sort)."""
    code = None
    for c in cols:
        c = np.asarray(c)
        if code is None:
            code = pd.factorize(c)[0].astype(np.int64)
        else:
            sub = pd.factorize(c)[0].astype(np.int64)
            code = pd.factorize((code << 32) | sub)[0].astype(np.int64)
    return code


def _placement(meta: dict) -> dict[int, tuple]:
    return {int(k): tuple(v) for k, v in (meta.get("placement") or {}).items()}


def _cat_from(codes: np.ndarray, values: list) -> pd.Categorical:
    """A categorical from codes into `values` (-1: missing); values may repeat or be None.
    Strings as categoricals: no per-row Python objects, whatever the table's length."""
    uniq: dict = {}
    remap = np.empty(len(values) + 1, dtype=np.int64)
    for i, v in enumerate(values):
        remap[i] = -1 if v is None else uniq.setdefault(v, len(uniq))
    remap[-1] = -1
    return pd.Categorical.from_codes(remap[np.asarray(codes, dtype=np.int64)], categories=list(uniq))


def _lookup_cat(keys: np.ndarray, table: dict) -> pd.Categorical:
    """Map an integer column through a small dict into a categorical."""
    codes, uniq = pd.factorize(np.asarray(keys))
    return _cat_from(codes, [table.get(int(u)) for u in uniq])


def _lookup(keys: np.ndarray, table: dict, default=None) -> np.ndarray:
    """Map an integer column through a small dict, converting each distinct value once."""
    codes, uniq = pd.factorize(keys)
    vals = np.array([table.get(int(u), default) for u in uniq] + [default], dtype=object)
    return vals[codes]


def _by_ip(meta: dict) -> tuple[dict[int, str], dict[int, str]]:
    """(address → pod key, address → Service key for VIPs and backends' addresses are not
    Services: only cluster IPs)."""
    pods = {_ip_num(ip): p["key"] for p in meta.get("pods") or [] for ip in (p.get("ips") or [p.get("ip")]) if ip}
    svcs = {_ip_num(ip): s["key"] for s in meta.get("services") or []
            for ip in (s.get("cluster_ips") or [s.get("cluster_ip")]) if ip}
    for side in ("src", "dst"):   # flow files of format 1 know only their two ends
        d = meta.get(side) or {}
        if d.get("pod") and d.get("ip"):
            pods.setdefault(_ip_num(d["ip"]), d["pod"])
        if d.get("service") and d.get("ip"):
            svcs.setdefault(_ip_num(d["ip"]), d["service"])
    return pods, svcs


def _map_unique(a: np.ndarray, fn) -> pd.Categorical:
    """fn applied once per distinct value of an integer column."""
    codes, uniq = pd.factorize(a)
    return _cat_from(codes, [fn(int(u)) for u in uniq])


def _nullable(v: np.ndarray, null: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.arrays.IntegerArray(v.astype(np.int64), np.asarray(null, dtype=bool))


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """pd.concat that keeps a column categorical when it is in every frame (categories joined,
    without the detour through strings pd.concat takes when they differ)."""
    frames = [f for f in frames if f is not None]
    if not frames:
        return pd.DataFrame()
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    cols = list(frames[0].columns)
    cats = [c for c in cols if all(c in f and isinstance(f[c].dtype, pd.CategoricalDtype) for f in frames)]
    rest = [c for c in cols if c not in cats]
    out = pd.concat([f[rest] if cats else f for f in frames], ignore_index=True)
    for c in cats:
        out[c] = union_categoricals([f[c] for f in frames], ignore_order=True)
    return out[cols] if cats else out
