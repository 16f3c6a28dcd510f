"""A Trace whose packets, hops and events stay on disk until first read.

`partitioned.load` makes it: the flow and drop tables are in memory; `.packets`, `.hops` and
`.events` are read from the spill directory (or, for events, from the trace files) the first
time they are used, and kept. `.summary()`, `repr()`, `.path(packet)` and
`.flow_packets(flow)` read only what they need. The spill directory is removed by `close()`,
when the Trace is garbage-collected, or when Python exits.
"""

from __future__ import annotations

import functools
import shutil
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.feather as feather

from tracer.analysis import merge, public
from tracer.analysis.frames import concat
from tracer.analysis.trace import STATUSES, Trace, _empty_hops, _few


def read(path: Path, **kw) -> pd.DataFrame:
    """A spilled table back as pandas, as the in-memory reconstruction hands it out."""
    return _objects(feather.read_table(path, **kw) if not kw else ds.dataset(path, format="ipc").to_table(**kw))


class SpilledTrace(Trace):
    """A Trace rebuilt partition by partition (tracer.analysis.partitioned)."""

    def __init__(self, meta: dict, flows: pd.DataFrame, drops: pd.DataFrame, spill: Path, files: list[Path],
                 stats: dict, flow_maps: dict[int, np.ndarray], partitions: int, partition_events: int):
        self.meta = meta
        self.flows = flows
        self.drops = drops
        self.mode = "capture"
        self.spill = spill
        self.files = list(files)
        self.stats = stats
        self.flow_maps = flow_maps
        self.partitions = partitions            # how many partitions the events were rebuilt in
        self.partition_events = partition_events
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(spill), True)

    def close(self) -> None:
        """Remove the spill directory (the tables already read stay usable)."""
        self._cleanup()

    # -- the tables, read on first use ------------------------------------------------------

    def _bucket_files(self) -> list[tuple[int, Path]]:
        return sorted((int(p.stem[1:]), p) for p in (self.spill / "final").glob("b*.arrow"))

    def _packets_of(self, b: int, df: pd.DataFrame) -> pd.DataFrame:
        if len(df):
            df["flow"] = self.flow_maps[b][df["flow"].to_numpy()]
        return df

    @functools.cached_property
    def packets(self) -> pd.DataFrame:
        frames = [self._packets_of(b, read(p)) for b, p in self._bucket_files()]
        return concat(frames).sort_values("packet", kind="stable").reset_index(drop=True)

    @functools.cached_property
    def hops(self) -> pd.DataFrame:
        return self._hops(None)

    @functools.cached_property
    def events(self) -> pd.DataFrame:
        ev, _ = merge.load_many(self.files)
        return public.publish("events", ev, self.meta)

    def _hops(self, packet: int | None) -> pd.DataFrame:
        """Every hop (or one packet's), with its packet's number, flow and direction."""
        p = self.packets if packet is None else self.packets_where(packet=packet)
        flow = np.full(self.stats["packets"], -1, dtype=np.int64)
        flow[p["packet"].to_numpy()] = p["flow"].to_numpy()
        direction = p["direction"]
        dcodes = np.full(self.stats["packets"], -1, dtype=np.int64)
        dcodes[p["packet"].to_numpy()] = direction.cat.codes.to_numpy()
        frames = []
        for path in sorted((self.spill / "hops").glob("p*.arrow")):
            ids = np.load(self.spill / "ids" / f"{path.stem}.npy")
            if packet is not None:
                local = np.flatnonzero(ids == packet)
                if not len(local):
                    continue
                h = read(path, filter=ds.field("packet") == int(local[0]))
            else:
                h = read(path)
            h["packet"] = ids[h["packet"].to_numpy()]
            frames.append(h)
        hops = concat(frames)
        if not len(hops):
            return public.publish("hops", _empty_hops(), self.meta)
        hops = hops.sort_values(["packet", "hop"], kind="stable").reset_index(drop=True)
        at = hops["packet"].to_numpy()
        hops["flow"] = flow[at]
        if hops["direction"].isna().all():
            hops["direction"] = pd.Categorical.from_codes(dcodes[at], direction.cat.categories)
        return public.publish("hops", hops, self.meta)

    def packets_where(self, **equal) -> pd.DataFrame:
        """The packets whose columns equal the values given (e.g. packet=3, flow=0,
        status="dropped"), read from disk without the rest."""
        if "packets" in self.__dict__:
            return super().packets_where(**equal)

        def cond(b):
            out = None
            for k, v in equal.items():
                if k == "flow":       # the files hold each bucket's own flow numbers
                    local = np.flatnonzero(self.flow_maps[b] == v)
                    if not len(local):
                        return False
                    v = int(local[0])
                e = ds.field(k) == v
                out = e if out is None else out & e
            return out
        return self._read_packets(cond)

    def undelivered(self) -> pd.DataFrame:
        """The packets not delivered (dropped, lost, left, partial), read from disk without the rest."""
        if "packets" in self.__dict__:
            return super().undelivered()
        return self._read_packets(lambda b: ds.field("status") != "delivered")

    def _read_packets(self, cond) -> pd.DataFrame:
        frames = []
        for b, path in self._bucket_files():
            c = cond(b)
            if c is False:
                continue
            t = ds.dataset(path, format="ipc").to_table(filter=c)
            if t.num_rows:
                frames.append(self._packets_of(b, _objects(t)))
        out = concat(frames)
        if not len(out):
            return read(self._bucket_files()[0][1]).iloc[:0] if self._bucket_files() else out
        return out.sort_values("packet", kind="stable").reset_index(drop=True)

    def path(self, packet: int) -> pd.DataFrame:
        if "hops" in self.__dict__:
            return super().path(packet)
        return self._hops(int(packet))

    def flow_packets(self, flow: int) -> pd.DataFrame:
        return self.packets_where(flow=int(flow))

    # -- figures without the tables ---------------------------------------------------------

    def summary(self) -> dict:
        by = {s: int(self.flows[s].sum()) if len(self.flows) else 0 for s in STATUSES}
        t0, t1 = self.stats.get("t0") or 0, self.stats.get("t1") or 0
        return {
            "kind": self.meta.get("kind"), "format_version": self.meta.get("format_version"),
            "upgraded_from": self.meta.get("upgraded_from"),
            "events": self.stats["events"], "packets": self.stats["packets"], "flows": len(self.flows),
            **by, "stack_drops": self.stats["stack_drops"],
            "events_lost": self.events_lost, "span_s": round((t1 - t0) / 1e9, 3),
            "kernel": (self.meta.get("kernel") or {}).get("release"),
            "hooks": self.meta.get("hooks") or [],
        }

    def __repr__(self) -> str:
        """As a Trace's (trace.describe), from the figures: no table is read."""
        s = self.summary()
        verdicts = ", ".join(f"{s[k]} {k}" for k in STATUSES if s[k])
        n_drops = int(self.drops["count"].sum()) if len(self.drops) else 0
        lines = [f"Trace of a {self.meta.get('kind') or 'trace'} ({self.mode} reconstruction, "
                 f"{self.partitions} partitions): {s['events']} events, {s['packets']} packets"
                 + (f" ({verdicts})" if verdicts else "") + f", {self.stats.get('hops', 0)} hops, "
                 f"{s['flows']} flows, {n_drops} drops"]
        t0, t1 = self.stats.get("t0"), self.stats.get("t1")
        if t0 is not None:
            off = (self.meta.get("clock") or {}).get("realtime_offset_ns")
            span = f"{(t1 - t0) / 1e9:.3f} s"
            if isinstance(off, int):
                a, b = (pd.Timestamp(x + off, unit="ns", tz="UTC") for x in (t0, t1))
                lines.append(f"  {a:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f" → {b:%H:%M:%S.%f}"[:-3] + f" UTC ({span})")
            else:
                lines.append(f"  {span} (no wall clock in the file)")
        nodes = [n["name"] for n in self.meta.get("nodes") or [] if n.get("name")]
        if nodes:
            lines.append("  nodes: " + _few(nodes))
        lines.append("  files: " + _few([str(f) for f in self.files]))
        if self.events_lost:
            lines.append(f"  events lost: {self.events_lost} (ring buffer full: paths may have gaps)")
        lines.append("  tables: .packets .hops .events (read from disk on first use) .flows .drops; "
                     ".summary(), .path(packet)")
        return "\n".join(lines)


def _objects(table) -> pd.DataFrame:
    """An Arrow table as the in-memory reconstruction hands it out: strings as Python objects
    (None where missing), categoricals (even those with no value) as categoricals."""
    df = table.to_pandas()
    cats = {c["name"] for c in (table.schema.pandas_metadata or {}).get("columns", [])
            if c.get("pandas_type") == "categorical"}
    for c in df.columns:
        if c in cats and not isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = pd.Categorical(df[c].astype(object).where(df[c].notna(), None))
            continue
        if pd.api.types.is_string_dtype(df[c].dtype) and not isinstance(df[c].dtype, pd.CategoricalDtype) \
                and df[c].dtype != object:
            df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df
