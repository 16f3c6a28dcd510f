"""Address columns of trace files: the record's 16-byte addresses as Arrow
fixed_size_binary(16) columns, and back into a frame's uint64 keys and strings (files of
version 2 and older hold IPv4 addresses as unsigned 32-bit numbers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from tracer.kernel import record as events

ADDR16 = pa.binary(16)


def addr_array(raw: np.ndarray) -> pa.FixedSizeBinaryArray:
    """n x 16 bytes → a fixed_size_binary(16) array, without a copy per row."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 16)
    return pa.FixedSizeBinaryArray.from_buffers(ADDR16, len(raw), [None, pa.py_buffer(raw.tobytes())])


def frame_addr_bytes(df: pd.DataFrame, name: str) -> np.ndarray:
    """The 16-byte form of a frame's address column, from its strings (the key of an IPv6
    address cannot be turned back): each distinct address converted once."""
    from tracer import addrs

    s = df.get(name + "_str")
    if s is None:
        keys = df[name].to_numpy().astype(np.uint64)
        if (keys >> np.uint64(32)).any():
            raise ValueError(f"events frame has IPv6 keys in {name} but no {name}_str")
        out = np.zeros((len(keys), 16), dtype=np.uint8)
        out[:, :4] = keys.astype(">u4").view(np.uint8).reshape(-1, 4)
        return out
    cat = s.astype("category") if not isinstance(s.dtype, pd.CategoricalDtype) else s
    table = np.array([list(addrs.packed16(str(c))) if str(c) else [0] * 16 for c in cat.cat.categories]
                     or [[0] * 16], dtype=np.uint8)
    codes = cat.cat.codes.to_numpy()
    return table[np.where(codes < 0, 0, codes)] if len(cat.cat.categories) else np.zeros((len(codes), 16), np.uint8)


def _binary16(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_binary(16) column → n x 16 uint8 (a null reads as the zero address)."""
    parts = []
    for chunk in col.chunks:
        if chunk.null_count:
            chunk = pa.array([v if v is not None else bytes(16) for v in chunk.to_pylist()], ADDR16)
        buf = chunk.buffers()[1]
        a = np.frombuffer(buf, dtype=np.uint8, count=(chunk.offset + len(chunk)) * 16) if buf is not None else np.zeros(0, np.uint8)
        parts.append(a[chunk.offset * 16:].reshape(-1, 16))
    return np.concatenate(parts) if parts else np.zeros((0, 16), dtype=np.uint8)


def address_columns(table: pa.Table, names) -> tuple[dict, dict]:
    """({name: uint64 keys}, {name_str: categorical strings}) of a table's address columns:
    16 bytes (version 3, families from `flags`) or IPv4 numbers (older versions)."""
    flags = table.column("flags").fill_null(0).to_numpy().astype(np.uint8)
    keys, strs = {}, {}
    for name in names:
        col = table.column(name)
        if pa.types.is_fixed_size_binary(col.type):
            keys[name], strs[name + "_str"] = events.ip_columns(_binary16(col), flags & events.IP_FAMILY_FLAG[name])
        else:
            v4 = col.fill_null(0).to_numpy().astype(np.uint32)
            keys[name], strs[name + "_str"] = v4.astype(np.uint64), events.ip_categorical(v4)
    return keys, strs
