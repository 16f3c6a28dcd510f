"""Benchmark: `podtrace flow` from process start to ready-to-trace, and the whole flow.

`podtrace flow pod-1-1 pod-2-1 -o json` (3 ICMP probes, cross-node) on the bench lab, N runs
per mode, interleaved (agents, single, agents, single, …):

- agents: the default; one agent process per lab node plus the fabric
- single: `--single-process`, tracing in the coordinator's process
- agents_tcall / single_tcall: the same with PODTRACE_TC_OBSERVERS=all (tc observers on
  every device of the path, not only where another tc program runs; on the flannel bench
  lab the default attaches none)

Each run is launched through a two-line wrapper that notes CLOCK_MONOTONIC when the
interpreter is up and when `tracer.cli` is imported; with the launch time taken here and
the JSON `timings.startup_s` (from the start of the `flow` command, its imports included,
to the first probe), that gives:

    ready_s = (cli imported − launch) + startup_s        the figure "ready to trace"
    flow_s  = exit − launch                              the whole 3-probe flow

and the breakdown: interpreter start, CLI import, the JSON timings (resolve, per-agent
start, compile, attach, trace, reconstruct), plus what the JSON does not separate,
measured on their own in fresh processes: the heavy imports (numpy, pandas, bcc), BTF
offsets (cold: a fresh process, the kernel BTF parsed or read from its cache), and tc
attachment of the flow's devices.

    .venv/bin/python bench/startup.py [--runs 5]
    .venv/bin/python bench/startup.py --quick
    .venv/bin/python bench/startup.py --runs 5 --modes agents,agents_tcall,single,single_tcall
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import benchlib as L

WRAPPER = ("import sys, time; t = time.monotonic(); import tracer.cli as c; "
           "sys.stderr.write(f'PTBENCH {t} {time.monotonic()}\\n'); sys.stderr.flush(); "
           "sys.argv = ['podtrace'] + sys.argv[1:]; c.main()")
SRC, DST = "pod-1-1", "pod-2-1"


def one_flow(mode: str, prefix: str) -> dict:
    argv = [sys.executable, "-c", WRAPPER, "flow", SRC, DST, "-o", "json"]
    if mode.startswith("single"):
        argv.append("--single-process")
    env = L.mode_env(prefix, mode)
    t_launch = time.monotonic()
    p = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=120)
    t_exit = time.monotonic()
    marks = [ln.split() for ln in p.stderr.splitlines() if ln.startswith("PTBENCH ")]
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        return {"mode": mode, "error": (p.stderr.strip().splitlines() or ["no output"])[-1], "exit": p.returncode}
    t_up, t_imported = (float(marks[0][1]), float(marks[0][2])) if marks else (t_launch, t_launch)
    tm = doc.get("timings", {})
    out = {"mode": mode, "exit": p.returncode, "verdict": doc.get("verdict", {}).get("summary"),
           "interpreter_s": t_up - t_launch, "import_cli_s": t_imported - t_up,
           "ready_s": (t_imported - t_launch) + tm.get("startup_s", 0), "flow_s": t_exit - t_launch,
           "after_reconstruct_s": (t_exit - t_launch) - ((t_imported - t_launch) + tm.get("startup_s", 0)
                                                          + tm.get("trace_s", 0) + tm.get("reconstruct_s", 0))}
    for k, v in tm.items():
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
            out[k + "_max"] = max(v.values())
            out[k] = v
        elif isinstance(v, dict) and v:       # per node, per phase: the slowest node's phases
            for phase in {ph for x in v.values() for ph in x}:
                out[f"agent_{phase}_max"] = max(x.get(phase, 0) for x in v.values())
    return out


def fresh(code: str) -> float:
    """Seconds a snippet takes in a fresh interpreter (it prints its own elapsed time)."""
    p = subprocess.run([sys.executable, "-c", code], env=L.lab_env(), cwd="/", capture_output=True, text=True,
                       timeout=60)
    return float(p.stdout.strip().splitlines()[-1])


def components(doc: dict, reps: int) -> dict:
    t = "import time; t0 = time.monotonic(); {body}; print(time.monotonic() - t0)"
    out = {
        "import_numpy_pandas_s": [fresh(t.format(body="import numpy, pandas")) for _ in range(reps)],
        "import_bcc_s": [fresh(t.format(body="import bcc")) for _ in range(reps)],
        "import_tracer_trace_s": [fresh(t.format(body="import tracer.runs.flow")) for _ in range(reps)],
        "btf_offsets_fresh_process_s": [fresh("import time; from tracer.kernel import btf; t0 = time.monotonic(); "
                                              "btf.kernel_offsets(); print(time.monotonic() - t0)") for _ in range(reps)],
    }
    out["tc_attach_s"] = [tc_attach_time(doc) for _ in range(reps)]
    return {k: L.spread(v, 4) for k, v in out.items()}


def tc_attach_time(doc: dict) -> float:
    """Attach and remove the tc observers on the flow's devices (what `flow` does per node)."""
    from datapath import path_devices
    from tracer.kernel.hooks import BY_NAME, DEFAULT_HOOKS
    from tracer.kernel.session import SessionConfig, TraceSession
    from tracer.kernel.tc import TcAttacher

    hooks = [BY_NAME[n] for n in DEFAULT_HOOKS] + [BY_NAME["tc:ingress"], BY_NAME["tc:egress"]]
    with TraceSession(SessionConfig(addrs=[L.pod(doc, SRC)["ip"], L.pod(doc, DST)["ip"]], hooks=hooks,
                                    netns=L.lab_inodes(doc))) as s:
        t0 = time.monotonic()
        tc = TcAttacher(s.loaded.bpf)
        try:
            for ns, dev in path_devices(doc):
                tc.attach(ns, dev)
            took = time.monotonic() - t0
        finally:
            tc.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="agents,single")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
    modes = args.modes.split(",")
    doc, _ = L.lab()
    start = L.machine()
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.runs):
        for m in (modes if i % 2 == 0 else modes[::-1]):
            runs[m].append(one_flow(m, doc["prefix"]))
    comp = components(doc, 1 if args.quick else 3)
    out = {"benchmark": "startup", "flow": f"{SRC} → {DST}, 3 ICMP probes", "runs": args.runs, "modes": {},
           "components": comp, "machine_start": start, "machine_end": L.machine(),
           "targets": {"ready_s": 2.0, "flow_s": 4.0}}
    for m in modes:
        ok = [r for r in runs[m] if "error" not in r]
        keys = sorted({k for r in ok for k, v in r.items() if isinstance(v, (int, float)) and k != "exit"})
        out["modes"][m] = {
            "ready_s": L.spread([r["ready_s"] for r in ok]),
            "flow_s": L.spread([r["flow_s"] for r in ok]),
            "breakdown_median_s": {k: round(statistics.median([r[k] for r in ok if k in r]), 4) for k in keys
                                   if k not in ("ready_s", "flow_s")},
            "verdicts": sorted({r.get("verdict") for r in ok}),
            "errors": [r["error"] for r in runs[m] if "error" in r],
        }
        agent = [r["agent_start_s"] for r in ok if isinstance(r.get("agent_start_s"), dict)]
        if agent:
            out["modes"][m]["agent_start_s_median"] = {n: round(statistics.median(a[n] for a in agent if n in a), 4)
                                                       for n in agent[0]}
    out["verdict"] = {m: {"ready_s": out["modes"][m]["ready_s"]["median"], "flow_s": out["modes"][m]["flow_s"]["median"]}
                      for m in modes}
    L.emit(out)


if __name__ == "__main__":
    main()
