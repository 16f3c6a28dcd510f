"""The hop event record, defined once for the C struct the BPF code fills and its decoder.

`c_struct()` is the C definition; `EVENT_DTYPE` the numpy dtype that decodes ring-buffer
bytes in batches.

Addresses stay in network byte order in the record (the kernel copies them as they are),
16 bytes each: an IPv4 address in the first 4 (the rest zero), the event's flags saying
which family each group (inner, outer, conntrack) is. Decoding converts whole columns at
once into uint64 keys (`tracer.addrs.key` semantics) and categorical strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


import numpy as np

from tracer.kernel import contract

if TYPE_CHECKING:  # pandas is imported where frames are made: agents only ship raw records
    import pandas as pd

# (name, C type, numpy type). Ordered largest-first so the C struct has no hidden padding
# and numpy's packed layout equals the compiler's.
EVENT_FIELDS: list[tuple[str, str, str]] = [
    ("ts_ns", "u64", "<u8"),        # bpf_ktime_get_ns(): monotonic, shared by all lab nodes
    ("skb", "u64", "<u8"),          # skb address: follows one buffer inside one kernel only
    ("location", "u64", "<u8"),     # kfree_skb: kernel address that dropped it
    ("netns", "u32", "<u4"),        # network namespace inode (net->ns.inum)
    ("ifindex", "u32", "<u4"),
    ("saddr", "u8[16]", "(16,)u1"),        # inner source (IPv4 in the first 4 bytes), network order
    ("daddr", "u8[16]", "(16,)u1"),
    ("outer_saddr", "u8[16]", "(16,)u1"),  # set when the packet was seen inside VXLAN/Geneve
    ("outer_daddr", "u8[16]", "(16,)u1"),
    ("ct_orig_src", "u8[16]", "(16,)u1"),  # conntrack original tuple
    ("ct_orig_dst", "u8[16]", "(16,)u1"),
    ("ct_reply_src", "u8[16]", "(16,)u1"), # conntrack reply tuple (shows the NAT that will apply)
    ("ct_reply_dst", "u8[16]", "(16,)u1"),
    ("vni", "u32", "<u4"),
    ("flow_lbl", "u32", "<u4"),     # IPv6 flow label (0 for IPv4)
    ("tcp_seq", "u32", ">u4"),
    ("len", "u32", "<u4"),          # skb->len at the hook
    ("reason", "u32", "<u4"),       # kfree_skb drop reason number (names from tracefs)
    ("ct_status", "u32", "<u4"),    # nf_conn->status (low 32 bits: IPS_* flags)
    ("sport", "u16", ">u2"),        # TCP/UDP ports; ICMP: id in sport, seq in dport
    ("dport", "u16", ">u2"),
    ("ip_id", "u16", ">u2"),
    ("ip_len", "u16", "<u2"),       # host order (the parser assembles it from the two bytes)
    ("ct_orig_sport", "u16", ">u2"),
    ("ct_orig_dport", "u16", ">u2"),
    ("ct_reply_sport", "u16", ">u2"),
    ("ct_reply_dport", "u16", ">u2"),
    ("hook", "u8", "u1"),           # see contract.HOOKS
    ("proto", "u8", "u1"),          # inner IP protocol
    ("tcp_flags", "u8", "u1"),
    ("icmp_type", "u8", "u1"),
    ("flags", "u8", "u1"),          # see contract.FLAG_*
    ("encap", "u8", "u1"),          # see contract.ENCAP
    ("cpu", "u8", "u1"),
    ("ttl", "u8", "u1"),
    ("ct_info", "u8", "u1"),        # 0: no conntrack entry on the skb; else ctinfo + 1
    ("_pad", "char[7]", "S7"),
    ("ifname", "char[16]", "S16"),
]

# What the hook, flags and encap fields hold: the kernel contract's values, under the names
# the record's readers know them by.
HOOKS, HOOK_IDS, ENCAP = contract.HOOKS, contract.HOOK_IDS, contract.ENCAP
FLAG_FOLLOWED, FLAG_DF = contract.FLAG_FOLLOWED, contract.FLAG_DF
FLAG_V6, FLAG_OUTER_V6, FLAG_CT_V6 = contract.FLAG_V6, contract.FLAG_OUTER_V6, contract.FLAG_CT_V6
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
PROTO_IDS = {v: k for k, v in PROTOS.items()}

EVENT_DTYPE = np.dtype([(name, np_type) for name, _, np_type in EVENT_FIELDS])
_RECORD = np.dtype((np.void, EVENT_DTYPE.itemsize))    # a record as its bytes


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """Record arrays in one, byte for byte (the wire layout: numpy 2 would otherwise turn the
    big-endian address fields native, and the bytes sent to a coordinator would be wrong).
    Copied as whole records (numpy copies structured records field by field otherwise)."""
    if not parts:
        return np.zeros(0, dtype=EVENT_DTYPE)
    if all(p.dtype == EVENT_DTYPE for p in parts):
        return np.concatenate([p.view(_RECORD) for p in parts]).view(EVENT_DTYPE)
    return np.concatenate(parts, dtype=EVENT_DTYPE)


def c_struct() -> str:
    """The C definition of `struct event`, generated so C and Python cannot drift."""
    lines = ["struct event {"]
    for name, c_type, _ in EVENT_FIELDS:
        if c_type.startswith(("char[", "u8[")):
            base, dim = c_type.split("[", 1)
            lines.append(f"    {base} {name}[{dim};")
        else:
            lines.append(f"    {c_type} {name};")
    lines.append("} __attribute__((packed));")
    lines.append(f"_Static_assert(sizeof(struct event) == {EVENT_DTYPE.itemsize}, \"event layout\");")
    return "\n".join(lines)


def c_defines() -> dict[str, int]:
    """The record's own numbers for the C build (the field values are in contract.c_header())."""
    return {"EVENT_SIZE": EVENT_DTYPE.itemsize}


def _categorical(col: np.ndarray, name_of, sort: bool = True) -> "pd.Categorical":
    """A column of few distinct values → categorical strings, converting each value once.
    Categories in value order (what np.unique gave; else in order of appearance), found by
    hashing (pd.factorize), not by sorting the whole column."""
    import pandas as pd

    codes, uniq = pd.factorize(col, sort=sort)
    names = [name_of(v) for v in uniq]
    if len(set(names)) != len(names):  # e.g. two byte strings decoding alike: fall back to plain
        return pd.Categorical(np.array(names, dtype=object)[codes])
    return pd.Categorical.from_codes(codes.astype(np.int32), categories=names)


def _names_categorical(col: np.ndarray) -> "pd.Categorical":
    """char[16] device names → categorical strings. The 16 bytes are two 64-bit halves:
    each half is factorized (hashing), the pair of codes identifies the name exactly, and
    the categories are put in byte order as np.unique on the names would."""
    import pandas as pd

    halves = np.ascontiguousarray(col).view("<u8").reshape(-1, 2)
    ca, ua = pd.factorize(halves[:, 0])
    cb, ub = pd.factorize(halves[:, 1])
    codes, uniq = pd.factorize(ca.astype(np.int64) * max(len(ub), 1) + cb)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]     # a row holding each distinct name
    raw = [bytes(col[i]) for i in first]
    order = sorted(range(len(raw)), key=raw.__getitem__)
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    names = [raw[i].split(b"\0", 1)[0].decode("ascii", errors="replace") for i in order]
    codes = rank[codes] if len(codes) else codes.astype(np.int32)
    if len(set(names)) != len(names):
        return pd.Categorical(np.array(names, dtype=object)[codes])
    return pd.Categorical.from_codes(codes, categories=names)


IP_COLUMNS = ("saddr", "daddr", "outer_saddr", "outer_daddr", "ct_orig_src", "ct_orig_dst",
              "ct_reply_src", "ct_reply_dst")
# The flag that says an address column holds IPv6 addresses.
IP_FAMILY_FLAG = {"saddr": FLAG_V6, "daddr": FLAG_V6, "outer_saddr": FLAG_OUTER_V6,
                  "outer_daddr": FLAG_OUTER_V6, "ct_orig_src": FLAG_CT_V6, "ct_orig_dst": FLAG_CT_V6,
                  "ct_reply_src": FLAG_CT_V6, "ct_reply_dst": FLAG_CT_V6}


def v4_field(values) -> np.ndarray:
    """IPv4 addresses as numbers (what a frame's key column holds for IPv4) → the record's
    16-byte form (n x 16, or 16 for one number): for building records in tests and benches."""
    v = np.asarray(values, dtype=np.uint64).astype(">u4")
    out = np.zeros(v.shape + (16,), dtype=np.uint8)
    out[..., :4] = v.reshape(v.shape + (1,)).view(np.uint8).reshape(v.shape + (4,))
    return out


def addr_keys(raw: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Only the uint64 keys of an address column (see ip_columns)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 16)
    keys = raw[:, :4].copy().view(">u4").reshape(-1).astype(np.uint64)
    if np.any(flags):
        keys = ip_columns(raw, flags)[0]
    return keys


def ip_columns(raw: np.ndarray, flags: np.ndarray, sort: bool = False) -> tuple[np.ndarray, "pd.Categorical"]:
    """One address column of 16-byte records (n x 16 uint8) and the rows' flags → (uint64
    keys, categorical strings), as `tracer.addrs` defines them. IPv4 rows keep the numbers
    they always had; each distinct IPv6 address is converted once: the 16 bytes are two
    64-bit halves, factorized like device names."""
    import pandas as pd

    from tracer import addrs

    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 16)
    v4 = raw[:, :4].copy().view(">u4").reshape(-1).astype(np.uint64)
    v6rows = np.flatnonzero(flags)
    if not len(v6rows):
        return v4, ip_categorical(v4.astype(np.uint32), sort)
    keys = v4.copy()
    keys[v6rows] = 0
    halves = raw[v6rows].view("<u8").reshape(-1, 2)
    ca, ua = pd.factorize(halves[:, 0])
    cb, ub = pd.factorize(halves[:, 1])
    codes, uniq = pd.factorize(ca.astype(np.int64) * max(len(ub), 1) + cb)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    packed = [raw[v6rows[i]].tobytes() for i in first]
    k6 = np.array([addrs.key_of_packed(b, True) if any(b) else 0 for b in packed], dtype=np.uint64)
    keys[v6rows] = k6[codes]
    # Strings: IPv4 values and IPv6 addresses together, each distinct one converted once.
    c4, u4 = pd.factorize(np.where(flags, 0, v4.astype(np.uint32)).astype(np.uint32), sort=sort)
    names4 = ip_categorical(np.asarray(u4, dtype=np.uint32)).astype(str).tolist() if len(u4) else []
    names6 = [addrs.text_of_packed(b, True) for b in packed]
    names = list(dict.fromkeys(names4 + names6))
    if sort:
        from tracer.addrs import sort_key
        names = sorted(names, key=lambda s: sort_key(s) if s else (0, -1))
    index = {n: i for i, n in enumerate(names)}
    code = np.empty(len(raw), dtype=np.int32)
    code[:] = np.array([index[n] for n in names4], dtype=np.int32)[c4] if len(names4) else 0
    code[v6rows] = np.array([index[n] for n in names6], dtype=np.int32)[codes]
    return keys, pd.Categorical.from_codes(code, categories=names)


def ip_categorical(col: np.ndarray, sort: bool = False) -> "pd.Categorical":
    """uint32 IPv4 numbers → categorical dotted strings ("" for 0), each distinct value
    converted once; categories in value order with `sort`, else in order of appearance."""
    import pandas as pd

    codes, uniq = pd.factorize(np.asarray(col), sort=sort)
    uniq = np.asarray(uniq, dtype=np.uint32)
    b = uniq.astype(">u4").view(np.uint8).reshape(-1, 4)
    names = [f"{x[0]}.{x[1]}.{x[2]}.{x[3]}" if v else "" for v, x in zip(uniq.tolist(), b.tolist())]
    return pd.Categorical.from_codes(codes.astype(np.int32), categories=names)


def derived(cols, sort: bool = False) -> dict:
    """The columns decoded from the raw record fields: address strings (unless `cols`
    already holds them) and hook names, as categoricals. `cols` maps field names to
    native-order arrays (a dict or a DataFrame); both the live frame (`to_frame`) and a
    loaded trace file take their derived columns here."""
    out = {c + "_str": ip_categorical(np.asarray(cols[c]), sort) for c in IP_COLUMNS
           if c + "_str" not in cols}
    out["hook_name"] = _categorical(np.asarray(cols["hook"]), lambda h: HOOKS.get(int(h), f"hook{int(h)}"), sort)
    return out


def decode(buf: bytes | memoryview | np.ndarray) -> pd.DataFrame:
    """Ring-buffer bytes (n * EVENT_DTYPE.itemsize) → one DataFrame row per event."""
    arr = np.frombuffer(buf, dtype=EVENT_DTYPE) if not isinstance(buf, np.ndarray) else buf
    return to_frame(arr)


def columns(arr: np.ndarray) -> dict[str, np.ndarray]:
    """The fields `to_frame` reads, each in its own contiguous array, integers in native byte
    order: the one pass over the records (strided, the dear part of decoding). A coordinator
    makes it for each batch of events as it arrives, while the trace runs."""
    out = {}
    for name in arr.dtype.names:
        if arr.dtype[name].kind in "ui":
            out[name] = arr[name].astype(arr.dtype[name].newbyteorder("="))
        elif name in IP_FAMILY_FLAG or name == "ifname":
            out[name] = np.ascontiguousarray(arr[name])
    return out


def join_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of `columns` in one, in order."""
    if not parts:
        return columns(np.zeros(0, dtype=EVENT_DTYPE))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def count(part: np.ndarray | dict[str, np.ndarray]) -> int:
    """Events in a record array or in its `columns`."""
    return len(part["ts_ns"]) if isinstance(part, dict) else len(part)


def sampled(part: np.ndarray | dict[str, np.ndarray], n: int) -> np.ndarray | dict[str, np.ndarray]:
    """The events of a record array or of its `columns` that keeping 1 packet in n keeps
    (`contract.kept`), in the same form. A trace's sampling only rises, by powers of two up
    to 1 in 65536: what 1 in n drops, any later sampling drops too, so the events dropped
    with the sampling in force when they are read are the ones the merge would drop at the
    end, and a busy trace drops them as they come. n not a power of two (a user's own
    sampling): nothing is dropped here, as the cap of the later sampling need not be a
    multiple of it."""
    if n <= 1 or n & (n - 1) or count(part) == 0:
        return part
    keep = contract.kept(part, n)
    if keep.all():
        return part
    return {k: v[keep] for k, v in part.items()} if isinstance(part, dict) else part[keep]


def to_frame(arr: np.ndarray | dict[str, np.ndarray]) -> "pd.DataFrame":
    """Records (a record array, or its `columns`) → one row per event."""
    import pandas as pd

    fields = arr if isinstance(arr, dict) else columns(arr)
    flags = fields["flags"]
    cols, strs = {}, {}
    for name, col in fields.items():
        if name in IP_FAMILY_FLAG:
            cols[name], strs[name + "_str"] = ip_columns(col, flags & IP_FAMILY_FLAG[name], sort=True)
        elif name != "ifname":
            cols[name] = col
    cols["ifname"] = _names_categorical(fields["ifname"])
    cols.update(strs)
    cols.update(derived(cols, sort=True))
    return pd.DataFrame(cols, copy=False)     # one constructor: no column-by-column inserts


def empty_frame() -> pd.DataFrame:
    return to_frame(np.zeros(0, dtype=EVENT_DTYPE))
