"""Benchmark: what the kernel's verifier spends on each of podtrace's programs.

Every process that traces loads its programs from the bytecode cache, and the kernel
verifies each one again at load: that is most of `attach_s` in `flow`'s timings, paid by
every agent at start (three at once on the lab's 2 vCPUs). This loads the default program
(the four tracepoints, the shared program they tail-call, and the tc observers) the way
`flow` does, then loads each program once more with the verifier's statistics on
(log level 4): instructions, instructions the verifier walked, states, its own time, and
the wall time of the load. Nothing is attached. N rounds; the median per program.

    sudo .venv/bin/python bench/verifier.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchlib as L
from tracer.kernel import program
from tracer.kernel import hooks as catalog


def _loaded():
    """The default program with tc (as `flow` with observers loads it), from the cache."""
    hs = [catalog.BY_NAME[n] for n in catalog.DEFAULT_HOOKS] + [h for h in catalog.CATALOG if h.kind == "tc"]
    for _ in range(2):   # the first load of a new source compiles and fills the cache
        loaded = program.load(64, attach=False, hooks=hs)
        if hasattr(loaded.bpf, "pt_cached"):
            return loaded
        loaded.close()
    raise SystemExit("the program did not load from the bytecode cache (/run/podtrace/bpf-cache)")


def _verify(b, bcc, name: str) -> dict:
    kind = bcc.BPF.SCHED_CLS if name.startswith("pt_tc") else bcc.BPF.RAW_TRACEPOINT
    t0 = time.monotonic()
    stats = b.verifier_stats(name, kind)
    return dict(stats, load_ms=round((time.monotonic() - t0) * 1000, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bcc = program._bcc()
    start = L.machine()
    loaded = _loaded()
    try:
        b = loaded.bpf
        # one program per kind: the tc slot stubs are 15 instructions each
        names = [n for n in b.pt_cached["funcs"] if not n.startswith("pt_tcs_")]
        rounds: dict[str, list[dict]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                rounds[n].append(_verify(b, bcc, n))
    finally:
        loaded.close()
    out = {}
    for n, rs in rounds.items():
        out[n] = {k: rs[0][k] for k in ("insns", "processed", "states", "peak_states")}
        out[n]["verifier_ms"] = L.spread([r["verifier_ms"] for r in rs])
        out[n]["load_ms"] = L.spread([r["load_ms"] for r in rs])
    total = [sum(rounds[n][i]["load_ms"] for n in names if not n.startswith("pt_tc")) for i in range(args.rounds)]
    L.emit({"benchmark": "verifier", "rounds": args.rounds, "machine_start": start, "machine_end": L.machine(),
            "programs": out, "tracepoint_programs_load_ms": L.spread(total),
            "median_total_ms": round(statistics.median(total), 1)})


if __name__ == "__main__":
    main()
