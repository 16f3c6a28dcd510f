"""The per-kernel bytecode cache (tracer/kernel/bpfcache.py): the second load of the same
program skips clang (the maps made by libbcc directly, or from a declarations-only source
where that is missing) and gives the same maps, types and verified programs; a cache file
that does not fit is never used (the program is compiled instead)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import todays_share
from tests.integration.test_flow import wait_no_programs
from tracer.kernel import bpfcache, contract, program
from tracer.kernel.hooks import CATALOG

HOOKS = [h for h in CATALOG if h.kind in ("tracepoint", "tc")]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    yield tmp_path / "bpf-cache"
    wait_no_programs()


def _load():
    loaded = program.load(hooks=HOOKS)     # tracepoints attached: every program passed the verifier
    try:
        b = loaded.bpf
        for fn in ("pt_tc_ingress", "pt_tc_egress", program.tc_stub_name(0, "egress")):
            b.load_func(fn.encode(), b.SCHED_CLS)
        shape = {name: (b[name].max_entries, [f[0] for f in getattr(b[name].Key, "_fields_", [])])
                 for name in ("addrs", "addrs6", "cidrs", "cidrs6", "counters", "tc_devs", "config")}
        cidrs = b["cidrs"]
        cidrs[cidrs.Key(24, 0x0A)] = cidrs.Leaf(1)        # typed keys work as after a compile
        counters = b["counters"]                           # per-CPU values, summed as the session does
        assert sum(counters[counters.Key(0)]) >= 0
        kind = type(b).__name__ + (" direct" if isinstance(b.module, bpfcache._Maps) else "")
        return kind, shape, len(list(cidrs.items()))
    finally:
        loaded.close()


def test_second_load_comes_from_the_cache(cache_dir, monkeypatch):
    first, shape1, n1 = _load()
    assert first == "BPF" and len(list(cache_dir.glob("*.json"))) == 1
    second, shape2, n2 = _load()
    assert second == "CachedBPF direct"          # no clang at all
    assert shape1 == shape2 and n1 == n2 == 1
    assert shape2["addrs"][0] == contract.MAX_ADDRS and shape2["cidrs"][1] == ["prefixlen", "addr"]
    # A BCC without libbcc's map-creation call: the maps come from a declarations-only source.
    monkeypatch.setattr(bpfcache, "_direct_lib", lambda bcc: None)
    third, shape3, n3 = _load()
    assert third == "CachedBPF" and shape3 == shape1 and n3 == 1


@pytest.mark.parametrize("damage", todays_share(["garbage", "other-format", "missing-map"], 3))   # one a day
def test_a_cache_file_that_does_not_fit_is_not_used(cache_dir, damage):
    _load()
    (path,) = cache_dir.glob("*.json")
    doc = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "other-format":
        path.write_text(json.dumps({**doc, "format": bpfcache.FORMAT + 1}))
    else:
        for f in doc["funcs"].values():
            if f["maps"]:
                f["maps"][0][1] = "no_such_map"
                break
        path.write_text(json.dumps(doc))
    kind = None
    try:
        kind = _load()[0]
    except Exception as exc:   # noqa: BLE001
        pytest.fail(f"a damaged cache broke the load: {exc}")
    assert kind == "BPF"          # compiled again (and the cache rewritten)
    assert _load()[0] == "CachedBPF direct"


LOADER = ("import sys; from tracer.kernel import program; from tests.integration.test_bpf_cache import HOOKS; "
          "l = program.load(hooks=HOOKS); print(type(l.bpf).__name__); l.close()")   # "CachedBPF" either way


def test_runs_starting_together_on_a_cold_cache_compile_once(cache_dir, monkeypatch):
    """The lab's agents start at once on one machine: the first compiles (holding the lock),
    the others wait for it and load what it cached. Here the test holds the lock until both
    loaders wait for it (/proc/locks lists them as blocked), then lets them go."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import subprocess_env, wait_until

    _load()
    (path,) = cache_dir.glob("*.json")
    path.unlink()                       # cold again; `path` is where the loaders will cache
    env = subprocess_env(PODTRACE_STATE_DIR=os.environ["PODTRACE_STATE_DIR"],
                         PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with bpfcache.compiling(path):
        procs = [subprocess.Popen([sys.executable, "-c", LOADER], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            def waiting() -> int:
                return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line
                           and any(f" {p.pid} " in line for p in procs))
            assert wait_until(lambda: waiting() == 2, 60), "the loaders never waited for the compile lock"
        except BaseException:
            for p in procs:
                p.kill()
                p.communicate()
            raise
    kinds = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        kinds.append(out.strip())
    assert sorted(kinds) == ["BPF", "CachedBPF"]


def test_the_verifier_walks_the_shared_program_briefly(cache_dir):
    """Every process that traces has its programs verified at start (three agents at once on
    the lab): the shared program must stay cheap to verify. It was 196,911 instructions
    walked (the packet on the stack, four inlined parsers); it is about 55,000 now."""
    program.load(hooks=HOOKS, attach=False).close()     # compiles and fills the cache
    loaded = program.load(hooks=HOOKS, attach=False)
    try:
        b = loaded.bpf
        assert hasattr(b, "pt_cached"), "the second load did not come from the cache"
        raw = b.RAW_TRACEPOINT if loaded.raw_tp else b.TRACEPOINT
        common = b.verifier_stats("pt_common", raw)
        assert common["processed"] is not None and common["processed"] < 100_000, common
        for fn in ("pt_rx", "pt_tx", "pt_kfree", "pt_consume"):
            assert b.verifier_stats(fn, raw)["processed"] < 20_000, fn
        assert b.verifier_stats("pt_tc_ingress", b.SCHED_CLS)["processed"] < 40_000
    finally:
        loaded.close()
