"""Kernel struct layouts from BTF: our own reader of /sys/kernel/btf/vmlinux.

This module owns every kernel struct offset podtrace uses. The kernel headers on a node
rarely match its running kernel, so the BPF code is handed offsets (``-D SKB_HEAD=…``) taken
from the kernel's own BTF instead. Format: Documentation/bpf/btf.rst — a ``btf_header``, then a
type section (variable-length ``btf_type`` records, ids from 1) and a string section.

Only what podtrace needs is implemented: member offsets along dotted paths (through
anonymous structs/unions and typedefs), type sizes, and enum values. No libbpf, no bpftool.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from tracer.errors import EnvironmentProblem

VMLINUX = "/sys/kernel/btf/vmlinux"
CACHE_FILE = Path("/run/podtrace/btf-offsets.json")

BTF_MAGIC = 0xEB9F

# BTF_KIND_* numbers from include/uapi/linux/btf.h.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

# Bytes following the 12-byte btf_type header: (fixed extra, extra per vlen item).
_EXTRA: dict[int, tuple[int, int]] = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12),
    ENUM: (0, 8), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
    RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12),
    FLOAT: (0, 0), DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12),
}
# Kinds that only qualify or rename another type: looked through when resolving.
_MODIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})
# Kinds worth finding by name; everything else (functions, vars, …) is never looked up.
_NAMED_KINDS = frozenset({STRUCT, UNION, ENUM, ENUM64, TYPEDEF})

# podtrace only runs on 64-bit nodes; BTF itself does not record the pointer size.
POINTER_SIZE = 8

_HEADER = struct.Struct("<HBBIIIII")
_TRIPLE = struct.Struct("<III")


class BtfError(EnvironmentProblem):
    """BTF is missing, malformed, or does not describe a struct/field podtrace needs."""


def read_blob(path: str) -> bytes:
    """The raw BTF of `path`, or one line saying why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BtfError(
            f"BTF: cannot read {path}: {exc.strerror}",
            "the kernel needs CONFIG_DEBUG_INFO_BTF=y (and podtrace needs root)",
        ) from exc


class Btf:
    """Parsed BTF: type records indexed by id, named aggregates indexed by name offset."""

    def __init__(self, data: bytes, source: str = "BTF"):
        self.source = source
        if len(data) < _HEADER.size:
            raise BtfError(f"BTF: {source} is truncated ({len(data)} bytes)")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data, 0)
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"BTF: {source} is not raw BTF (magic {magic:#x})")
        types_start = hdr_len + type_off
        strs_start = hdr_len + str_off
        if types_start + type_len > len(data) or strs_start + str_len > len(data):
            raise BtfError(f"BTF: {source} is truncated")
        self._data = data
        self._strs = data[strs_start : strs_start + str_len]
        # _pos[id] = byte offset of type `id` in data; id 0 is void and has no record.
        self._pos: list[int] = [0]
        # name offset → ids of named aggregates/typedefs. Keyed by the integer offset so
        # that loading decodes no strings at all (keeps Btf.load fast).
        self._by_name: dict[int, list[int]] = {}
        # Looking a name up scans the whole string section; remember the answers.
        self._aggregates: dict[str, int] = {}
        self._scan(types_start, types_start + type_len)

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        return cls(read_blob(path), path)

    def _scan(self, pos: int, end: int) -> None:
        data, unpack, extra = self._data, _TRIPLE.unpack_from, _EXTRA
        positions, by_name, named = self._pos, self._by_name, _NAMED_KINDS
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            try:
                fixed, per_item = extra[kind]
            except KeyError:
                raise BtfError(f"BTF: {self.source} has unknown type kind {kind}") from None
            positions.append(pos)
            if name_off and kind in named:
                by_name.setdefault(name_off, []).append(len(positions) - 1)
            pos += 12 + fixed + per_item * (info & 0xFFFF)

    # ---- low-level accessors -------------------------------------------------------------

    def _str(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _type(self, tid: int) -> tuple[str, int, int, int, int]:
        """(name, kind, vlen, kind_flag, size_or_type) of type `tid`."""
        if not 0 < tid < len(self._pos):
            raise BtfError(f"BTF: {self.source} refers to unknown type id {tid}")
        name_off, info, size_or_type = _TRIPLE.unpack_from(self._data, self._pos[tid])
        return self._str(name_off), (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    def _items(self, tid: int, fmt: struct.Struct) -> list[tuple[int, ...]]:
        """The vlen records following type `tid` (members, enumerators)."""
        _, _, vlen, _, _ = self._type(tid)
        start = self._pos[tid] + 12
        return [fmt.unpack_from(self._data, start + i * fmt.size) for i in range(vlen)]

    def _ids_named(self, name: str, kinds: frozenset[int]) -> list[int]:
        """Ids of types called `name` with one of `kinds`; found via the string section."""
        needle = b"\0" + name.encode() + b"\0"
        ids: list[int] = []
        at = self._strs.find(needle)
        while at >= 0:  # strings are deduplicated, but do not rely on it
            ids += [t for t in self._by_name.get(at + 1, []) if self._type(t)[1] in kinds]
            at = self._strs.find(needle, at + 1)
        return ids

    def _resolve(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type id."""
        while tid:
            _, kind, _, _, ref = self._type(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = ref
        return tid

    def _aggregate(self, name: str) -> int:
        """Id of the struct/union `name` (or a typedef naming one, e.g. possible_net_t)."""
        if name not in self._aggregates:
            self._aggregates[name] = self._find_aggregate(name)
        return self._aggregates[name]

    def _find_aggregate(self, name: str) -> int:
        for tid in self._ids_named(name, frozenset({STRUCT, UNION})):
            if self._type(tid)[2] or self._type(tid)[4]:  # skip empty placeholders
                return tid
        for tid in self._ids_named(name, frozenset({TYPEDEF})):
            target = self._resolve(tid)
            if target and self._type(target)[1] in (STRUCT, UNION):
                return target
        raise BtfError(f"BTF: no struct '{name}' in {self.source}")

    # ---- members -------------------------------------------------------------------------

    def _find_member(self, tid: int, name: str) -> tuple[int, int, bool] | None:
        """(bit offset, type id, is_bitfield) of member `name`, looking into anonymous
        struct/union members recursively since C lets their fields be named directly."""
        kind_flag = self._type(tid)[3]
        for name_off, mtype, raw in self._items(tid, _TRIPLE):
            # With kind_flag the offset word packs bitfield size (high 8) and bit offset.
            bit_off = raw & 0xFFFFFF if kind_flag else raw
            bits = raw >> 24 if kind_flag else 0
            if name_off == 0:
                inner = self._resolve(mtype)
                if inner and self._type(inner)[1] in (STRUCT, UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return bit_off + found[0], found[1], found[2]
                continue
            if self._str(name_off) == name:
                bitfield = bool(bits) or bit_off % 8 != 0 or self._is_int_bitfield(mtype)
                return bit_off, mtype, bitfield
        return None

    def _is_int_bitfield(self, tid: int) -> bool:
        """Old-style (kind_flag=0) bitfields are INT types narrower than their byte size."""
        tid = self._resolve(tid)
        _, kind, _, _, size = self._type(tid)
        if kind != INT:
            return False
        (encoding,) = struct.unpack_from("<I", self._data, self._pos[tid] + 12)
        return (encoding & 0xFF) != size * 8 or (encoding >> 16) & 0xFF != 0

    def _walk(self, path: str) -> tuple[int, int]:
        """(byte offset, member type id) of a dotted path like 'net.ns.inum'."""
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise BtfError(f"BTF: bad member path '{path}' (want struct.member[.member…])")
        tid = self._aggregate(parts[0])
        where, bit_off, mtype = parts[0], 0, 0
        for i, field in enumerate(parts[1:]):
            if i:  # descend into the previous member: it must be an embedded struct/union
                tid = self._resolve(mtype)
                if not tid or self._type(tid)[1] not in (STRUCT, UNION):
                    raise BtfError(
                        f"BTF: {where} is not an embedded struct/union; cannot reach '{field}'"
                    )
            found = self._find_member(tid, field)
            if found is None:
                struct_name = self._type(tid)[0] or f"(anonymous, in {where})"
                raise BtfError(f"BTF: struct {struct_name} has no member '{field}'")
            off, mtype, bitfield = found
            where = f"{where}.{field}"
            if bitfield:
                raise BtfError(f"BTF: {where} is a bitfield; it has no byte offset")
            bit_off += off
        return bit_off // 8, mtype

    # ---- public API ----------------------------------------------------------------------

    def offset(self, path: str) -> int:
        """Byte offset of `path` ('sk_buff.head') from the start of its first struct."""
        return self._walk(path)[0]

    def size(self, path: str) -> int:
        """Byte size of the member's type, or of the struct when `path` has no dot."""
        if "." not in path:
            return self.struct_size(path)
        return self._type_size(self._walk(path)[1], path)

    def struct_size(self, name: str) -> int:
        return self._type(self._aggregate(name))[4]

    def enum_values(self, name: str) -> dict[str, int]:
        """Enumerator name → value of `enum name` (ENUM or ENUM64, honouring signedness)."""
        ids = self._ids_named(name, frozenset({ENUM, ENUM64}))
        if not ids:
            raise BtfError(f"BTF: no enum '{name}' in {self.source}")
        tid = ids[0]
        _, kind, _, signed, _ = self._type(tid)
        values: dict[str, int] = {}
        if kind == ENUM:
            fmt = struct.Struct("<Ii" if signed else "<II")
            for name_off, value in self._items(tid, fmt):
                values[self._str(name_off)] = value
        else:
            for name_off, lo, hi in self._items(tid, _TRIPLE):
                value = hi << 32 | lo
                if signed and value >= 1 << 63:
                    value -= 1 << 64
                values[self._str(name_off)] = value
        return values

    def _type_size(self, tid: int, what: str) -> int:
        tid = self._resolve(tid)
        if not tid:
            raise BtfError(f"BTF: {what} has type void; it has no size")
        _, kind, _, _, size = self._type(tid)
        if kind == PTR:
            return POINTER_SIZE
        if kind == ARRAY:
            elem, _index, nelems = _TRIPLE.unpack_from(self._data, self._pos[tid] + 12)
            return nelems * self._type_size(elem, what)
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return size
        raise BtfError(f"BTF: {what} has a type of kind {kind} with no size")


# ---- the offsets the BPF code needs --------------------------------------------------------

# -D name → member path. Sizes of the three header offsets are added separately because
# their width (u16 today) decides how BPF must read them.
_OFFSET_PATHS = {
    "SKB_HEAD": "sk_buff.head",
    "SKB_DATA": "sk_buff.data",
    "SKB_LEN": "sk_buff.len",
    "SKB_DATA_LEN": "sk_buff.data_len",
    "SKB_TAIL": "sk_buff.tail",
    "SKB_NETWORK_HEADER": "sk_buff.network_header",
    "SKB_MAC_HEADER": "sk_buff.mac_header",
    "SKB_TRANSPORT_HEADER": "sk_buff.transport_header",
    "SKB_DEV": "sk_buff.dev",
    "SKB_NFCT": "sk_buff._nfct",
    "SKB_PROTOCOL": "sk_buff.protocol",
    "SKB_MARK": "sk_buff.mark",
    "NETDEV_IFINDEX": "net_device.ifindex",
    "NETDEV_NAME": "net_device.name",
    "NETDEV_ND_NET": "net_device.nd_net",
    "NET_NS_INUM": "net.ns.inum",
    "NF_HOOK_STATE_HOOK": "nf_hook_state.hook",
}
_SIZE_PATHS = {
    "SKB_NETWORK_HEADER_SIZE": "sk_buff.network_header",
    "SKB_MAC_HEADER_SIZE": "sk_buff.mac_header",
    "SKB_TRANSPORT_HEADER_SIZE": "sk_buff.transport_header",
    "SKB_TAIL_SIZE": "sk_buff.tail",
}


# Conntrack: optional (a kernel without nf_conntrack has no nf_conn). HAVE_CT says which;
# the keys are always present so the cache's key set never varies.
_CT_OFFSET_PATHS = {
    "CT_STATUS": "nf_conn.status",
    "CT_TUPLEHASH": "nf_conn.tuplehash",
    "CT_TH_TUPLE": "nf_conntrack_tuple_hash.tuple",
    "CT_T_SRC_U3": "nf_conntrack_tuple.src.u3",
    "CT_T_SRC_L3NUM": "nf_conntrack_tuple.src.l3num",
    "CT_T_SRC_PORT": "nf_conntrack_tuple.src.u",
    "CT_T_DST_U3": "nf_conntrack_tuple.dst.u3",
    "CT_T_DST_PORT": "nf_conntrack_tuple.dst.u",
    "CT_T_PROTONUM": "nf_conntrack_tuple.dst.protonum",
}
# enum ip_conntrack_info values (skb->_nfct & 7), by name.
_CT_INFO = ["IP_CT_ESTABLISHED", "IP_CT_RELATED", "IP_CT_NEW", "IP_CT_ESTABLISHED_REPLY",
            "IP_CT_RELATED_REPLY", "IP_CT_UNTRACKED"]


def _conntrack_offsets(btf: Btf) -> dict[str, int]:
    keys = [*_CT_OFFSET_PATHS, "CT_TH_SIZE", "CT_STATUS_SIZE", *_CT_INFO]
    try:
        out = {key: btf.offset(path) for key, path in _CT_OFFSET_PATHS.items()}
        out["CT_TH_SIZE"] = btf.struct_size("nf_conntrack_tuple_hash")
        out["CT_STATUS_SIZE"] = btf.size("nf_conn.status")
        info = btf.enum_values("ip_conntrack_info")
        out.update({name: info[name] for name in _CT_INFO})
    except (BtfError, KeyError):
        return dict.fromkeys(keys, 0) | {"HAVE_CT": 0}
    return out | {"HAVE_CT": 1}


# Kprobe arguments: where the calling convention's argument and return registers sit in
# struct pt_regs (x86_64 names; another architecture gets HAVE_KPROBE_ARGS=0 and no kprobes).
_KPROBE_REGS = {"KP_ARG1": "pt_regs.di", "KP_ARG2": "pt_regs.si", "KP_ARG3": "pt_regs.dx",
                "KP_ARG4": "pt_regs.cx", "KP_RC": "pt_regs.ax"}


def _kprobe_offsets(btf: Btf) -> dict[str, int]:
    try:
        out = {key: btf.offset(path) for key, path in _KPROBE_REGS.items()}
    except BtfError:
        return dict.fromkeys(_KPROBE_REGS, 0) | {"HAVE_KPROBE_ARGS": 0}
    return out | {"HAVE_KPROBE_ARGS": 1}


def compute_offsets(btf: Btf) -> dict[str, int]:
    """The -D defines for the BPF code, straight from `btf` (no cache)."""
    out = {key: btf.offset(path) for key, path in _OFFSET_PATHS.items()}
    out.update({key: btf.size(path) for key, path in _SIZE_PATHS.items()})
    out.update(_conntrack_offsets(btf))
    out.update(_kprobe_offsets(btf))
    # BPF reads nd_net as a `struct net *`: valid only while possible_net_t is just that
    # pointer at offset 0 (it is a one-member struct when CONFIG_NET_NS=y).
    if btf.offset("net_device.nd_net.net") != out["NETDEV_ND_NET"] or (
        btf.size("net_device.nd_net.net") != POINTER_SIZE
    ):
        raise BtfError("BTF: possible_net_t.net is not a pointer at offset 0; nd_net unreadable")
    return out


def _cache_key(data: bytes) -> dict[str, object]:
    return {
        "release": os.uname().release,
        "btf_size": len(data),
        "btf_sha256": hashlib.sha256(data).hexdigest(),
    }


def kernel_offsets(btf: Btf | None = None, cache_file: Path | None = None) -> dict[str, int]:
    """The -D defines the BPF code needs (see _OFFSET_PATHS / _SIZE_PATHS).

    Given a `btf`, compute directly. Otherwise use a JSON cache keyed by kernel release and
    the BTF file's size and sha256, because parsing all of vmlinux BTF in Python costs a
    large share of the 2 s startup budget while hashing it costs a few milliseconds. The
    cache is best effort: unreadable or unwritable means we just parse.
    """
    if btf is not None:
        return compute_offsets(btf)
    if cache_file is None and _KERNEL_OFFSETS:   # this process asked already: the kernel is the same
        return dict(_KERNEL_OFFSETS)
    data = read_blob(VMLINUX)
    key = _cache_key(data)
    offsets = _read_cache(cache_file or CACHE_FILE, key)
    if offsets is None:
        offsets = compute_offsets(Btf(data, VMLINUX))
        _write_cache(cache_file or CACHE_FILE, key, offsets)
    if cache_file is None:
        _KERNEL_OFFSETS.update(offsets)
    return offsets


_KERNEL_OFFSETS: dict[str, int] = {}


def _read_cache(cache_file: Path, key: dict[str, object]) -> dict[str, int] | None:
    try:
        doc = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    offsets = doc.get("offsets")
    expected = (set(_OFFSET_PATHS) | set(_SIZE_PATHS) | set(_CT_OFFSET_PATHS) | set(_CT_INFO)
                | {"CT_TH_SIZE", "CT_STATUS_SIZE", "HAVE_CT"} | set(_KPROBE_REGS) | {"HAVE_KPROBE_ARGS"})
    if doc.get("key") != key or not isinstance(offsets, dict) or set(offsets) != expected:
        return None  # another kernel, another BTF, or an older podtrace's key set
    if not all(isinstance(v, int) for v in offsets.values()):
        return None
    return offsets


def _write_cache(cache_file: Path, key: dict[str, object], offsets: dict[str, int]) -> None:
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "offsets": offsets}, indent=1))
        tmp.replace(cache_file)  # atomic: concurrent agents never read half a file
    except OSError:
        tmp.unlink(missing_ok=True)
