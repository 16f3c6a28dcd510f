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
            arr[i][c] = ADDRS[(a + j * b) % len(ADDRS)] & 0xFFFFFFFF
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
            v = int(rec[c])
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
