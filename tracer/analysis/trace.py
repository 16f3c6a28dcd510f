"""The loaded trace: its tables with their documented columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tracer.reconstruct import drops

COLUMNS = {
    "events": "one row per hop event as captured (tracer/kernel/record.py fields, addresses as numeric "
              "keys (tracer/addrs.py: IPv4 its value, IPv6 a 64-bit hash), plus *_str address strings of "
              "either family and hook_name)",
    "packets": ["packet", "flow", "direction", "seq", "proto", "src", "sport", "dst", "dport",
                "final_src", "final_sport", "final_dst", "final_dport", "ip_id", "ip_len", "tcp_flags",
                "first_ts_ns", "last_ts_ns", "hops", "first_node", "first_pod", "first_dev",
                "last_node", "last_pod", "last_dev", "last_point", "status", "node", "dev", "point",
                "verdict_node", "verdict_dev", "verdict_point", "reason", "location", "cause", "hint",
                "runbook", "one_way_ns", "duration_ns"],
    "hops": ["packet", "hop", "flow", "direction", "seq", "ts_ns", "t_ns", "dt_ns", "node", "pod",
             "dev", "point", "seen_by", "src", "sport", "dst", "dport", "tcp_flags", "encap", "encap_src",
             "encap_dst", "vni", "ifindex", "netns", "len", "ct_state"],
    "flows": ["flow", "proto", "src", "sport", "dst", "dport", "src_pod", "dst_pod", "dst_pod_port", "service",
              "packets", "forward", "reverse", "delivered", "dropped", "lost", "left", "partial", "bytes",
              "p50_ns", "p99_ns", "first_ts_ns", "last_ts_ns", "nodes", "tcp_flags"],
    "drops": ["reason", "node", "dev", "location", "count", "flows", "first_ts_ns", "last_ts_ns"],
}
# partial: seen only while an observer on its path was not tracing (never a failure)
STATUSES = ["delivered", "dropped", "lost", "left", "partial"]


@dataclass(repr=False)
class Trace:
    """A loaded trace. Every table is a pandas DataFrame (see COLUMNS / docs/analysis.md)."""

    events: pd.DataFrame     # one row per hop event, as captured
    hops: pd.DataFrame       # one row per hop of every reconstructed packet
    packets: pd.DataFrame    # one row per packet with its verdict
    meta: dict
    flows: pd.DataFrame = field(default_factory=pd.DataFrame)   # one row per 5-tuple (NAT joined)
    drops: pd.DataFrame = field(default_factory=pd.DataFrame)   # drop reason × node × device × location
    mode: str = "capture"    # which reconstruction made the packets: "flow" or "capture"

    @property
    def counters(self) -> dict:
        return dict(self.meta.get("counters") or {})

    @property
    def events_lost(self) -> int:
        """Events the kernel could not hand over (ring buffer full): gaps in the paths."""
        return int(self.counters.get("lost", 0))

    def summary(self) -> dict:
        """The figures `podtrace analyze` prints first."""
        p = self.packets
        by = p["status"].value_counts().to_dict() if len(p) else {}
        t0 = int(self.events["ts_ns"].min()) if len(self.events) else 0
        t1 = int(self.events["ts_ns"].max()) if len(self.events) else 0
        return {
            "kind": self.meta.get("kind"), "format_version": self.meta.get("format_version"),
            "upgraded_from": self.meta.get("upgraded_from"),
            "events": len(self.events), "packets": len(p), "flows": len(self.flows),
            **{s: int(by.get(s, 0)) for s in STATUSES},
            "stack_drops": drops.housekeeping_in(self.events, self.meta),
            "events_lost": self.events_lost, "span_s": round((t1 - t0) / 1e9, 3),
            "kernel": (self.meta.get("kernel") or {}).get("release"),
            "hooks": self.meta.get("hooks") or [],
        }

    def __repr__(self) -> str:
        """A few lines, whatever the trace's size: counts, time span, nodes, files."""
        return "\n".join(describe(self))

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(repr(self)) + "</pre>"

    def path(self, packet: int) -> pd.DataFrame:
        """The hops of one packet, in order."""
        return self.hops[self.hops["packet"] == packet]

    def flow_packets(self, flow: int) -> pd.DataFrame:
        return self.packets[self.packets["flow"] == flow]

    def packets_where(self, **equal) -> pd.DataFrame:
        """The packets whose columns equal the values given (packet=3, status="dropped", …)."""
        p = self.packets
        keep = np.ones(len(p), dtype=bool)
        for k, v in equal.items():
            keep &= (p[k].astype(object) == v).to_numpy()
        return p[keep]

    def undelivered(self) -> pd.DataFrame:
        """The packets not delivered: dropped, lost, left or partial."""
        return self.packets[self.packets["status"].astype(str) != "delivered"]


def describe(t: Trace) -> list[str]:
    """The lines of a Trace's repr."""
    p = t.packets
    by = p["status"].astype(str).value_counts() if len(p) else pd.Series(dtype="int64")
    verdicts = ", ".join(f"{int(by[s])} {s}" for s in STATUSES if by.get(s, 0))
    files = t.meta.get("files") or ([t.meta["path"]] if t.meta.get("path") else [])
    head = (f"Trace of a {t.meta.get('kind') or 'trace'} ({t.mode} reconstruction): {len(t.events)} events, "
            f"{len(p)} packets" + (f" ({verdicts})" if verdicts else "") + f", {len(t.hops)} hops, "
            f"{len(t.flows)} flows, {int(t.drops['count'].sum()) if len(t.drops) else 0} drops")
    lines = [head]
    if len(t.events):
        t0, t1 = int(t.events["ts_ns"].min()), int(t.events["ts_ns"].max())
        off = (t.meta.get("clock") or {}).get("realtime_offset_ns")
        span = f"{(t1 - t0) / 1e9:.3f} s"
        if isinstance(off, int):
            a, b = (pd.Timestamp(x + off, unit="ns", tz="UTC") for x in (t0, t1))
            when = f"{a:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f" → {b:%H:%M:%S.%f}"[:-3] + " UTC"
            lines.append(f"  {when} ({span})")
        else:
            lines.append(f"  {span} (no wall clock in the file)")
    nodes = [n["name"] for n in t.meta.get("nodes") or [] if n.get("name")] or sorted(
        {v[0] for v in (t.meta.get("placement") or {}).values() if v and v[0]})
    if nodes:
        lines.append("  nodes: " + _few(nodes))
    if files:
        lines.append("  file" + ("s" if len(files) > 1 else "") + ": " + _few([str(f) for f in files]))
    if t.events_lost:
        lines.append(f"  events lost: {t.events_lost} (ring buffer full: paths may have gaps)")
    lines.append("  tables: .packets .hops .flows .drops .events; .summary(), .path(packet)")
    return lines


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" … (+{len(names) - n})" if len(names) > n else "")


def _empty_packets() -> pd.DataFrame:
    cols = COLUMNS["packets"] + ["tuple_proto", "tuple_src", "tuple_dst", "tuple_sport", "tuple_dport",
                                 "_proto", "_src", "_dst", "_fsrc", "_fdst", "_sport", "_dport",
                                 "_fsport", "_fdport"]
    return pd.DataFrame({c: pd.Series(dtype="int64" if c.startswith("_") or c == "packet" else "object")
                         for c in cols})


def _empty_hops() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("packet", "hop") else "object")
                         for c in COLUMNS["hops"]})
