"""tracer.btf: a hand-built BTF blob (runs anywhere) and the running kernel's BTF.

Kernel offsets are cross-checked by an independent method: bpftool turns the same BTF into
vmlinux.h and gcc's offsetof() computes the offsets from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import must_run
from tracer.kernel import btf as btf_mod
from tracer.kernel.btf import Btf, BtfError, kernel_offsets
from tracer.errors import EnvironmentProblem

# ---- a synthetic BTF blob ------------------------------------------------------------------


class _Builder:
    """Encodes a few BTF types the way the kernel lays them out (btf.rst)."""

    def __init__(self) -> None:
        self.strs = b"\0"
        self.types = b""
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0
    ) -> int:
        info = kflag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int, bits: int | None = None) -> int:
        encoding = struct.pack("<I", bits if bits is not None else size * 8)
        return self.add(name, btf_mod.INT, 0, size, encoding)

    def aggregate(
        self, name: str, kind: int, size: int, members: list[tuple[str, int, int]], kflag: int = 0
    ) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(name, kind, len(members), size, extra, kflag)

    def blob(self) -> bytes:
        n_types, n_strs = len(self.types), len(self.strs)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, n_types, n_types, n_strs)
        return hdr + self.types + self.strs


@pytest.fixture(scope="module")
def synthetic() -> Btf:
    """struct inner { u32 a; u32 b; };                       // size 8
    typedef struct { struct inner *p; } wrap_t;
    struct outer {                                           // size 48
        u64 head;                                            // 0
        union { struct { u16 x; u16 y; }; u32 xy; };         // 8
        const struct inner in;                               // 12
        wrap_t w;                                            // 24
        u8 name[8];                                          // 32
        u32 flags:3;   (kind_flag bitfield)                  // bit 320
        u32 old;       (kind_flag 0 style: INT of 5 bits)    // bit 352
    };
    enum colour { RED = -1, GREEN = 7 };  enum64 big { HUGE = 1 << 40 };"""
    b = _Builder()
    u8, u16, u32, u64 = b.int_("u8", 1), b.int_("u16", 2), b.int_("u32", 4), b.int_("u64", 8)
    inner = b.aggregate("inner", btf_mod.STRUCT, 8, [("a", u32, 0), ("b", u32, 32)])
    pinner = b.add("", btf_mod.PTR, 0, inner)
    anon_wrap = b.aggregate("", btf_mod.STRUCT, 8, [("p", pinner, 0)])
    wrap_t = b.add("wrap_t", btf_mod.TYPEDEF, 0, anon_wrap)
    xy_struct = b.aggregate("", btf_mod.STRUCT, 4, [("x", u16, 0), ("y", u16, 16)])
    xy_union = b.aggregate("", btf_mod.UNION, 4, [("", xy_struct, 0), ("xy", u32, 0)])
    const_inner = b.add("", btf_mod.CONST, 0, inner)
    arr = b.add("", btf_mod.ARRAY, 0, 0, struct.pack("<III", u8, u32, 8))
    old_bits = b.int_("u32", 4, bits=5)
    b.aggregate(
        "outer", btf_mod.STRUCT, 48,
        [("head", u64, 0), ("", xy_union, 64), ("in", const_inner, 96), ("w", wrap_t, 192),
         ("name", arr, 256), ("flags", u32, 3 << 24 | 320), ("old", old_bits, 352)],
        kflag=1,
    )
    colours = struct.pack("<IiIi", b.s("RED"), -1, b.s("GREEN"), 7)
    b.add("colour", btf_mod.ENUM, 2, 4, colours, kflag=1)
    b.add("big", btf_mod.ENUM64, 1, 8, struct.pack("<III", b.s("HUGE"), 0, 1 << 8))
    return Btf(b.blob(), "synthetic")


def test_synthetic_offsets_through_anonymous_and_nested(synthetic: Btf) -> None:
    assert synthetic.offset("outer.head") == 0
    assert synthetic.offset("outer.x") == 8  # anonymous union → anonymous struct
    assert synthetic.offset("outer.y") == 10
    assert synthetic.offset("outer.xy") == 8
    assert synthetic.offset("outer.in.b") == 16  # through const
    assert synthetic.offset("outer.w.p") == 24  # through a typedef of an anonymous struct
    assert synthetic.offset("wrap_t.p") == 0  # a typedef as the root, like possible_net_t


def test_synthetic_sizes(synthetic: Btf) -> None:
    assert synthetic.size("outer") == synthetic.struct_size("outer") == 48
    assert synthetic.size("outer.y") == 2
    assert synthetic.size("outer.in") == 8
    assert synthetic.size("outer.w.p") == 8  # pointer
    assert synthetic.size("outer.name") == 8  # char[8]


def test_synthetic_errors(synthetic: Btf) -> None:
    with pytest.raises(BtfError, match=r"^BTF: struct outer has no member 'nope'$"):
        synthetic.offset("outer.nope")
    with pytest.raises(BtfError, match=r"no struct 'nosuch'"):
        synthetic.offset("nosuch.a")
    with pytest.raises(BtfError, match=r"outer.flags is a bitfield"):
        synthetic.offset("outer.flags")
    with pytest.raises(BtfError, match=r"outer.old is a bitfield"):
        synthetic.offset("outer.old")  # old-style bitfield: INT with 5 bits
    with pytest.raises(BtfError, match=r"outer.w.p is not an embedded struct"):
        synthetic.offset("outer.w.p.a")  # a pointer is never descended into
    with pytest.raises(BtfError, match=r"bad member path"):
        synthetic.offset("outer.")


def test_synthetic_enums(synthetic: Btf) -> None:
    assert synthetic.enum_values("colour") == {"RED": -1, "GREEN": 7}
    assert synthetic.enum_values("big") == {"HUGE": 1 << 40}
    with pytest.raises(BtfError, match="no enum 'nosuch'"):
        synthetic.enum_values("nosuch")


def test_not_btf_is_an_environment_problem(tmp_path: Path) -> None:
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF" + bytes(40))
    with pytest.raises(BtfError, match="not raw BTF"):
        Btf.load(str(bad))
    with pytest.raises(EnvironmentProblem, match="cannot read"):
        Btf.load(str(tmp_path / "missing"))


# ---- the running kernel --------------------------------------------------------------------


def _need(reason: str) -> None:
    if must_run():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kernel() -> Btf:
    if not os.access(btf_mod.VMLINUX, os.R_OK):
        _need(f"{btf_mod.VMLINUX} is not readable")
    return Btf.load()


def _gcc_offsets(tmp_path: Path) -> dict[str, int]:
    """Offsets and sizes computed by gcc from bpftool's vmlinux.h (a second method)."""
    if not (shutil.which("bpftool") and shutil.which("gcc")):
        _need("bpftool and gcc are needed for the cross-check")
    header = subprocess.run(
        ["bpftool", "btf", "dump", "file", btf_mod.VMLINUX, "format", "c"],
        check=True, capture_output=True, text=True,
    ).stdout
    (tmp_path / "vmlinux.h").write_text(header)
    lines = []
    for key, path in btf_mod._OFFSET_PATHS.items():
        root, member = path.split(".", 1)
        lines.append(f'P("{key}", __builtin_offsetof(struct {root}, {member}));')
    for key, path in btf_mod._SIZE_PATHS.items():
        root, member = path.split(".", 1)
        lines.append(f'P("{key}", sizeof(((struct {root} *)0)->{member}));')
    for key, path in btf_mod._CT_OFFSET_PATHS.items():
        root, member = path.split(".", 1)
        lines.append(f'P("{key}", __builtin_offsetof(struct {root}, {member}));')
    lines.append('P("CT_TH_SIZE", sizeof(struct nf_conntrack_tuple_hash));')
    lines.append('P("CT_STATUS_SIZE", sizeof(((struct nf_conn *)0)->status));')
    lines += [f'P("{name}", {name});' for name in btf_mod._CT_INFO]
    lines.append('P("HAVE_CT", 1);')
    for key, path in btf_mod._KPROBE_REGS.items():
        root, member = path.split(".", 1)
        lines.append(f'P("{key}", __builtin_offsetof(struct {root}, {member}));')
    lines.append('P("HAVE_KPROBE_ARGS", 1);')
    # No <stddef.h>: vmlinux.h redefines wchar_t and friends.
    (tmp_path / "t.c").write_text(
        '#include "vmlinux.h"\n#define P(k, v) __builtin_printf("%s %lu\\n", k, (unsigned long)(v))\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    subprocess.run(["gcc", "-w", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    out = subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_kernel_offsets_match_gcc_on_bpftool_header(kernel: Btf, tmp_path: Path) -> None:
    assert kernel_offsets(kernel) == _gcc_offsets(tmp_path)


def test_sk_buff_len_matches_bpftool_raw(kernel: Btf) -> None:
    if not shutil.which("bpftool"):
        _need("bpftool is needed for the cross-check")
    raw = subprocess.run(
        ["bpftool", "btf", "dump", "file", btf_mod.VMLINUX, "format", "raw"],
        check=True, capture_output=True, text=True,
    ).stdout
    block = re.search(r"^\[\d+\] STRUCT 'sk_buff' size=(\d+) vlen=\d+\n((?:\t.*\n)+)", raw, re.M)
    assert block is not None
    bits = re.search(r"^\t'len' type_id=\d+ bits_offset=(\d+)$", block[2], re.M)
    assert bits is not None  # len is a direct member of sk_buff
    assert kernel.offset("sk_buff.len") == int(bits[1]) // 8
    assert kernel.struct_size("sk_buff") == int(block[1])


def test_members_inside_anonymous_unions(kernel: Btf) -> None:
    # dev shares an anonymous union with dev_scratch; network_header sits in the
    # struct_group(headers) anonymous union/struct pair.
    assert kernel.offset("sk_buff.dev") > 0
    assert kernel.size("sk_buff.dev") == 8
    assert kernel.size("sk_buff.network_header") == 2
    assert kernel.offset("sk_buff.network_header") == kernel.offset("sk_buff.headers.network_header")


def test_nested_path(kernel: Btf) -> None:
    assert kernel.offset("net.ns.inum") == kernel.offset("net.ns") + kernel.offset("ns_common.inum")
    assert kernel.size("net.ns.inum") == 4
    assert kernel.offset("possible_net_t.net") == 0


def test_kernel_errors(kernel: Btf) -> None:
    with pytest.raises(BtfError, match=r"^BTF: struct sk_buff has no member 'foo'$"):
        kernel.offset("sk_buff.foo")
    with pytest.raises(BtfError, match=r"^BTF: no struct 'no_such_struct_xyz' in "):
        kernel.offset("no_such_struct_xyz.len")
    with pytest.raises(BtfError, match=r"sk_buff.cloned is a bitfield"):
        kernel.offset("sk_buff.cloned")
    with pytest.raises(BtfError, match=r"sk_buff.head is not an embedded struct"):
        kernel.offset("sk_buff.head.x")  # a pointer: BPF must read it, we cannot descend


def test_kernel_offsets_complete_and_plausible(kernel: Btf) -> None:
    offsets = kernel_offsets(kernel)
    assert set(offsets) >= set(btf_mod._OFFSET_PATHS) | set(btf_mod._SIZE_PATHS)
    assert offsets["HAVE_CT"] == 1  # this kernel has nf_conntrack built in
    assert offsets["IP_CT_NEW"] == 2 and offsets["IP_CT_UNTRACKED"] == 7
    sizes = {name: kernel.struct_size(name) for name in ("sk_buff", "net_device", "net", "nf_hook_state")}
    for key, path in btf_mod._OFFSET_PATHS.items():
        assert isinstance(offsets[key], int)
        assert 0 <= offsets[key] < sizes[path.split(".")[0]], key
    for key in btf_mod._SIZE_PATHS:
        assert offsets[key] in (2, 4), key
    assert kernel.enum_values("skb_drop_reason")["SKB_DROP_REASON_NOT_SPECIFIED"] == 2


def test_cache_miss_then_hit_then_invalidated(
    kernel: Btf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "sub" / "btf-offsets.json"
    expected = kernel_offsets(kernel)
    assert kernel_offsets(cache_file=cache) == expected  # miss: parses, writes the cache
    doc = json.loads(cache.read_text())
    assert doc["key"]["release"] == os.uname().release
    assert doc["key"]["btf_size"] == os.path.getsize(btf_mod.VMLINUX)

    def no_parse(_btf: Btf) -> dict[str, int]:
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(btf_mod, "compute_offsets", no_parse)
    assert kernel_offsets(cache_file=cache) == expected  # hit: no parsing

    doc["key"]["btf_sha256"] = "0" * 64  # another kernel's BTF: must not be trusted
    doc["offsets"]["SKB_HEAD"] = 12345
    cache.write_text(json.dumps(doc))
    monkeypatch.undo()
    assert kernel_offsets(cache_file=cache) == expected
    cache.write_text("{not json")
    assert kernel_offsets(cache_file=cache) == expected
