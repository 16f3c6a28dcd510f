"""Many trace files reconstructed one partition at a time, so memory follows a partition's size.

A capture of a cluster is one file per node; together they can hold far more events than
fit in memory. `load` reads them like `merge.load_many` (each file's clock moved onto the
first file's, duplicates across files dropped) but never all at once:

1. scatter: every file is read row group by row group and each event goes to one of N
   partitions (Arrow IPC files in a spill directory) by a hash of its packet's content —
   the fields `identity.content_groups` groups by, so every hop of one packet, on every
   node, lands in one partition. A drop or free event goes where the last hop of its buffer
   (skb) in the same file went: the reconstruction joins it to that hop (a buffer is one
   kernel's; with no hop of it in the file, the free goes by its own content).
2. reconstruct: each partition is read, decoded and rebuilt by the vectorised engine on its
   own; its packets and hops go to the spill directory (Arrow IPC).
3. number: packets are numbered across partitions in the order of their first event, as one
   reconstruction numbers them.
4. flows: packets are regrouped by flow (the 5-tuples NAT joins, found across all
   partitions first) into buckets, and each bucket's flow table is made as one file's is;
   flows are numbered by their first packet, drops summed.

The flow and drop tables are kept in memory (one row per flow, per drop place); packets,
hops and events stay on disk until first read (`spilled.SpilledTrace`). Memory: one
partition's events (`partition_events`) or one bucket's packets (at least the largest
flow's), whichever is larger, plus the flow table. The tables equal a single file's of the same
events; rows whose ordering key ties exactly (two packets first seen in the same nanosecond)
may be numbered in another order.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from tracer import tracefile
from tracer.analysis import merge, public
from tracer.analysis.frames import concat
from tracer.analysis.spilled import SpilledTrace, read
from tracer.analysis.tables import drop_table, flow_table
from tracer.analysis.vectorised import reconstruct_vectorised
from tracer.kernel.record import HOOK_IDS
from tracer.reconstruct import drops, identity

PARTITION_EVENTS = 1_000_000     # events per partition: about 1 GiB of memory for its rebuild
_FREE = np.array([HOOK_IDS["drop"], HOOK_IDS["consume"]])
_IPC = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)


def total_events(files: list[Path]) -> int:
    """The events the files hold, from their footers (an unfinished `.part` stream is read)."""
    n = 0
    for f in files:
        src = tracefile._open(tracefile._check_path(f))
        if isinstance(src, pq.ParquetFile):
            n += src.metadata.num_rows
        else:
            src.close()
            n += int(tracefile.read_meta(f).get("events") or 0)
    return n


def load(files: list[Path], partition_events: int | None = None, spill_dir=None) -> SpilledTrace:
    """The files (one per node) as one capture, rebuilt partition by partition (module doc)."""
    per = int(partition_events or PARTITION_EVENTS)
    if per < 1:
        raise ValueError("partition_events must be at least 1")
    metas = [tracefile._upgrade_meta(tracefile.read_meta(f)) for f in files]
    meta = merge.merged_meta(metas, files)
    shifts = merge.shifts(metas)
    n_parts = max(1, math.ceil(total_events(files) / per))
    spill = Path(tempfile.mkdtemp(prefix="podtrace-spill-", dir=spill_dir))
    try:
        pieces = _scatter(files, n_parts, spill / "events")
        stats = _reconstruct(pieces, files, shifts, meta, n_parts, spill)
        n_packets = _number(n_parts, spill)
        flows, drop_rows, flow_maps = _flows(stats["edges"], n_parts, spill, meta)
        shutil.rmtree(spill / "events", ignore_errors=True)
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    stats.pop("edges")
    return SpilledTrace(meta, flows, drop_rows, spill, files, dict(stats, packets=n_packets),
                        flow_maps, n_parts, per)


# -- 1. scatter ---------------------------------------------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _col(batch: pa.RecordBatch, name: str) -> np.ndarray:
    i = batch.schema.get_field_index(name)
    if i < 0:
        return np.zeros(batch.num_rows, dtype=np.uint64)
    return batch.column(i).fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)


def content_partition(batch: pa.RecordBatch, n_parts: int) -> np.ndarray:
    """The partition of each event by its packet's content (coarser than content_groups:
    equal content, equal partition)."""
    proto = _col(batch, "proto")
    icmp = identity.is_icmp(proto)
    k1 = (proto | (_col(batch, "ip_id") << np.uint64(8)) | (_col(batch, "ip_len") << np.uint64(24))
          | (_col(batch, "tcp_flags") << np.uint64(40)) | (_col(batch, "icmp_type") << np.uint64(48)))
    k2 = (_col(batch, "tcp_seq") | (np.where(icmp, _col(batch, "sport"), 0).astype(np.uint64) << np.uint64(32))
          | (np.where(icmp, _col(batch, "dport"), 0).astype(np.uint64) << np.uint64(48)))
    h = _mix(_mix(k1) ^ k2) ^ _col(batch, "flow_lbl")    # flow_lbl: 0 for IPv4
    return (_mix(h) % np.uint64(n_parts)).astype(np.int64)


class _SkbRoute:
    """Per file: the partition of the last hop event of each buffer address seen so far, so
    a drop or free goes to its hop's partition."""

    def __init__(self):
        self.last = pd.Series(np.zeros(0, dtype=np.int64), index=pd.Index(np.zeros(0, dtype=np.uint64)))

    def route(self, skb: np.ndarray, hook: np.ndarray, part: np.ndarray) -> np.ndarray:
        n = len(skb)
        free = np.isin(hook, _FREE)
        out = part.copy()
        if free.any():
            o = np.lexsort((np.arange(n), skb))
            hop = ~free[o] & (skb[o] != 0)
            pos = np.maximum.accumulate(np.where(hop, np.arange(n), -1))
            src = o[np.maximum(pos, 0)]
            same = (pos >= 0) & (skb[src] == skb[o])
            fo = free[o]
            inside = fo & same
            out[o[inside]] = part[src[inside]]
            outside = o[fo & ~same & (skb[o] != 0)]
            if len(outside) and len(self.last):
                before = self.last.reindex(skb[outside]).to_numpy()
                known = ~np.isnan(before)
                out[outside[known]] = before[known].astype(np.int64)
        hops = np.flatnonzero(~free & (skb != 0))
        if len(hops):
            new = pd.Series(part[hops], index=pd.Index(skb[hops]))
            both = pd.concat([self.last, new])
            self.last = both[~both.index.duplicated(keep="last")]
        return out


def _stored(names: set[str]) -> list[str]:
    """The event columns tracefile.load reads, of those a file has."""
    return [c for c in [*tracefile.REQUIRED_COLUMNS, *tracefile.OPTIONAL_COLUMNS] if c in names]


def _batches(path: Path):
    """The event batches of one trace file, as stored (tracefile.load's columns)."""
    src = tracefile._open(tracefile._check_path(path))
    if isinstance(src, pq.ParquetFile):
        meta = tracefile._meta_of(path, src.metadata.metadata)
        names = set(src.schema_arrow.names)
        tracefile._check_columns(path, names, meta)
        cols = _stored(names)
        try:
            yield from src.iter_batches(batch_size=tracefile.ROW_GROUP_EVENTS, columns=cols, use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise tracefile.TraceFileError(path, f"the events could not be read: the file is damaged ({exc})") from None
        return
    cols = _stored(src.names)
    for b in src.batches():
        if b.num_rows:
            yield b.select(cols)


def _scatter(files: list[Path], n_parts: int, out: Path) -> dict[int, list[Path]]:
    """Every event into its partition: out/pK/fI.arrow per partition K and file I."""
    pieces: dict[int, list[Path]] = {k: [] for k in range(n_parts)}
    for i, f in enumerate(files):
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        route = _SkbRoute()
        try:
            for batch in _batches(f):
                part = content_partition(batch, n_parts)
                part = route.route(_col(batch, "skb"), _col(batch, "hook").astype(np.int64), part)
                order = np.argsort(part, kind="stable")
                counts = np.bincount(part, minlength=n_parts)
                sorted_batch = batch.take(pa.array(order))
                at = 0
                for k in np.flatnonzero(counts):
                    w = writers.get(k)
                    if w is None:
                        p = out / f"p{k}" / f"f{i}.arrow"
                        p.parent.mkdir(parents=True, exist_ok=True)
                        w = writers[k] = pa.ipc.new_stream(str(p), batch.schema, options=_IPC)
                        pieces[k].append(p)
                    w.write_batch(sorted_batch.slice(at, counts[k]))
                    at += counts[k]
        finally:
            for w in writers.values():
                w.close()
    return pieces


# -- 2. reconstruct -----------------------------------------------------------------------------

def _events(paths: list[Path], files: list[Path], shifts: list[int]) -> pd.DataFrame:
    """One partition's events, as merge.load_many reads them (clocks aligned, duplicates
    dropped, time order)."""
    frames = []
    for p in paths:
        i = int(p.stem[1:])
        with pa.OSFile(str(p), "rb") as src:
            table = pa.ipc.open_stream(src).read_all()
        try:
            ev = tracefile.events_frame(table)
        except (pa.ArrowException, ValueError, IndexError, TypeError, OverflowError) as exc:
            raise tracefile.TraceFileError(files[i], "the events could not be decoded: the file is damaged "
                                                     f"({exc})") from None
        if shifts[i]:
            ev = ev.assign(ts_ns=(ev["ts_ns"].astype("int64") - shifts[i]))
        frames.append(ev)
    events = concat(frames)
    return (events.drop_duplicates(subset=[c for c in merge.SAME_EVENT if c in events.columns])
            .sort_values("ts_ns", kind="stable").reset_index(drop=True))


def _tuple_hashes(packets: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per packet, a hash of its first-hop and of its last-hop 5-tuple, either direction
    alike: the keys flow_table joins NATed tuples by."""
    proto = _mix(packets["_proto"].to_numpy().astype(np.uint64))

    def ep(ip, port):
        return _mix(_mix(packets[ip].to_numpy().astype(np.uint64))
                    ^ (packets[port].to_numpy().astype(np.uint64) & np.uint64(0xFFFF)))

    def pair(a, b):
        return _mix(proto ^ np.minimum(a, b)) ^ _mix(np.maximum(a, b) + np.uint64(0x9E3779B97F4A7C15))

    return (pair(ep("_src", "_sport"), ep("_dst", "_dport")), pair(ep("_fsrc", "_fsport"), ep("_fdst", "_fdport")))


def _reconstruct(pieces, files, shifts, meta, n_parts, spill: Path):
    """Each partition rebuilt on its own: packets and hops to spill, what the global steps
    need kept (first times, tuple edges, counts)."""
    (spill / "packets").mkdir()
    (spill / "hops").mkdir()
    stats = {"events": 0, "hops": 0, "t0": None, "t1": None, "stack_drops": 0, "followed_only_packets": 0,
             "edges": set()}
    (spill / "first").mkdir()
    for k in range(n_parts):
        if not pieces[k]:
            _save_firsts(spill, k, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
            continue
        events = _events(pieces[k], files, shifts)
        shutil.rmtree(pieces[k][0].parent, ignore_errors=True)
        stats["events"] += len(events)
        if len(events):
            t0, t1 = int(events["ts_ns"].min()), int(events["ts_ns"].max())
            stats["t0"] = t0 if stats["t0"] is None else min(stats["t0"], t0)
            stats["t1"] = t1 if stats["t1"] is None else max(stats["t1"], t1)
        stats["stack_drops"] += drops.housekeeping_in(events, meta)
        packets, hops = reconstruct_vectorised(events, meta)
        del events
        stats["hops"] += len(hops)
        stats["followed_only_packets"] += int(packets.attrs.get("followed_only_packets", 0))
        for name, col in (("node", "verdict_node"), ("dev", "verdict_dev"), ("point", "verdict_point")):
            packets[name] = packets[col]
        t1h, t2h = _tuple_hashes(packets)
        moved = t1h != t2h
        stats["edges"].update(zip(t1h[moved].tolist(), t2h[moved].tolist()))
        packets["_t1"] = t1h.view(np.int64)
        _save_firsts(spill, k, packets["first_ts_ns"].to_numpy().astype(np.int64), packets["hops"].to_numpy() == 0)
        _write(packets, spill / "packets" / f"p{k}.arrow")
        _write(hops, spill / "hops" / f"p{k}.arrow")
    return stats


def _write(df: pd.DataFrame, path: Path) -> None:
    """A table to the spill: Arrow IPC (Feather), lz4; spilled.read reads it back."""
    feather.write_feather(df.reset_index(drop=True), path, compression="lz4")


# -- 3. number ----------------------------------------------------------------------------------

def _save_firsts(spill: Path, k: int, first_ts: np.ndarray, orphan: np.ndarray) -> None:
    """Partition k's packets' first times, and each kind's (with hops, without) sorted."""
    np.save(spill / "first" / f"p{k}.npy", first_ts)
    np.save(spill / "first" / f"p{k}-orphan.npy", orphan)
    for kind, m in (("hops", ~orphan), ("orphan", orphan)):
        np.save(spill / "first" / f"p{k}-sorted-{kind}.npy", np.sort(first_ts[m], kind="stable"))


def _number(n_parts: int, spill: Path) -> int:
    """Packet numbers across partitions, as one reconstruction numbers them: in the order of
    first events (ties: partition order), packets with no hop (a drop before any device)
    after all others. Each partition's are counted against every other's sorted first
    times, one partition at a time (memory: two partitions' packets); spill/ids/pK.npy maps
    partition K's numbers to the trace's."""
    (spill / "ids").mkdir()
    first = spill / "first"
    with_hops = sum(len(np.load(first / f"p{j}-sorted-hops.npy", mmap_mode="r")) for j in range(n_parts))
    total = 0
    for k in range(n_parts):
        ts = np.load(first / f"p{k}.npy")
        orphan = np.load(first / f"p{k}-orphan.npy")
        ids = np.empty(len(ts), dtype=np.int64)
        for kind, m, base in (("hops", ~orphan, 0), ("orphan", orphan, with_hops)):
            mine = ts[m]
            rank = np.empty(len(mine), dtype=np.int64)
            rank[np.argsort(mine, kind="stable")] = np.arange(len(mine))
            for j in range(n_parts):
                if j != k and len(mine):
                    other = np.load(first / f"p{j}-sorted-{kind}.npy")
                    rank += np.searchsorted(other, mine, side="right" if j < k else "left")
            ids[m] = base + rank
        np.save(spill / "ids" / f"p{k}.npy", ids)
        total += len(ts)
    shutil.rmtree(first, ignore_errors=True)
    return total


# -- 4. flows -----------------------------------------------------------------------------------

def _components(edges: set) -> pd.Series:
    """Tuple hash → its flow's label (the smallest hash NAT joins it with), for the tuples
    that have edges; the others are their own."""
    if not edges:
        return pd.Series(np.zeros(0, dtype=np.int64), index=pd.Index(np.zeros(0, dtype=np.int64)))
    e = np.array(sorted(edges), dtype=np.uint64).view(np.int64)
    codes, uniq = pd.factorize(e.ravel())
    codes = codes.reshape(-1, 2)
    parent = list(range(len(uniq)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for x, y in codes.tolist():
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    root = np.array([find(i) for i in range(len(uniq))])
    label = pd.Series(uniq).groupby(root).transform("min").to_numpy()
    return pd.Series(label, index=pd.Index(uniq))


def _flows(edges: set, n_parts: int, spill: Path, meta: dict):
    """Packets regrouped by flow into buckets, each bucket's flow table made as one file's:
    (flows, drops, per bucket the map of its flow numbers to the trace's)."""
    comp = _components(edges)
    bdir = spill / "buckets"
    bdir.mkdir()
    for k in range(n_parts):
        src = spill / "packets" / f"p{k}.arrow"
        if not src.exists():
            continue
        packets = read(src)
        packets["packet"] = np.load(spill / "ids" / f"p{k}.npy")
        t1 = packets.pop("_t1").to_numpy()
        at = comp.index.get_indexer(t1)
        label = np.where(at >= 0, comp.to_numpy()[np.maximum(at, 0)], t1) if len(comp) else t1
        bucket = (_mix(label.view(np.uint64)) % np.uint64(n_parts)).astype(np.int64)
        for b in np.unique(bucket):
            _write(packets[bucket == b], bdir / f"b{b}-p{k}.arrow")
        src.unlink()
    (spill / "final").mkdir()
    flows, dropped = [], []
    for b in range(n_parts):
        parts = sorted(bdir.glob(f"b{b}-p*.arrow"))
        if not parts:
            continue
        packets = concat([read(p) for p in parts])
        for p in parts:
            p.unlink()
        packets = packets.sort_values("packet", kind="stable").reset_index(drop=True)
        fl = flow_table(packets, meta)
        packets["flow"] = fl.attrs.pop("packet_flow")
        packets = public.publish("packets", packets, meta)
        d = packets[packets["status"].astype(str) == "dropped"]
        dropped.append(d.assign(_bucket=b))
        fl["_bucket"] = b
        fl["_first_packet"] = _first_packet(packets, len(fl))
        flows.append(fl)
        _write(packets, spill / "final" / f"b{b}.arrow")
    if not flows:
        empty = flow_table(pd.DataFrame(), meta)
        return public.publish("flows", empty, meta), public.publish("drops", drop_table(empty), meta), {}
    allf = concat(flows)
    order = np.lexsort((allf["_first_packet"].to_numpy(), allf["first_ts_ns"].to_numpy()))
    allf = allf.iloc[order].reset_index(drop=True)
    maps: dict[int, np.ndarray] = {}
    for b, g in allf.groupby("_bucket", sort=False):
        m = np.empty(len(g), dtype=np.int64)
        m[g["flow"].to_numpy()] = g.index.to_numpy()
        maps[int(b)] = m
    allf["flow"] = np.arange(len(allf))
    allf = allf.drop(columns=["_bucket", "_first_packet"])
    d = concat(dropped)
    if len(d):
        d["flow"] = _remap(d["flow"].to_numpy(), d["_bucket"].to_numpy(), maps)
        d = d.sort_values("packet", kind="stable").reset_index(drop=True)
    drops_t = drop_table(d.drop(columns=["_bucket"]))
    return public.publish("flows", allf, meta), public.publish("drops", drops_t, meta), maps


def _remap(flow: np.ndarray, bucket: np.ndarray, maps: dict[int, np.ndarray]) -> np.ndarray:
    out = np.empty(len(flow), dtype=np.int64)
    for b, m in maps.items():
        at = bucket == b
        out[at] = m[flow[at]]
    return out


def _first_packet(packets: pd.DataFrame, n_flows: int) -> np.ndarray:
    """Per flow (local number), the number of its first packet: ties of first times across
    buckets go as one file's would."""
    out = np.full(n_flows, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, packets["flow"].to_numpy(), packets["packet"].to_numpy().astype(np.int64))
    return out
