"""`python -m tests.fakeapi --lab PREFIX --kubeconfig FILE`: serve a lab's objects and its
agent pods until interrupted, for kubectl and `podtrace --kubeconfig` by hand."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from tests.fakeapi import FakeApi, agent_pods, lab_pod_runner
from tracer import settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakeapi", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--lab", metavar="PREFIX", default=settings.lab_prefix(),
                    help=f"the lab whose objects to serve (default {settings.lab_prefix()}, "
                         f"the one `podtrace lab up` builds)")
    ap.add_argument("--kubeconfig", metavar="FILE", required=True, help="where to write the kubeconfig")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    ap.add_argument("--token", default=None, help="the bearer token to require (default: any)")
    ap.add_argument("--plain-http", action="store_true", help="serve HTTP instead of HTTPS")
    args = ap.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    api = FakeApi.from_lab(args.lab, token=args.token, port=args.port, tls_enabled=not args.plain_http)
    for pod in agent_pods(args.lab):
        api.add(pod)
    root = str(Path(__file__).resolve().parents[2])
    api.exec_runner = lab_pod_runner(sys.executable, root)
    with api:
        kc = api.write_kubeconfig(args.kubeconfig)
        print(f"serving lab {args.lab} at {api.url}; kubeconfig {kc} (Ctrl-C stops)", flush=True)
        stop.wait()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
