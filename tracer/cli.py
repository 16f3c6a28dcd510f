"""Command line: parses options into config objects and renders results. No behaviour here."""

from __future__ import annotations

import sys

import click

from .errors import PodtraceError


class _Group(click.Group):
    """Maps podtrace errors to one line on stderr and the contract's exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PodtraceError as exc:
            click.echo(f"podtrace: {exc.line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("podtrace: interrupted; everything podtrace added was removed", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="podtrace")
def main():
    """podtrace: follow packets between Kubernetes pods across nodes, hop by hop.

    \b
    Examples:
      podtrace lab up                      # a 2-node simulated cluster on this machine
      podtrace flow pod-1-1 pod-2-1        # trace ICMP probes across nodes
      podtrace flow pod-1-1 svc/default/web --proto tcp --port 80
    """


def _register():
    from .lab.cli import lab

    main.add_command(lab)


_register()

if __name__ == "__main__":
    main()
