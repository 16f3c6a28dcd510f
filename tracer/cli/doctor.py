"""`podtrace doctor`: renders what this machine offers for tracing (tracer/doctor.py)."""

from __future__ import annotations

import sys

import click

from tracer.cli.options import prefix_option
from tracer.errors import ExitStatus


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@prefix_option(help="Name prefix of the lab to look for as a metadata source (env PODTRACE_LAB_PREFIX).")
def doctor(output, prefix):
    """Check what this machine offers for tracing and what blocks `flow`.

    Kernel, config, BTF, kernel headers (real, substitute or none), tracefs/debugfs,
    privileges, BCC, every hook of the catalog (active, or why not), and where cluster
    metadata comes from. Exit 0 when `flow` can run, 1 with a fix for each problem.

    \b
    Examples:
      sudo podtrace doctor
      sudo podtrace doctor -o json | jq '.hooks[] | select(.active)'
      sudo podtrace doctor --prefix mylab -o json | jq .metadata
    """
    from rich.console import Console

    from tracer import doctor as doc_mod
    from tracer import render

    rep = doc_mod.report(lab_prefix=prefix)
    if output == "json":
        click.echo(render.to_json(rep))
    else:
        out = Console()
        render.doctor_table(rep, out if out.is_terminal else Console(width=160))
    sys.exit(ExitStatus.OK if rep["can_trace"] else ExitStatus.CANNOT_TRACE)
