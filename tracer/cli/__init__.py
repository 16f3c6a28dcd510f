"""The command line: one module per command; the only place that uses click."""

from tracer.cli.main import main

__all__ = ["main"]
