"""Trace files: Apache Parquet, one row per hop event, with the run's metadata (ends, probes,
namespace placement, drop-reason names, symbolised drop locations) in the file's key-value
metadata under `podtrace`, so a trace can be reconstructed offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadInput

FORMAT_VERSION = 1
META_KEY = b"podtrace"


def save(path: str | Path, events: pd.DataFrame, meta: dict) -> Path:
    p = Path(path)
    table = pa.Table.from_pandas(events.assign(hook_name=events["hook_name"].astype(str)),
                                 preserve_index=False)
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps({"format_version": FORMAT_VERSION, **meta}).encode()
    table = table.replace_schema_metadata(md)
    tmp = p.with_name(p.name + ".part")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(p)
    return p


def load(path: str | Path) -> tuple[pd.DataFrame, dict]:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"trace file {p} does not exist", "give the path passed to --save")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInput(f"{p} is not a Parquet trace file ({exc})", "give a file written by --save") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise BadInput(f"{p} has no podtrace metadata", "give a file written by podtrace --save")
    meta = json.loads(raw)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BadInput(f"{p} was written by a newer podtrace (format {meta['format_version']})",
                       "upgrade podtrace to read it")
    return table.to_pandas(), meta
