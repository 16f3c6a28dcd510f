"""Property tests of the trace-file reader: `tracefile.load` / `read_meta` on arbitrary,
truncated or damaged bytes raise only the module's documented error (TraceFileError, a
BadInput: exit 2 with one line), never a pyarrow, numpy, pandas, JSON or Python error — and
a file that does load gives well-formed events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import events, tracefile
from tracer.errors import BadInput

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _events(n: int = 64) -> np.ndarray:
    arr = np.zeros(n, dtype=events.EVENT_DTYPE)
    arr["ts_ns"] = np.arange(n) * 1000 + 10**9
    arr["saddr"] = 0x0201F40A       # 10.244.1.2 (network order, as the kernel gives it)
    arr["daddr"] = 0x0302F40A
    arr["sport"] = np.arange(n)
    arr["hook"] = np.arange(n) % 4 + 1
    arr["proto"] = 17
    arr["ifname"] = [b"eth0", b"cni0", b"flannel.1", b"veth1234"] * (n // 4)
    return arr


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    """Valid trace files, compressed (the default) and not (damage then hits values, not the
    decompressor), as bytes."""
    out = {}
    d = tmp_path_factory.mktemp("traces")
    for comp in ("zstd", "none"):
        w = tracefile.Writer(d / f"{comp}.parquet", compression=comp, row_group_events=32)
        w.write_records(_events())
        p = w.close({"kind": "capture", "clock": {}, "inventory": "none",
                     "src": {"spec": "default/a", "ip": "10.244.1.2"}})
        out[comp] = p.read_bytes()
        df, meta = tracefile.load(p)      # the originals are fine
        assert len(df) == 64 and meta["events"] == 64
    return out


def _check(path) -> None:
    """load() and read_meta() either succeed with sane results or raise TraceFileError."""
    for fn in (tracefile.read_meta, tracefile.load):
        try:
            res = fn(path)
        except tracefile.TraceFileError as exc:
            assert isinstance(exc, BadInput) and exc.exit_code == 2
            assert "\n" not in exc.line(), exc.line()
            continue
        if fn is tracefile.load:
            df, meta = res
            assert isinstance(df, pd.DataFrame) and isinstance(meta, dict)
            assert {"saddr_str", "daddr_str", "hook_name", "ifname"} <= set(df.columns)
        else:
            assert isinstance(res, dict)


@SETTINGS
@given(data=st.binary(max_size=4096), head=st.booleans())
def test_arbitrary_bytes(tmp_path, data, head):
    p = tmp_path / "x.parquet"
    # With the signature at both ends the bytes get past the cheap checks into pyarrow.
    p.write_bytes((b"PAR1" + data + b"PAR1") if head else data)
    _check(p)


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, good_files, comp, cut):
    raw = good_files[comp]
    p = tmp_path / "t.parquet"
    p.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(tracefile.TraceFileError):
        tracefile.load(p)


@SETTINGS
@given(comp=st.sampled_from(["zstd", "none"]), data=st.data())
def test_damaged(tmp_path, good_files, comp, data):
    raw = bytearray(good_files[comp])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            chunk = data.draw(st.binary(min_size=1, max_size=12))
            raw[at:at + len(chunk)] = chunk[: len(raw) - at]
    p = tmp_path / "d.parquet"
    p.write_bytes(bytes(raw))
    _check(p)


def test_not_a_file_kinds(tmp_path):
    for bad in (tmp_path / "missing.parquet", tmp_path):
        with pytest.raises(tracefile.TraceFileError):
            tracefile.load(bad)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(tracefile.TraceFileError, match="empty"):
        tracefile.load(empty)
    part = tmp_path / "half.parquet.part"          # what a killed --save leaves
    w = tracefile.Writer(tmp_path / "half.parquet", row_group_events=16)
    w.write_records(_events())                       # row groups on disk, no footer yet
    with pytest.raises(tracefile.TraceFileError, match="truncated or damaged"):
        tracefile.load(part)
    w.abort()
    assert not part.exists()
