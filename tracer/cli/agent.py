"""`podtrace agent`: starts the per-node tracer that `flow` drives (tracer/agents/agent.py)."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--serve", is_flag=True,
              help="Stay up as the DaemonSet's main process: idle, and remove what killed traces left.")
def agent(serve):
    """Per-node tracer driven by `podtrace flow` (reads a request on stdin, streams framed
    records on stdout). Not for interactive use: `flow` starts it, as a local process per
    lab node or through the Kubernetes exec API in the agent pod of each node."""
    from tracer.agents.agent import idle, main

    sys.exit(idle() if serve else main())
