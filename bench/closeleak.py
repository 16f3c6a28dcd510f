"""How often a closed session leaves its tail-call array (`pt_next`) in the kernel.

Sessions on the bench lab's flow (pod-1-1 → pod-2-1) are started, kept 0.3 s beside UDP
traffic at 50 Mbit/s (so the programs tail-call), and closed, SESSIONS times in a row,
while another process lists the kernel's BPF maps and programs with `bpftool` every
INTERVAL seconds (as a monitoring agent might). `before` closes as podtrace did before it
emptied the array first (`program.unlink_common` left out), `after` as it does now. The
prog_array maps named pt_next are counted before and a few seconds after (the kernel frees
released maps in deferred work): what is left over is what stayed.

    sudo .venv/bin/python bench/closeleak.py [--sessions 60] [--variants before,after]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import benchlib as L
from tracer.kernel import program
from tracer.kernel.hooks import BY_NAME, DEFAULT_HOOKS
from tracer.kernel.session import SessionConfig, Sink, TraceSession

SRC, DST, PORT = "pod-1-1", "pod-2-1", 5218


def tail_call_arrays() -> int:
    out = subprocess.run(["bpftool", "map", "show"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if " name pt_next " in line)


def settled() -> int:
    """The count once it stops moving (released maps go in deferred work)."""
    last = tail_call_arrays()
    for _ in range(20):
        time.sleep(0.5)
        now = tail_call_arrays()
        if now == last:
            return now
        last = now
    return last


def one_variant(doc: dict, variant: str, sessions: int, interval: float) -> dict:
    src, dst = L.pod(doc, SRC), L.pod(doc, DST)
    keep = program.unlink_common
    if variant == "before":
        program.unlink_common = lambda b: None
    lister = subprocess.Popen(["sh", "-c", f"while true; do bpftool map show >/dev/null 2>&1; "
                               f"bpftool prog show >/dev/null 2>&1; sleep {interval}; done"])
    start = settled()
    try:
        with L.IperfServer(dst["netns"], PORT):
            client = L.iperf_client(src["netns"], dst["ip"], PORT, 3600, udp=True, rate="50M")
            try:
                for _ in range(sessions):
                    s = TraceSession(SessionConfig(addrs=[src["ip"], dst["ip"]], budget=0, sample=1,
                                                   netns=L.lab_inodes(doc),
                                                   hooks=[BY_NAME[h] for h in DEFAULT_HOOKS]), sink=Sink())
                    try:
                        s.start()
                        t = time.monotonic()
                        while time.monotonic() - t < 0.3:
                            s.poll(20)
                    finally:
                        s.close()
            finally:
                client.kill()
                client.wait()
    finally:
        lister.kill()
        lister.wait()
        program.unlink_common = keep
    left = settled() - start
    return {"variant": variant, "sessions": sessions, "left_behind": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=60)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between the lister's rounds")
    ap.add_argument("--variants", default="before,after")
    a = ap.parse_args()
    doc, _ = L.lab()
    start = L.machine()
    runs = [one_variant(doc, v, a.sessions, a.interval) for v in a.variants.split(",")]
    L.emit({"benchmark": "closeleak", "flow": f"{SRC} → {DST}, UDP at 50 Mbit/s", "interval_s": a.interval,
            "runs": runs, "machine_start": start, "machine_end": L.machine()})


if __name__ == "__main__":
    main()
