"""The kernel contract (tracer/kernel/contract.py): bpf/ spells none of its numbers, the
generated header gives the C compiler the same values as Python, and the Python mirrors of the
C hashes compute what the C code computes (both compiled by gcc from the real sources)."""

from __future__ import annotations

import ipaddress
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import must_run
from tracer.kernel import contract
from tracer.kernel import program
from tracer.errors import EnvironmentProblem

ROOT = Path(__file__).resolve().parents[2]
BPF = ROOT / "bpf"
TYPEDEFS = ("typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;\n"
            "typedef unsigned long long u64;\n")
MAP_DECL = re.compile(r"\bBPF_(?:HASH|ARRAY|PERCPU_ARRAY|LPM_TRIE|TABLE)\s*\((?P<args>[^;]*)\);")


def _bpf_sources() -> dict[str, str]:
    """bpf/ files without their comments (a comment may quote a number)."""
    out = {}
    for p in sorted(BPF.iterdir()):
        text = re.sub(r"/\*.*?\*/", "", p.read_text(), flags=re.S)
        out[p.name] = re.sub(r"//[^\n]*", "", text)
    return out


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        if must_run():
            pytest.fail("gcc is needed to compile the generated contract")
        pytest.skip("gcc is needed to compile the generated contract")
    return gcc


def _run_c(tmp_path: Path, text: str) -> str:
    src = tmp_path / "t.c"
    src.write_text(text)
    subprocess.run([_gcc(), "-std=gnu11", "-Wall", "-Werror", "-o", str(tmp_path / "t"), str(src)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout


def test_bpf_defines_none_of_the_contracts_names():
    names = set(contract.c_defines())
    for name, text in _bpf_sources().items():
        defined = set(re.findall(r"#\s*define\s+(\w+)", text))
        assert not defined & names, f"bpf/{name} defines {sorted(defined & names)}: they come from contract.py"


def test_bpf_map_sizes_are_named_never_spelled():
    seen = 0
    for name, text in _bpf_sources().items():
        for m in MAP_DECL.finditer(text):
            size = m.group("args").split(",")[-1].strip()
            # a one-entry scratch cell of the C code alone (budget_state, tc_slot) is no contract
            assert size == "1" or not re.fullmatch(r"\d+[uUlL]*", size), f"bpf/{name}: {m.group(0)} spells its size"
            seen += 1
    assert seen >= 13      # every map of podtrace.c, tc.c and kprobes.c was looked at


def test_bpf_spells_no_hash_constant_tunnel_port_or_counter_index():
    spelled = [contract.SLOT_MULT, contract.HASH_MIX, contract.VXLAN_PORT, contract.VXLAN_PORT_LINUX,
               contract.GENEVE_PORT]
    for name, text in _bpf_sources().items():
        literals = {int(v) for v in re.findall(r"(?<![\w.])(\d+)[uUlL]*\b", text)}
        assert not literals & set(spelled), f"bpf/{name} spells {sorted(literals & set(spelled))}"
        assert not re.search(r"\bcount\(\s*\d", text), f"bpf/{name} counts by number, not C_* name"
        assert not re.search(r"\bkind\s*=\s*\d", text), f"bpf/{name} sets an encap type by number"


def test_python_spells_no_contract_number_outside_the_contract():
    pattern = re.compile(r"\b(?:2654435761|2246822519)\b|\bsel\s*\|=\s*\d|^\s*(?:MAX_ADDRS|MAX_CIDRS|MAX_PORTS|"
                         r"TC_SLOTS|SLOT_MULT|COUNTER_NAMES)\s*=", re.M)
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
           for p in sorted((ROOT / "tracer").rglob("*.py")) if p.name != "contract.py"
           for m in pattern.finditer(p.read_text())]
    assert not bad, "numbers of the kernel contract written outside tracer/kernel/contract.py:\n" + "\n".join(bad)


def test_the_program_text_carries_the_contract_before_the_bpf_files():
    try:
        text = program.source()        # the tracepoint structs come from the live tracefs
    except EnvironmentProblem as exc:
        if must_run():
            pytest.fail(exc.line())
        pytest.skip(exc.line())
    assert text.index(contract.c_header()) < text.index("/* ---- bpf/podtrace.c ---- */")


def test_the_compiler_sees_the_same_numbers(tmp_path):
    defines = contract.c_defines()
    prints = "\n".join(f'    printf("{k} %llu\\n", (unsigned long long)({k}));' for k in defines)
    out = _run_c(tmp_path, "#include <stdio.h>\n" + TYPEDEFS + contract.c_header()
                 + "\nint main(void) {\n" + prints + "\n    return 0;\n}\n")
    got = dict(line.split() for line in out.splitlines())
    assert {k: int(v) for k, v in got.items()} == {k: int(v.rstrip("u")) for k, v in defines.items()}
    assert got["C_SEEN"] == "0" and got["C_OVER_BUDGET"] == str(len(contract.COUNTER_NAMES) - 1)
    assert int(got["HOOK_TC_EGRESS"]) == contract.HOOK_IDS["tc_egress"]


def test_a_broken_contract_does_not_compile(tmp_path):
    """The _Static_asserts are real checks: a header whose prefilter geometry disagrees fails."""
    header = contract.c_header().replace(f"#define ADDR_BITS_WORDS {contract.ADDR_BITS_WORDS}\n",
                                         "#define ADDR_BITS_WORDS 512\n")
    assert header != contract.c_header()
    with pytest.raises(subprocess.CalledProcessError) as exc:
        _run_c(tmp_path, TYPEDEFS + header + "\nint main(void) { return 0; }\n")
    assert "addr_bits holds one bit per address slot" in exc.value.stderr


def _c_function(text: str, name: str) -> str:
    m = re.search(r"static __always_inline \w+ " + name + r"\(.*?\n}\n", text, re.S)
    assert m, f"{name}() not found in bpf/podtrace.c"
    return m.group(0)


def test_python_hashes_compute_what_the_c_computes(tmp_path):
    """packet_hash() and the two prefilter slot hashes, cut out of bpf/podtrace.c and compiled
    with the generated header, against contract.py's mirrors on random inputs."""
    text = (BPF / "podtrace.c").read_text()
    struct_pkt = re.search(r"#define PKT_SCALARS.*?\nstruct pkt \{.*?\n\};\n", text, re.S).group(0)
    slot_exprs = {
        "addr": re.search(r"u32 h = (\(addr \* SLOT_MULT\) >> [^;]+);", text).group(1),
        "skb": re.search(r"u32 i = (\(\(u32\)\(skb >> [^;]+);", text).group(1),
    }
    rng = random.Random(13)
    cases = [(rng.choice((1, 6, 17, 58)), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(16),
              rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(48) << 8)
             for _ in range(200)]
    v6 = [rng.getrandbits(128).to_bytes(16, "big") for _ in cases]
    rows = ",\n".join("{%d, %d, %d, %d, %d, %du, %du, %dull, {%s}}" % (c + (",".join(map(str, a)),))
                      for c, a in zip(cases, v6))
    prog = ("#include <stdio.h>\n"   # stdio.h defines __always_inline, as the kernel does
            
            "#define IPPROTO_ICMP_ 1\n#define IPPROTO_ICMPV6_ 58\n" + TYPEDEFS + contract.c_header() + "\n" + struct_pkt
            + _c_function(text, "packet_hash") + _c_function(text, "addr6_fold")
            + "static u32 addr_slot(u32 addr) { return " + slot_exprs["addr"] + "; }\n"
            + "static u32 skb_slot(u64 skb) { return " + slot_exprs["skb"] + "; }\n"
            + "struct c { u8 proto; u16 sport, dport, ip_id, ip_len; u32 seq, addr; u64 skb; u8 a6[16]; };\n"
            + "static struct c cases[] = {\n" + rows + "};\n"
            + "int main(void) {\n  for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {\n"
            + "    struct c *k = &cases[i]; struct pkt p = {0};\n"
            + "    p.proto = k->proto; p.sport = k->sport; p.dport = k->dport; p.ip_id = k->ip_id;\n"
            + "    p.ip_len = k->ip_len; p.tcp_seq = k->seq;\n"
            + '    printf("%u %u %u %u\\n", packet_hash(&p), addr_slot(k->addr), skb_slot(k->skb),\n'
            + '           addr_slot(addr6_fold(k->a6)));\n  }\n'
            + "  return 0;\n}\n")
    out = _run_c(tmp_path, prog).splitlines()
    assert len(out) == len(cases)
    for (proto, sport, dport, ip_id, ip_len, seq, addr, skb), a6, line in zip(cases, v6, out):
        h, a, s, s6 = map(int, line.split())
        assert s6 == contract.addr_slot(str(ipaddress.IPv6Address(a6)))
        assert h == contract.packet_hash(proto, sport, dport, ip_id, ip_len, seq)
        dotted = ".".join(str(b) for b in addr.to_bytes(4, "little"))   # the key is network order
        assert contract.addr_key(dotted) == addr and a == contract.addr_slot(dotted)
        assert s == contract.tracked_slot(skb)


def test_sampled_in_keeps_one_in_n():
    hashes = [contract.packet_hash(1, i, i * 7) for i in range(4000)]
    kept = sum(contract.sampled_in(h, 4) for h in hashes)
    assert 800 < kept < 1200 and all(contract.sampled_in(h, 1) for h in hashes)
