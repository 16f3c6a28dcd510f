"""Trace files: Apache Parquet, one row per hop event, plus the metadata needed to rebuild
and enrich the packets offline (nodes, pods, Services, namespace placement, kernel, active
hooks, clock offsets, counters), stored as JSON under the key `podtrace` of the file's
key-value metadata.

The schema is versioned (`FORMAT_VERSION`). Version 3 stores the event record's numeric
fields as they are, every address as 16 bytes (fixed_size_binary(16): an IPv4 address in
the first 4, the rest zero; the `flags` column says which family each group of addresses
is), and the device name dictionary-encoded; everything derived (address keys and strings,
hook names) is recomputed on load. Files of version 2 (addresses as unsigned 32-bit IPv4
numbers, no `flow_lbl`) and version 1 (the first `flow --save`, which also stored the derived
string columns) load into the same frame. Anything that is not a podtrace trace gives one `TraceFileError` whose
message says what is wrong with the file.

Writing goes through `Writer`, which holds at most about one row group (`row_group_events`
events) in memory, so a capture of any length is bounded. While it runs the events go to
`NAME.part`, an Arrow IPC stream (one compressed batch per row group; the metadata known
at the start in its schema, marked incomplete) that can be read up to its last complete batch
wherever the writer stops, a SIGKILL included; `close` converts it into the Parquet file and
renames that into place: a file at the final name always has its footer and metadata. What
a killed writer left is turned into `NAME.incomplete.parquet` by `podtrace cleanup`
(`salvage_writer`); both that and a raw `.part` load, with meta["incomplete"] True.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tracer import testhooks
from tracer.node import ownership
from tracer.kernel import record as events
from tracer.errors import BadInput
from tracer import tracecols
from tracer.tracecols import ADDR16, addr_array, frame_addr_bytes
from tracer.tracemeta import FORMAT_VERSION, ROW_GROUP_EVENTS, cluster_meta, finish_meta, host_meta

__all__ = ["FORMAT_VERSION", "META_KEY", "ROW_GROUP_EVENTS", "TraceFileError", "Writer", "cluster_meta",
           "host_meta", "load", "read_meta", "salvage", "salvage_writer", "save"]

META_KEY = b"podtrace"

# Event columns stored in the file (the record minus padding), with their Arrow types.
# ts_ns is signed: merged multi-node traces shift timestamps by clock offsets.
_NUMERIC = [(name, np.dtype("int64") if name == "ts_ns" else np.dtype(np_type).newbyteorder("="))
            for name, c_type, np_type in events.EVENT_FIELDS if not c_type.startswith(("char", "u8["))]
_ARROW_INT = {np.dtype("uint8"): pa.uint8(), np.dtype("uint16"): pa.uint16(), np.dtype("uint32"): pa.uint32(),
              np.dtype("uint64"): pa.uint64(), np.dtype("int64"): pa.int64(), np.dtype("int32"): pa.int32()}
_ADDRS = [name for name, c_type, _ in events.EVENT_FIELDS if c_type.startswith("u8[")]
_NUMERIC_TYPES = dict(_NUMERIC)
EVENT_SCHEMA = pa.schema([pa.field(name, ADDR16 if name in _ADDRS else _ARROW_INT[_NUMERIC_TYPES[name]], nullable=False)
                          for name, c_type, _ in events.EVENT_FIELDS if not c_type.startswith("char")]
                         + [pa.field("ifname", pa.dictionary(pa.int32(), pa.string()), nullable=False)])
REQUIRED_COLUMNS = [f.name for f in EVENT_SCHEMA]
# Columns a file of an older version may lack (filled with zeros on load).
ADDED_IN_V3 = ("flow_lbl",)
# Columns a trace may add: `agent` (which node agent recorded the event, merged flow traces).
OPTIONAL_COLUMNS = {"agent": np.dtype("int32")}


def schema_with(extra: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(list(EVENT_SCHEMA) + [pa.field(c, _ARROW_INT[OPTIONAL_COLUMNS[c]], nullable=False)
                                           for c in extra])
# Derived columns: recomputed on load, never stored (version 1 stored them).
IP_COLUMNS = ["saddr", "daddr", "outer_saddr", "outer_daddr", "ct_orig_src", "ct_orig_dst",
              "ct_reply_src", "ct_reply_dst"]
DERIVED_COLUMNS = [c + "_str" for c in IP_COLUMNS] + ["hook_name"]


class TraceFileError(BadInput):
    """The file is missing, not Parquet, not a podtrace trace, damaged, or too new."""

    def __init__(self, path, problem: str, fix: str | None = None):
        super().__init__(f"{path}: {problem}",
                         fix or "give a file written by `podtrace capture -w` or `podtrace flow -w`")


# ---------------------------------------------------------------------------------------
# Converting events to Arrow

def _ifname_array(raw: np.ndarray) -> pa.DictionaryArray:
    """char[16] names → a dictionary array, decoding each distinct name once."""
    codes, uniq = pd.factorize(raw)
    names = [bytes(b).split(b"\0", 1)[0].decode("ascii", errors="replace") for b in uniq]
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names, pa.string()))


def batch_from_records(arr: np.ndarray) -> pa.RecordBatch:
    """Raw ring-buffer records (events.EVENT_DTYPE) → one Arrow record batch, column by column."""
    cols = [addr_array(arr[name]) if name in _ADDRS
            else pa.array(np.ascontiguousarray(arr[name]).astype(_NUMERIC_TYPES[name], copy=False))
            for name in REQUIRED_COLUMNS[:-1]]
    cols.append(_ifname_array(arr["ifname"]))
    return pa.RecordBatch.from_arrays(cols, schema=EVENT_SCHEMA)


def batch_from_frame(df: pd.DataFrame, extra: tuple[str, ...] = ()) -> pa.RecordBatch:
    """A decoded events DataFrame (events.to_frame, or a loaded trace) → one record batch."""
    missing = [c for c in REQUIRED_COLUMNS + list(extra) if c not in df.columns]
    if missing:
        raise ValueError(f"events frame lacks {missing}")
    cols = [addr_array(frame_addr_bytes(df, name)) if name in _ADDRS
            else pa.array(df[name].to_numpy().astype(_NUMERIC_TYPES[name], copy=False))
            for name in REQUIRED_COLUMNS[:-1]]
    names = df["ifname"].astype(str).astype("category")
    cols.append(pa.DictionaryArray.from_arrays(
        pa.array(names.cat.codes.to_numpy().astype(np.int32)),
        pa.array([str(c) for c in names.cat.categories], pa.string())))
    cols += [pa.array(df[c].to_numpy().astype(OPTIONAL_COLUMNS[c], copy=False)) for c in extra]
    return pa.RecordBatch.from_arrays(cols, schema=schema_with(extra))


# ---------------------------------------------------------------------------------------
# Writing

class Writer:
    """Streams events into a trace file; `close(meta)` moves a complete Parquet file into
    place. Memory: at most one row group of pending batches (plus whatever the caller holds).

    While it runs, every row group (and every `flush()`) is appended to `FILE.part` as one
    zstd-compressed batch of an Arrow IPC stream, whose schema carries the metadata known at
    the start (`meta`) marked `"incomplete": true`. A stream is readable up to its last
    complete batch wherever the writer stops — even after a SIGKILL, when `podtrace
    cleanup` turns it into `FILE.incomplete.parquet` (the Writer registers itself in the
    state directory for that, tracer/ownership.py). `close()` converts the stream batch by
    batch into Parquet (`FILE.part.tmp`, then renamed to FILE), so a file at the final name
    always has its footer and metadata."""

    def __init__(self, path: str | Path, row_group_events: int = ROW_GROUP_EVENTS,
                 compression: str = "zstd", extra: tuple[str, ...] = (), meta: dict | None = None):

        self.path = Path(path)
        self.extra = tuple(extra)
        self.schema = schema_with(self.extra)
        self.tmp = self.path.with_name(self.path.name + ".part")
        self.final_tmp = self.path.with_name(self.path.name + ".part.tmp")
        self.row_group_events = row_group_events
        self.compression = compression
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_since = 0.0
        self.rows = 0
        self.row_groups = 0
        self.bytes_hint = 0
        self.start_meta = dict(meta or {})
        self.write_id = f"{os.getpid()}-{time.time_ns()}"
        if not self.path.parent.is_dir():
            raise BadInput(f"cannot write {self.path}: directory {self.path.parent} does not exist",
                           "create it or choose another path")
        head = finish_meta(self.start_meta)
        head.setdefault("row_group_events", row_group_events)   # for the salvage's row groups
        head.update(incomplete=True, write_id=self.write_id,
                    incomplete_reason=f"unfinished: {self.tmp.name} is being written, or its writer "
                                      f"(pid {os.getpid()}) was killed")
        schema = self.schema.with_metadata({META_KEY: json.dumps(head, default=_json_default).encode()})
        self._registration = ownership.register_writer(self.tmp, self.path, self.final_tmp)
        self._sink = None
        try:
            self._sink = pa.OSFile(str(self.tmp), "wb")
            opts = pa.ipc.IpcWriteOptions(compression=None if compression in (None, "none") else "zstd",
                                          use_threads=False)
            self._w = pa.ipc.new_stream(self._sink, schema, options=opts)
            # use_threads=False: compressing a batch's buffers in parallel cost a capture ~25 MiB
            # of RSS for nothing at its rates. pyarrow writes the schema with the first batch:
            # an empty one puts the metadata on disk now, so even a writer killed before its
            # first row group leaves a loadable file.
            self._w.write_batch(pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in self.schema],
                                                           schema=self.schema))
        except BaseException as exc:
            if self._sink is not None:
                self._sink.close()
                self.tmp.unlink(missing_ok=True)
            ownership.unregister(self._registration)
            if isinstance(exc, OSError):
                raise BadInput(f"cannot write {self.path} ({exc})", "choose a writable path") from None
            raise

    def write_records(self, arr: np.ndarray) -> None:
        if len(arr):
            self.write_batch(batch_from_records(arr))

    def write_frame(self, df: pd.DataFrame) -> None:
        if len(df):
            self.write_batch(batch_from_frame(df, self.extra))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if not self._pending_rows:
            self._pending_since = time.monotonic()
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.row_group_events:
            self._flush(self.row_group_events)

    def flush(self) -> None:
        """Write what is pending to the stream now (a short batch; `close` still makes full
        row groups), so that a SIGKILL loses none of it."""
        self._flush()

    def flush_older_than(self, seconds: float) -> None:
        """`flush()` if events have waited longer than `seconds` (a slow capture's events
        reach the disk within that time, not after a whole row group)."""
        if self._pending_rows and time.monotonic() - self._pending_since >= seconds:
            self._flush()

    def _flush(self, rows: int | None = None) -> None:
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        take = table if rows is None else table.slice(0, rows)
        rest = None if rows is None else table.slice(rows)
        # one batch per row group: a reader gets all of it or none, and zstd gets long buffers
        # (the 4096-event chunks as they come compress at 2/3 of the speed)
        self._w.write_table(take.combine_chunks())
        self.rows += take.num_rows
        self.row_groups += 1
        self._pending = rest.combine_chunks().to_batches() if rest is not None and rest.num_rows else []
        self._pending_rows = sum(b.num_rows for b in self._pending)
        self._pending_since = time.monotonic()
        self.bytes_hint = self._sink.tell()

    def close(self, meta: dict, counters: dict | None = None) -> Path:

        self._flush()
        self._w.close()
        self._sink.close()
        full = finish_meta({**self.start_meta, **meta}, counters)
        full["write_id"] = self.write_id
        stream = _Stream(self.tmp)
        rows, groups = _stream_to_parquet(stream, self.final_tmp, lambda n, g: full, self.compression,
                                          self.row_group_events)
        if stream.problem:   # our own complete stream: cannot happen short of a disk error
            self.final_tmp.unlink(missing_ok=True)
            raise TraceFileError(self.tmp, f"could not be read back ({stream.problem})", "check the disk")
        testhooks.pause("finishing")
        self.final_tmp.replace(self.path)
        self.tmp.unlink(missing_ok=True)
        ownership.unregister(self._registration)
        self.rows, self.row_groups = rows, groups
        self.bytes_hint = self.path.stat().st_size
        return self.path

    def abort(self) -> None:

        try:
            with contextlib.suppress(pa.ArrowException, OSError):
                self._w.close()
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            self.final_tmp.unlink(missing_ok=True)
            ownership.unregister(self._registration)


def _stream_to_parquet(stream: "_Stream", dst: Path, meta, compression: str = "zstd",
                       row_group_events: int = ROW_GROUP_EVENTS) -> tuple[int, int]:
    """Copy the readable batches of a stream into a Parquet file in row groups of
    `row_group_events` (memory: about one row group), with the metadata `meta(events, row
    groups)` (the footer is written last, so it can name the counts). Returns the counts."""
    schema = stream.schema.remove_metadata()
    rows = groups = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(dst, schema, compression=compression) as w:
        def emit(table: pa.Table) -> None:
            nonlocal rows, groups
            w.write_table(table, row_group_size=max(table.num_rows, 1))
            rows += table.num_rows
            groups += 1

        for batch in stream.batches():
            if not batch.num_rows:
                continue
            if not pending and batch.num_rows == row_group_events:   # the usual case: no copy
                emit(pa.Table.from_batches([batch], schema=schema))
                continue
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= row_group_events:
                table = pa.Table.from_batches(pending, schema=schema)
                emit(table.slice(0, row_group_events))
                rest = table.slice(row_group_events)
                pending = rest.combine_chunks().to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
        if pending_rows:
            emit(pa.Table.from_batches(pending, schema=schema))
        doc = {**meta(rows, groups), "events": rows, "row_groups": groups}
        w.add_key_value_metadata({META_KEY: json.dumps(doc, default=_json_default).encode()})
    return rows, groups


def incomplete_name(path: str | Path) -> Path:
    """Where the salvaged part of an unfinished FILE goes: `trace.parquet` →
    `trace.incomplete.parquet` (`.incomplete.2.parquet` … when taken)."""
    p = Path(path)
    stem, suffix = (p.stem, p.suffix) if p.suffix else (p.name, ".parquet")
    cand = p.with_name(f"{stem}.incomplete{suffix}")
    n = 2
    while cand.exists() or cand.is_symlink():
        cand = p.with_name(f"{stem}.incomplete.{n}{suffix}")
        n += 1
    return cand


def salvage(part: str | Path, final: str | Path, why: str) -> tuple[Path | None, int]:
    """Turn the readable part of an unfinished stream `part` (its writer is gone) into a
    Parquet trace next to `final`, named as incomplete (never over an existing file), with
    metadata `incomplete: true` and `incomplete_reason` (`why`, and how many events were
    salvaged); then remove `part`. Returns (path, events); path is None when nothing in
    `part` could be read (it is removed all the same)."""
    part = Path(part)
    try:
        stream = _Stream(part)
    except TraceFileError:
        part.unlink(missing_ok=True)
        return None, 0
    base = {k: v for k, v in stream.meta.items() if k not in ("events", "row_groups", "write_id")}
    base.update(incomplete=True, salvaged_from=str(part), salvaged_ns=time.time_ns())

    def meta(rows: int, groups: int) -> dict:
        cut = f"; the rest was cut off ({stream.problem})" if stream.problem else ""
        return {**base, "incomplete_reason": f"{why}: {rows} events salvaged{cut}"}

    tmp = part.with_name(part.name + f".salvage.{os.getpid()}")
    try:
        rows, _ = _stream_to_parquet(stream, tmp, meta, "zstd",
                                     _positive_int(base.get("row_group_events"), ROW_GROUP_EVENTS))
        while True:
            target = incomplete_name(final)
            try:
                os.link(tmp, target)        # unlike rename, never replaces an existing file
                break
            except FileExistsError:         # taken meanwhile: the next free name
                continue
    finally:
        tmp.unlink(missing_ok=True)
    part.unlink(missing_ok=True)
    return target, rows


def _positive_int(v, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def salvage_writer(w: dict) -> list[str]:
    """What `podtrace cleanup` does for one registered writer that is gone (a record of
    ownership.registered_writers()): lines saying what it did."""
    part, final, tmp = Path(w["part"]), Path(w["path"]), Path(w.get("tmp") or "/nonexistent")
    who = f"the writer, pid {w['pid']}"
    out = []
    want = _write_id(part)
    if tmp.exists():
        if want and not part.is_symlink() and _write_id(tmp) == want:
            tmp.replace(final)       # converted, not yet moved: finish what the writer began
            part.unlink(missing_ok=True)
            return [f"finished {final} ({who}, was killed as it moved the complete file into place)"]
        else:
            tmp.unlink(missing_ok=True)
            out.append(f"removed {tmp} (a conversion {who}, was killed in)")
    if not part.exists():
        return out
    if want and _write_id(final) == want:
        part.unlink(missing_ok=True)     # killed between the rename and the removal
        out.append(f"removed {part} ({final} is complete)")
        return out
    where, n = salvage(part, final, f"the writer (pid {w['pid']}) was killed before it finished {final.name}")
    if where is None:
        out.append(f"removed {part}: nothing readable ({who}, was killed as it started)")
    else:
        out.append(f"salvaged {where}: {n} events of the unfinished {final.name} ({who}, was killed)")
    return out


def _write_id(p: Path) -> str | None:
    """The id a Writer gave the file at `p` (a stream or a complete Parquet file), if any."""
    try:
        src = _open(_check_path(p))
    except TraceFileError:
        return None
    if isinstance(src, _Stream):
        src.close()
        wid = src.meta.get("write_id")
    else:
        try:
            meta = _meta_of(p, src.metadata.metadata)
        except TraceFileError:
            return None
        wid = None if meta.get("incomplete") else meta.get("write_id")
    return wid if isinstance(wid, str) and wid else None


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def save(path: str | Path, events_df: pd.DataFrame, meta: dict) -> Path:
    """Write a whole trace at once (`flow --save`): the events and the run's metadata."""
    w = Writer(path, extra=tuple(c for c in OPTIONAL_COLUMNS if c in events_df.columns), meta=meta)
    try:
        w.write_frame(events_df)
        w.flush()      # on disk before the footer: a SIGKILL from here on loses no event
        testhooks.pause("saving")
        return w.close(meta)
    except BaseException:
        w.abort()
        raise


# ---------------------------------------------------------------------------------------
# Reading

def read_meta(path: str | Path) -> dict:
    """Only the metadata (footer); cheap even for a large capture. For an unfinished trace
    (a `.part` stream) the batches are read to count the events."""
    p = _check_path(path)
    src = _open(p)
    if isinstance(src, _Stream):
        rows = groups = 0
        for b in src.batches():
            if b.num_rows:
                rows += b.num_rows
                groups += 1
        return src.finished_meta(rows, groups)
    return _meta_of(p, src.metadata.metadata)


def load(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(events, metadata) of a trace file of any supported version; events carry the
    derived columns (`saddr_str` … `hook_name`) as categoricals. An unfinished trace (a
    salvaged `*.incomplete.parquet`, or a `.part` stream) loads too, with
    meta["incomplete"] True and meta["incomplete_reason"] saying why."""
    p = _check_path(path)
    src = _open(p)
    if isinstance(src, _Stream):
        batches = [b for b in src.batches() if b.num_rows]
        meta = src.finished_meta(sum(b.num_rows for b in batches), len(batches))
        names = src.names
        try:
            table = pa.Table.from_batches(batches, schema=src.schema)
        except (pa.ArrowException, ValueError) as exc:
            raise TraceFileError(p, f"the events could not be read: the file is damaged ({_short(exc)})") from None
    else:
        pf = src
        meta = _meta_of(p, pf.metadata.metadata)
        try:
            names = set(pf.schema_arrow.names)
        except (pa.ArrowException, ValueError) as exc:   # ValueError: a column name that is not UTF-8
            raise TraceFileError(p, f"is damaged: its schema cannot be read ({_short(exc)})") from None
        _check_columns(p, names, meta)
        try:
            table = pf.read(columns=[c for c in REQUIRED_COLUMNS if c in names] + [c for c in OPTIONAL_COLUMNS if c in names])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TraceFileError(p, f"the events could not be read: the file is damaged ({_short(exc)})") from None
    table = table.select([c for c in REQUIRED_COLUMNS if c in names] + [c for c in OPTIONAL_COLUMNS if c in names])
    try:
        events_df = events_frame(table)
    except (pa.ArrowException, ValueError, IndexError, TypeError, OverflowError) as exc:   # damaged values (names not UTF-8, …)
        raise TraceFileError(p, f"the events could not be decoded: the file is damaged ({_short(exc)})") from None
    return events_df, _upgrade_meta(meta)


def _check_columns(p: Path, names: set[str], meta: dict) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names
               and not (c in ADDED_IN_V3 and meta.get("format_version", 1) < 3)]
    if missing:
        raise TraceFileError(p, f"the events table lacks column(s) {', '.join(missing)} "
                                f"(format version {meta['format_version']})")


def events_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow events → the DataFrame `events.to_frame` gives: numeric columns in their own
    dtypes, `ifname` and the address strings and hook names as categoricals."""
    for name in set(ADDED_IN_V3) - set(table.column_names):   # a version 2 file: no flow label
        table = table.append_column(name, pa.array(np.zeros(table.num_rows, dtype=_NUMERIC_TYPES[name])))
    numeric = {name: dt for name, dt in _NUMERIC}
    numeric.update({c: dt for c, dt in OPTIONAL_COLUMNS.items() if c in table.column_names})
    casts = []
    for name, dt in numeric.items():
        col = table.column(name)
        if col.null_count or col.type != _ARROW_INT[dt]:
            casts.append(name)
    if casts:   # older or foreign writers: other integer widths, nulls
        for name in casts:
            i = table.column_names.index(name)
            table = table.set_column(i, name, pa.array(_np_col(table.column(name), numeric[name])))
    ifn = _names_categorical(table.column("ifname"))
    addr_cols, strs = tracecols.address_columns(table, _ADDRS)
    order = REQUIRED_COLUMNS[:-1] + [c for c in OPTIONAL_COLUMNS if c in table.column_names]
    # split_blocks: one block per column, no consolidation copy (~0.5 s per million rows)
    df = table.select(list(numeric)).to_pandas(split_blocks=True)
    for name, v in addr_cols.items():
        df[name] = v
    df = df[order]
    df["ifname"] = ifn
    df[list(strs)] = pd.DataFrame(strs, index=df.index)
    add_derived(df)
    return df


def _names_categorical(col: pa.ChunkedArray) -> pd.Categorical:
    """A dictionary column → one categorical. Each row group has its own dictionary: map
    them onto one set of categories chunk by chunk (no per-row Python work)."""
    if not pa.types.is_dictionary(col.type):
        return pd.Categorical(col.to_pandas().astype(str))
    cats: dict[str, int] = {}
    parts = []
    for chunk in col.chunks:
        names = [str(n) for n in chunk.dictionary.to_pylist()]
        remap = np.array([cats.setdefault(n, len(cats)) for n in names] or [0], dtype=np.int32)
        idx = chunk.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        parts.append(remap[idx])
    codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return pd.Categorical.from_codes(codes, categories=list(cats) or [""])


def _np_col(col: pa.ChunkedArray, dt: np.dtype) -> np.ndarray:
    if col.null_count:
        col = col.fill_null(0)
    return col.to_numpy().astype(dt, copy=False)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Address strings and hook names as categoricals, converting each distinct value once."""
    for c, v in events.derived(df).items():
        df[c] = v
    return df


def ip_categorical(col: np.ndarray) -> pd.Categorical:
    """uint32 IPv4 numbers → categorical dotted strings ("" for 0)."""
    return events.ip_categorical(np.asarray(col))


def _check_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise TraceFileError(p, "no such file", "give the path written by `podtrace capture -w` or `podtrace flow -w`")
    if p.is_dir():
        raise TraceFileError(p, "is a directory, not a trace file")
    if p.stat().st_size == 0:
        raise TraceFileError(p, "the file is empty (0 bytes): the capture that wrote it did not finish")
    return p


STREAM_SIGNATURE = b"\xff\xff\xff\xff"   # an Arrow IPC stream's first message: what a Writer appends to


def _open(p: Path) -> "pq.ParquetFile | _Stream":
    try:
        with open(p, "rb") as f:
            head = f.read(4)
            f.seek(max(p.stat().st_size - 4, 0))
            tail = f.read(4)
    except OSError as exc:
        raise TraceFileError(p, f"cannot be read ({exc.strerror})") from None
    if head == STREAM_SIGNATURE:
        return _Stream(p)
    if head != b"PAR1":
        raise TraceFileError(p, "is not a Parquet file (no PAR1 signature)")
    if tail != b"PAR1":
        raise TraceFileError(p, "is truncated or damaged: the Parquet footer is missing "
                                "(the writer was killed, or the copy is incomplete)")
    try:
        return pq.ParquetFile(p)
    except (pa.ArrowException, OSError, ValueError) as exc:   # ValueError: names that are not UTF-8
        raise TraceFileError(p, f"is damaged: its Parquet footer cannot be read ({_short(exc)})") from None


class _Stream:
    """An unfinished trace: the Arrow IPC stream a Writer appends to (`FILE.part`). The
    schema carries the metadata known when writing started; `batches()` yields every batch
    up to the last complete one, and `problem` then says why the rest could not be read
    (None: the stream ended cleanly)."""

    def __init__(self, p: Path):
        self.path = p
        self.problem: str | None = None
        try:
            self._file = pa.OSFile(str(p), "rb")
        except OSError as exc:
            raise TraceFileError(p, f"cannot be read ({exc.strerror or exc})") from None
        try:
            self._reader = pa.ipc.open_stream(self._file, options=pa.ipc.IpcReadOptions(use_threads=False))
            self.schema = self._reader.schema
            self.names = set(self.schema.names)
        except (pa.ArrowException, OSError, ValueError) as exc:   # ValueError: names that are not UTF-8
            self._file.close()
            raise TraceFileError(p, "is an unfinished trace whose header is cut off or damaged: nothing "
                                    f"in it can be read ({_short(exc)})") from None
        try:
            self.meta = _meta_of(p, self.schema.metadata, "an Arrow stream")
            _check_columns(p, self.names, self.meta)
        except TraceFileError:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def batches(self):
        try:
            while True:
                try:
                    batch = self._reader.read_next_batch()
                    batch.validate(full=True)
                except StopIteration:
                    return
                except (pa.ArrowException, OSError, ValueError) as exc:
                    self.problem = _short(exc)
                    return
                yield batch
        finally:
            self._file.close()

    def finished_meta(self, rows: int, groups: int) -> dict:
        """The stream's metadata with what was read of it (call after `batches()`)."""
        meta = dict(self.meta, incomplete=True, events=rows, row_groups=groups)
        reason = meta.get("incomplete_reason") or "unfinished: the writer did not finish this file"
        if self.problem:
            reason = f"{reason}; the end is cut off ({self.problem})"
        meta["incomplete_reason"] = str(reason)
        return meta


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__


def _meta_of(p: Path, kv: dict | None, what: str = "a Parquet file") -> dict:
    raw = (kv or {}).get(META_KEY)
    if raw is None:
        raise TraceFileError(p, f"is {what} but not a podtrace trace (no `podtrace` metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise TraceFileError(p, "has damaged podtrace metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise TraceFileError(p, "has damaged podtrace metadata (not a JSON object)")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise TraceFileError(p, f"has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise TraceFileError(p, f"was written by a newer podtrace (format {version}; this one reads up to "
                                f"{FORMAT_VERSION})", "upgrade podtrace to read it")
    meta["format_version"] = version
    return meta


def _upgrade_meta(meta: dict) -> dict:
    """Bring older metadata to the current shape (in memory; the file is not changed)."""
    version = meta["format_version"]
    if version < FORMAT_VERSION:
        meta = {**meta, "upgraded_from": meta.get("upgraded_from", version)}
    if version == 1:
        # v1: written by the first `flow --save`: no kind, no cluster lists, no kernel.
        meta = {**meta, "kind": "flow" if "src" in meta else "capture", "upgraded_from": 1}
        meta.setdefault("counters", {})
        meta.setdefault("hooks", [])
        meta.setdefault("nodes", None)
        meta.setdefault("pods", None)
        meta.setdefault("services", None)
        meta.setdefault("kernel", None)
        meta.setdefault("clock", {"source": "CLOCK_MONOTONIC (bpf_ktime_get_ns)", "node_offsets_ns": {}})
    meta["format_version"] = FORMAT_VERSION
    return meta


def cleanup_writers() -> list[str]:
    """Salvage the unfinished trace file of every registered writer that is no longer
    running (salvage_writer); writers still running are left alone. One line per
    file handled."""
    if not any(not ownership.writer_running(w) for w in ownership.registered_writers()):
        return []
    out: list[str] = []
    with ownership.writers_locked():
        for w in ownership.registered_writers():     # again, under the lock: another cleanup may have run
            if ownership.writer_running(w):
                continue
            if w.get("damaged"):
                ownership.unregister(Path(w["registration"]))
                out.append(f"removed the unreadable writer record {w['registration']}")
                continue
            out += salvage_writer(w)
            ownership.unregister(Path(w["registration"]))
    return out
