"""`python -m tests.fakeapi --lab PREFIX --kubeconfig FILE`: serve a lab's objects and its
agent pods until interrupted, for kubectl and `podtrace --kubeconfig` by hand.

The agent pods answer exec (`flow --transport exec`) and port-forward (`flow`'s default): with
the lab up and as root, each lab node runs `podtrace agent --serve` in its network namespace,
holding the token of the served Secret podtrace-agent-token (a new one per run)."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.fakeapi import FakeApi, agent_pods, lab_pod_runner
from tests.fakeapi.portforward import lab_agent_servers, token_secret
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
    token = secrets.token_urlsafe(32)
    api.add(token_secret(token))
    with contextlib.ExitStack() as stack:
        _agent_servers(stack, args.lab, token, root)
        _serve(api, args.kubeconfig, args.lab, stop)
    print("stopped", flush=True)
    return 0


def _agent_servers(stack: contextlib.ExitStack, prefix: str, token: str, root: str) -> None:
    """`agent --serve` on every node of the lab, when it is up and we may enter its namespaces;
    otherwise a port-forward to an agent pod finds nothing listening (said once, on stderr)."""
    from tracer.lab import topology as T

    topo = T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent")))
    if os.geteuid() != 0 or not all(Path(f"/run/netns/{n.netns}").exists() for n in topo.nodes):
        print(f"lab {prefix} is not up (or not root): agent pods answer exec only", file=sys.stderr, flush=True)
        return
    d = stack.enter_context(tempfile.TemporaryDirectory(prefix="fakeapi-agent-token-"))
    path = Path(d, "token")
    path.write_text(token)
    path.chmod(0o400)
    try:
        stack.enter_context(lab_agent_servers(prefix, path, sys.executable, root))
    except (RuntimeError, OSError) as exc:
        print(f"no agent servers, agent pods answer exec only: {exc}", file=sys.stderr, flush=True)


def _serve(api: FakeApi, kubeconfig: str, lab: str, stop: threading.Event) -> None:
    with api:
        kc = api.write_kubeconfig(kubeconfig)
        print(f"serving lab {lab} at {api.url}; kubeconfig {kc} (Ctrl-C stops)", flush=True)
        stop.wait()


if __name__ == "__main__":
    sys.exit(main())
