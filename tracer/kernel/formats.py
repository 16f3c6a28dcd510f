"""Tracepoint layouts from tracefs ``format`` files.

This module owns how podtrace learns a tracepoint's record layout and the kernel's drop-reason
names. Both change between kernels, and the node's kernel headers may not match the running
kernel, so they are read at runtime from ``events/<category>/<event>/format`` and turned into
C structs typed by size only (never by kernel type names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tracer.errors import EnvironmentProblem

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

_FIELD = re.compile(
    r"^\s*field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*(?:signed:(?P<signed>\d+);)?",
    re.M,
)
# "unsigned short common_type", "char name[16]", "__data_loc char[] name", "void * skbaddr"
_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<array>\[[^\]]*\])?\s*$")
_ID = re.compile(r"^ID:\s*(\d+)", re.M)
_REASONS = re.compile(r"__print_symbolic\(\s*REC->reason\s*,(?P<table>(?:\s*\{[^}]*\}\s*,?)*)")
_SYMBOL = re.compile(r"\{\s*(?P<value>-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*\"(?P<name>[^\"]*)\"\s*\}")
_UNSIGNED = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
_SIGNED = {1: "s8", 2: "s16", 4: "s32", 8: "s64"}


@dataclass
class Field:
    name: str
    c_type: str  # the kernel's type text, for messages only: never emitted into C
    offset: int
    size: int
    signed: bool
    data_loc: bool


@dataclass
class TracepointFormat:
    category: str
    event: str
    id: int
    fields: list[Field]

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


def tracefs_root() -> Path:
    """The mounted tracefs: /sys/kernel/tracing, else the debugfs mirror."""
    for root in TRACEFS_CANDIDATES:
        try:
            if (root / "events").is_dir():
                return root
        except PermissionError:   # mounted, but mode 700 for root
            raise EnvironmentProblem(f"tracefs ({root}) is readable by root only",
                                     "run it again with sudo") from None
    raise EnvironmentProblem(
        "tracefs is not mounted", "run: mount -t tracefs tracefs /sys/kernel/tracing"
    )


def parse_format(text: str, category: str, event: str) -> TracepointFormat:
    """Parse the text of a tracefs format file (separate from reading, for tests)."""
    fields = []
    for m in _FIELD.finditer(text):
        decl = _DECL.match(m["decl"].strip())
        if decl is None:
            raise EnvironmentProblem(
                f"tracepoint {category}:{event}: cannot parse field '{m['decl']}'"
            )
        c_type = decl["type"] + (decl["array"] or "")
        fields.append(
            Field(
                name=decl["name"],
                c_type=c_type,
                offset=int(m["offset"]),
                size=int(m["size"]),
                signed=m["signed"] == "1",
                data_loc=c_type.startswith("__data_loc"),
            )
        )
    id_match = _ID.search(text)
    if id_match is None or not fields:
        raise EnvironmentProblem(f"tracepoint {category}:{event}: format file has no ID or fields")
    return TracepointFormat(category, event, int(id_match[1]), fields)


def _format_text(category: str, event: str) -> str:
    path = tracefs_root() / "events" / category / event / "format"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"tracepoint {category}:{event} does not exist on this kernel ({path} is missing)"
        ) from None
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot read {path}: {exc.strerror}", "run podtrace as root"
        ) from exc


def read_format(category: str, event: str) -> TracepointFormat:
    return parse_format(_format_text(category, event), category, event)


def _member(f: Field) -> tuple[str, int]:
    """(C declaration, alignment) typed by size only, since kernel type names may not
    exist or mean something else in the headers BCC compiles against."""
    if f.data_loc and f.size == 4:
        return f"u32 {f.name}", 4
    is_array = "[" in f.c_type
    if not is_array and f.size in _UNSIGNED:
        pointer = "*" in f.c_type
        names = _SIGNED if f.signed and not pointer else _UNSIGNED
        return f"{names[f.size]} {f.name}", f.size
    return f"u8 {f.name}[{f.size}]", 1


def c_struct(fmt: TracepointFormat, struct_name: str) -> str:
    """A C struct whose member offsets are exactly those of the format file."""
    lines, cursor, pad, packed = [], 0, 0, False
    for f in sorted(fmt.fields, key=lambda f: f.offset):
        if f.offset < cursor:
            raise EnvironmentProblem(
                f"tracepoint {fmt.category}:{fmt.event}: field {f.name} overlaps the previous one"
            )
        if f.offset > cursor:
            lines.append(f"\tu8 __pad{pad}[{f.offset - cursor}];")
            pad += 1
        decl, align = _member(f)
        # A misaligned scalar would make the compiler insert padding and shift offsets.
        packed = packed or f.offset % align != 0
        kernel_type = f.c_type.replace("*/", "* /")  # a comment only: must not end early
        lines.append(f"\t{decl};\t/* offset {f.offset}, size {f.size}: {kernel_type} */")
        cursor = f.offset + f.size
    attribute = " __attribute__((packed))" if packed else ""
    body = "\n".join(lines)
    header = f"/* {fmt.category}:{fmt.event} (tracefs ID {fmt.id}) */"
    return f"{header}\nstruct {struct_name} {{\n{body}\n}}{attribute};\n"


def parse_drop_reasons(fmt_text: str) -> dict[int, str]:
    """Number → name from `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, …)`."""
    m = _REASONS.search(fmt_text)
    if m is None:
        return {}
    reasons = {}
    for sym in _SYMBOL.finditer(m["table"]):
        # Names are printed without the SKB_DROP_REASON_ prefix; strip it should one appear.
        reasons[int(sym["value"], 0)] = sym["name"].removeprefix("SKB_DROP_REASON_")
    return reasons


def drop_reasons() -> dict[int, str]:
    """Drop-reason names of this kernel (the numbers change between kernels)."""
    text = _format_text("skb", "kfree_skb")
    if parse_format(text, "skb", "kfree_skb").field("reason") is None:
        return {}  # kernels before 5.17 have no reason
    return parse_drop_reasons(text)


def data_loc_offset(value: int) -> tuple[int, int]:
    """(offset, length) of a __data_loc u32: low 16 bits offset, high 16 bits length."""
    return value & 0xFFFF, (value >> 16) & 0xFFFF
