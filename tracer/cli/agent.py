"""`podtrace agent`: starts the per-node tracer that `flow` drives (tracer/agents/agent.py, server.py)."""

from __future__ import annotations

import os
import sys

import click

DEFAULT_TOKEN_FILE = "/var/run/secrets/podtrace/token"


@click.command()
@click.option("--serve", is_flag=True,
              help="Stay up as the DaemonSet's main process: serve traces on --listen (loopback only) to "
                   "clients holding the token, and remove what killed traces left.")
@click.option("--listen", default="127.0.0.1:7463", show_default=True, metavar="ADDR:PORT",
              help="With --serve: the loopback address and port to listen on (port-forward reaches it).")
@click.option("--token-file", default=DEFAULT_TOKEN_FILE, show_default=True, metavar="FILE",
              help="With --serve: the token a client must present (the Secret podtrace-agent-token).")
@click.option("--node", envvar="NODE_NAME", default=None, metavar="NAME",
              help="With --serve: this node's name; requests for another node are refused (env NODE_NAME).")
def agent(serve, listen, token_file, node):
    """Per-node tracer driven by `podtrace flow`. Not for interactive use.

    Without --serve it reads one request on stdin and streams framed records on stdout: `flow`
    starts it as a local process per lab node, or with --transport exec in the agent pod of
    each node. With --serve it is the agent pod's long-running server that `flow` reaches
    through the API server's port-forward."""
    if serve:
        from tracer.agents.server import main as serve_main

        sys.exit(serve_main(listen, token_file, node))
    from tracer.agents.agent import main

    rc = main()
    # By now the agent removed everything it put in the kernel and wrote its last frame: it
    # leaves without the interpreter's teardown of a traced session's objects, which took
    # ~0.2 s that the coordinator waited for (three agents, 2 vCPUs, iperf3 beside).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
