"""`podtrace analyze`: summarises a trace file as tables (tracer/analysis)."""

from __future__ import annotations

import json
import sys

import click

from tracer.errors import ExitStatus


@click.command("analyze")
@click.argument("files", nargs=-1, required=True, metavar="FILE|DIR|GLOB...")
@click.option("--mode", type=click.Choice(["auto", "flow", "capture"]), default="auto", show_default=True,
              help="Reconstruction: flow files as `flow` judged them, captures vectorised.")
@click.option("--top", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Rows per table.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def analyze(files, mode, top, output):
    """Summarise a trace file: packets, flows, drops and losses, as tables.

    FILE is a Parquet trace written by `podtrace capture -w` or `podtrace flow -w` (--save);
    several files, a directory or a glob (one capture per node) are read as one trace.
    The same tables are in Jupyter: `from tracer import analysis; t = analysis.load(FILE)`.

    \b
    Examples:
      podtrace analyze capture.parquet
      podtrace analyze trace.parquet --top 50
      podtrace analyze capture.parquet -o json | jq .drops
      podtrace analyze node-1.parquet node-2.parquet
      podtrace analyze 'capture-*.parquet'          # a glob, expanded by podtrace
    """
    from tracer.analysis import load, render_summary, summary_doc

    file = files[0] if len(files) == 1 else list(files)
    t = load(file, mode=mode)
    if t.meta.get("incomplete"):
        click.echo(f"podtrace: warning: {file} is an incomplete trace "
                   f"({' '.join(str(t.meta.get('incomplete_reason') or 'its writer did not finish').split())}); "
                   "what it holds is shown, the end of the recording is missing", err=True)
    elif t.meta.get("interrupted"):
        from tracer.analysis.flowverdict import interruption

        click.echo(f"podtrace: warning: {file} is incomplete ({interruption(t.meta)}): "
                   "the packets traced until then are shown", err=True)
    doc = summary_doc(t, top)
    if output == "json":
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        from rich.console import Console

        out = Console()
        render_summary(doc, out if out.is_terminal else Console(width=160))
    sys.exit(ExitStatus.OK)

