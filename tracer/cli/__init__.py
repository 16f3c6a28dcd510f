"""The command line: one module per command, the only place that uses click.

`main` is the `podtrace` group (tracer/cli/main.py); each command lives in the module of its
name here (`flow`, `capture`, `analyze`, `doctor`, `agent`, `cleanup`), except `lab`, which
is tracer/lab/cli.py.
"""

from tracer.cli.main import main

__all__ = ["main"]
