"""tracer.tracefs: parsing literal format text (runs anywhere) and the live tracefs.

Generated structs are checked by compiling them with gcc and printing offsetof() of every
member, the way BCC's clang will lay them out.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import must_run
from tracer.kernel import formats as tracefs
from tracer.errors import EnvironmentProblem
from tracer.kernel.formats import Field, TracepointFormat, c_struct, data_loc_offset, parse_format

SAMPLE = """name: sample_event
ID: 4242
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:char name[16];\toffset:16;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] dev;\toffset:32;\tsize:4;\tsigned:0;
\tfield:bool flag;\toffset:36;\tsize:1;\tsigned:0;
\tfield:short delta;\toffset:38;\tsize:2;\tsigned:1;
\tfield:u64 stamp;\toffset:44;\tsize:8;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:52;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p reason: %s", REC->skbaddr, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 12, "NETFILTER_DROP" }, { 0x20, "SKB_DROP_REASON_HEX" }), REC->flag
"""


# ---- parsing literal text ------------------------------------------------------------------


def test_parse_sample() -> None:
    fmt = parse_format(SAMPLE, "test", "sample_event")
    assert (fmt.category, fmt.event, fmt.id) == ("test", "sample_event", 4242)
    assert [f.name for f in fmt.fields] == [
        "common_type", "common_flags", "common_preempt_count", "common_pid",
        "skbaddr", "name", "dev", "flag", "delta", "stamp", "reason",
    ]
    assert fmt.field("common_pid") == Field("common_pid", "int", 4, 4, True, False)
    assert fmt.field("skbaddr") == Field("skbaddr", "const void *", 8, 8, False, False)
    assert fmt.field("name") == Field("name", "char[16]", 16, 16, False, False)
    assert fmt.field("dev") == Field("dev", "__data_loc char[]", 32, 4, False, True)
    assert fmt.field("reason") == Field("reason", "enum skb_drop_reason", 52, 4, False, False)
    assert fmt.field("missing") is None


def test_c_struct_of_sample_is_typed_by_size_and_packed_when_misaligned() -> None:
    text = c_struct(parse_format(SAMPLE, "test", "sample_event"), "sample_args")
    body = text.split("{", 1)[1]
    code = "\n".join(line.split("/*")[0] for line in body.splitlines())  # without comments
    for decl in ("u16 common_type;", "s32 common_pid;", "u64 skbaddr;", "u8 name[16];",
                 "u32 dev;", "u8 flag;", "u8 __pad0[1];", "s16 delta;", "u8 __pad1[4];",
                 "u64 stamp;", "u32 reason;"):
        assert decl in code
    for kernel_word in ("char", "void", "enum", "bool", "short", "int ", "unsigned"):
        assert kernel_word not in code
    assert "__attribute__((packed))" in text  # stamp (u64) sits at offset 44


def test_aligned_struct_is_not_packed() -> None:
    fields = [Field("a", "u16", 0, 2, False, False), Field("b", "u64", 8, 8, False, False)]
    fmt = TracepointFormat("t", "e", 1, fields)
    assert "packed" not in c_struct(fmt, "e_args")


def test_overlapping_fields_are_refused() -> None:
    fields = [Field("a", "u32", 0, 4, False, False), Field("b", "u32", 2, 4, False, False)]
    fmt = TracepointFormat("t", "e", 1, fields)
    with pytest.raises(EnvironmentProblem, match="overlaps"):
        c_struct(fmt, "e_args")


def test_parse_drop_reasons_from_text() -> None:
    expected = {2: "NOT_SPECIFIED", 12: "NETFILTER_DROP", 32: "HEX"}
    assert tracefs.parse_drop_reasons(SAMPLE) == expected
    assert tracefs.parse_drop_reasons('print fmt: "x=%d", REC->x') == {}


def test_data_loc_offset() -> None:
    assert data_loc_offset(0x0005_0030) == (0x30, 5)
    assert data_loc_offset(0) == (0, 0)


def test_garbage_is_an_environment_problem() -> None:
    with pytest.raises(EnvironmentProblem, match="no ID or fields"):
        parse_format("name: x\nformat:\n", "t", "x")


def test_tracefs_not_mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tracefs, "TRACEFS_CANDIDATES", (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(EnvironmentProblem) as err:
        tracefs.tracefs_root()
    assert err.value.line() == "tracefs is not mounted; run: mount -t tracefs tracefs /sys/kernel/tracing"


# ---- the live tracefs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Path:
    try:
        return tracefs.tracefs_root()
    except EnvironmentProblem as exc:
        if must_run():
            pytest.fail(exc.line())
        pytest.skip(exc.line())


def _offsets(fmt: TracepointFormat) -> dict[str, tuple[int, int]]:
    return {f.name: (f.offset, f.size) for f in fmt.fields}


def test_netif_receive_skb(live: Path) -> None:
    fmt = tracefs.read_format("net", "netif_receive_skb")
    fields = _offsets(fmt)
    assert fields["common_type"] == (0, 2)
    assert fields["skbaddr"] == (8, 8)
    assert fields["len"][1] == 4
    assert fmt.field("name").data_loc and fields["name"][1] == 4
    assert fmt.id == int((live / "events/net/netif_receive_skb/id").read_text())


def test_net_dev_start_xmit(live: Path) -> None:
    fields = _offsets(tracefs.read_format("net", "net_dev_start_xmit"))
    assert fields["skbaddr"][1] == 8
    assert fields["protocol"][1] == 2
    assert {"name", "len", "network_offset"} <= set(fields)


def test_kfree_skb(live: Path) -> None:
    fmt = tracefs.read_format("skb", "kfree_skb")
    fields = _offsets(fmt)
    assert fields["skbaddr"] == (8, 8)
    assert fields["location"][1] == 8
    assert fields["reason"][1] == 4
    assert fields["protocol"][1] == 2


def test_missing_event(live: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="tracepoint net:no_such_event does not exist"):
        tracefs.read_format("net", "no_such_event")


def test_drop_reasons(live: Path) -> None:
    reasons = tracefs.drop_reasons()
    assert reasons[2] == "NOT_SPECIFIED"
    assert "NETFILTER_DROP" in reasons.values()
    assert all(not name.startswith("SKB_DROP_REASON_") for name in reasons.values())


def test_c_structs_compile_to_the_format_offsets(live: Path, tmp_path: Path) -> None:
    if not shutil.which("gcc"):   # scripts/dev.sh setup installs it
        (pytest.fail if must_run() else pytest.skip)("gcc is needed to compile the generated structs")
    formats = [
        tracefs.read_format("net", "netif_receive_skb"),
        tracefs.read_format("net", "net_dev_start_xmit"),
        tracefs.read_format("skb", "kfree_skb"),
        parse_format(SAMPLE, "test", "sample_event"),  # the packed case
    ]
    source = [
        "typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;",
        "typedef unsigned long long u64; typedef signed char s8; typedef short s16;",
        "typedef int s32; typedef long long s64;",
        "#define P(s, m) __builtin_printf(\"%s %s %lu %lu\\n\", #s, #m, "
        "(unsigned long)__builtin_offsetof(struct s, m), (unsigned long)sizeof(((struct s *)0)->m))",
    ]
    checks, expected = [], set()
    for fmt in formats:
        name = f"{fmt.event}_args"
        source.append(c_struct(fmt, name))
        for f in fmt.fields:
            checks.append(f"P({name}, {f.name});")
            expected.add(f"{name} {f.name} {f.offset} {f.size}")
    source.append("int main(void) {\n" + "\n".join(checks) + "\nreturn 0; }")
    (tmp_path / "t.c").write_text("\n".join(source) + "\n")
    binary = tmp_path / "t"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(binary), str(tmp_path / "t.c")], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    assert set(out.splitlines()) == expected
