"""events.to_frame against a row-by-row oracle: every derived column (device name, address
strings, hook name) equals what decoding each record on its own gives, and categories come
in value order (what analysis groupings rely on for a stable output order)."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.kernel import record

NAMES = [b"eth0", b"cni0", b"flannel.1", b"veth1234abcd", b"lo", b"x" * 15, b"eth0\0junk", b""]
ADDRS = [0, 0x0AF40102, 0x0AF40202, 0xAC1E000B, 0xFFFFFFFF, 0x0A600000A]
IP_COLS = ["saddr", "daddr", "outer_saddr", "outer_daddr", "ct_orig_src", "ct_orig_dst",
           "ct_reply_src", "ct_reply_dst"]


def _records(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    arr = np.zeros(len(rows), dtype=record.EVENT_DTYPE)
    for i, (name, a, b, hook) in enumerate(rows):
        arr[i]["ifname"] = NAMES[name]
        for j, c in enumerate(IP_COLS):
            arr[i][c] = record.v4_field(ADDRS[(a + j * b) % len(ADDRS)] & 0xFFFFFFFF)
        arr[i]["hook"] = hook
    return arr


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(NAMES) - 1), st.integers(0, 9), st.integers(0, 9),
                          st.integers(0, 12)), max_size=300))
def test_to_frame_matches_each_record_decoded_alone(rows):
    arr = _records(rows)
    df = record.to_frame(arr)
    assert len(df) == len(arr)
    for i, rec in enumerate(arr):
        assert df["ifname"].iloc[i] == bytes(rec["ifname"]).split(b"\0", 1)[0].decode()
        for c in IP_COLS:
            v = int.from_bytes(bytes(rec[c][:4]), "big")
            assert df[c].iloc[i] == v
            assert df[c + "_str"].iloc[i] == (str(ipaddress.IPv4Address(v)) if v else "")
        assert df["hook_name"].iloc[i] == record.HOOKS.get(int(rec["hook"]), f"hook{int(rec['hook'])}")
    for c in IP_COLS:
        cats = list(df[c + "_str"].cat.categories) if hasattr(df[c + "_str"], "cat") else None
        if cats is not None:
            assert cats == [str(ipaddress.IPv4Address(int(x))) if x else "" for x in sorted(set(df[c]))]


def test_empty_frame_has_every_column():
    df = record.empty_frame()
    assert len(df) == 0 and {"ifname", "saddr_str", "hook_name"} <= set(df.columns)


V6 = ["fd00:10:244:1::2", "fd00:10:244:2::2", "fd00:10:96::a", "::ffff:10.0.0.1", "fe80::1"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.booleans(), st.booleans(), st.booleans()),
                max_size=200))
def test_mixed_families_decode_as_each_record_alone(rows):
    """Rows of both families (per group of addresses, as the flags say): keys as
    tracer.addrs.key gives them, strings in compressed form, IPv4 rows as they always were."""
    from tracer import addrs

    arr = np.zeros(len(rows), dtype=record.EVENT_DTYPE)
    want = []
    groups = {"saddr": record.FLAG_V6, "daddr": record.FLAG_V6, "outer_saddr": record.FLAG_OUTER_V6,
              "outer_daddr": record.FLAG_OUTER_V6, "ct_orig_src": record.FLAG_CT_V6,
              "ct_orig_dst": record.FLAG_CT_V6, "ct_reply_src": record.FLAG_CT_V6, "ct_reply_dst": record.FLAG_CT_V6}
    for i, (a, b, inner6, outer6, ct6) in enumerate(rows):
        flags = (record.FLAG_V6 if inner6 else 0) | (record.FLAG_OUTER_V6 if outer6 else 0) \
            | (record.FLAG_CT_V6 if ct6 else 0)
        arr[i]["flags"] = flags
        row = {}
        for j, c in enumerate(IP_COLS):
            k = (a + j * b) % (len(V6) + 1)
            if flags & groups[c]:
                text = str(ipaddress.IPv6Address(V6[k - 1])) if k else ""
                arr[i][c] = np.frombuffer(addrs.packed16(text), np.uint8) if text else 0
            else:
                v = ADDRS[k % len(ADDRS)] & 0xFFFFFFFF
                text = str(ipaddress.IPv4Address(v)) if v else ""
                arr[i][c] = record.v4_field(v)
            row[c] = text
        want.append(row)
    df = record.to_frame(arr)
    for i, row in enumerate(want):
        for c, text in row.items():
            assert df[c + "_str"].iloc[i] == text
            assert int(df[c].iloc[i]) == addrs.key(text)
    assert all(df[c].dtype == np.uint64 for c in IP_COLS)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, len(NAMES) - 1), st.integers(0, 5), st.integers(1, 5),
                                   st.integers(0, 30)), max_size=6), max_size=5))
def test_concat_keeps_every_record_byte_for_byte(parts):
    """record.concat: the wire layout unchanged (big-endian address fields stay as they were),
    also for slices of a larger chunk; an array of another layout is converted field by field."""
    arrs = [_records(p) for p in parts]
    sliced = [a[: max(0, len(a) - 1)] for a in arrs]
    for given_parts in (arrs, sliced):
        out = record.concat(given_parts)
        assert out.dtype == record.EVENT_DTYPE
        assert out.tobytes() == b"".join(a.tobytes() for a in given_parts)
    native = np.dtype([(n, record.EVENT_DTYPE.fields[n][0].newbyteorder("=")) for n in record.EVENT_DTYPE.names])
    if arrs and any(len(a) for a in arrs):
        other = [a.astype(native) for a in arrs]
        out = record.concat(other)
        assert out.dtype == record.EVENT_DTYPE
        assert out.tobytes() == b"".join(a.tobytes() for a in arrs)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, len(NAMES) - 1), st.integers(0, 9), st.integers(0, 9),
                                   st.integers(0, 12)), max_size=40), max_size=6))
def test_columns_joined_decode_as_the_records_do(parts):
    """What a coordinator does while the trace runs (each batch into `columns`) and after it
    (`join_columns`, then to_frame) gives the frame of the records concatenated."""
    arrs = [_records(p) for p in parts]
    want = record.to_frame(record.concat(arrs))
    got = record.to_frame(record.join_columns([record.columns(a) for a in arrs]))
    assert list(got.columns) == list(want.columns)
    assert got.dtypes.equals(want.dtypes)
    assert got.equals(want)
    assert sum(record.count(record.columns(a)) for a in arrs) == len(want)


def _packets(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Records of packets: protocol (0: a buffer not parsed), ports, IP ID, TCP sequence."""
    arr = np.zeros(len(rows), dtype=record.EVENT_DTYPE)
    for i, (proto, sport, dport, ip_id, seq) in enumerate(rows):
        arr[i]["proto"], arr[i]["sport"], arr[i]["dport"] = proto, sport, dport
        arr[i]["ip_id"], arr[i]["ip_len"], arr[i]["tcp_seq"], arr[i]["ts_ns"] = ip_id, 60 + i % 7, seq, i
    return arr


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 6, 17]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                          st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)), max_size=80),
       st.sampled_from([1, 2, 4, 64, 3, 12]))
def test_events_dropped_as_they_come_are_those_the_merge_drops(rows, n):
    """record.sampled on a batch (records or columns) keeps what keep_sampled keeps of the
    frame, for the sampling then and for any later, higher power of two; a sampling that is
    not a power of two drops nothing early."""
    from tracer.runs.outcome import keep_sampled

    def values(df):   # categories hold only the values present: compare the values
        return df.reset_index(drop=True).astype({c: object for c in df.columns if df[c].dtype == "category"})

    arr = _packets(rows)
    for later in (n, 2 * n, 65536):
        want = values(keep_sampled(record.to_frame(arr), later))
        for part in (arr, record.columns(arr)):
            early = record.sampled(part, n)
            got = values(keep_sampled(record.to_frame(early), later))
            assert got.equals(want)
            if n & (n - 1):
                assert early is part
            else:
                assert record.count(early) == len(keep_sampled(record.to_frame(arr), n))
