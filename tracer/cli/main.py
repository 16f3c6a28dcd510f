"""The `podtrace` command group: loads each command from its module when first asked for."""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from tracer import settings
from tracer.cli import ending, options
from tracer.errors import ExitStatus, PodtraceError

# Command name → the module that defines it, as an attribute of the same name. A module is
# imported only when its command is used (or listed by --help): `podtrace lab` never loads
# what tracing needs, and a usage error answers at once.
COMMANDS = {
    "agent": "tracer.cli.agent",
    "analyze": "tracer.cli.analyze",
    "capture": "tracer.cli.capture",
    "cleanup": "tracer.cli.cleanup",
    "doctor": "tracer.cli.doctor",
    "flow": "tracer.cli.flow",
    "lab": "tracer.lab.cli",
}

PLUGIN_NAME = "kubectl hoptrace"     # krew's `podtrace` is another project


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _usage_exit(exc: click.UsageError):
    """A bad flag or argument: one line and exit 2, like any other bad input (click's own
    rendering is a usage block of several lines)."""
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise exc   # no arguments at all: show the help
    where = exc.ctx.command_path if exc.ctx else "podtrace"
    click.echo(f"podtrace: {_one_line(exc.format_message()).rstrip('.')}; see `{where} --help`", err=True)
    sys.exit(ExitStatus.BAD_INPUT)


def _quiet_rich_pipes():
    """rich answers a closed pipe itself (stdout to /dev/null, exit 1): the same exit as ours."""
    from rich.console import Console

    Console.on_broken_pipe = lambda self: ending.stdout_closed()


class PodtraceGroup(click.Group):
    """The command group: commands loaded lazily by module path, and the one place that maps
    exceptions to the contract's exit codes (tracer.errors.ExitStatus) with one line on
    stderr. Anything unexpected is one line too (exit 1); `--debug` or PODTRACE_DEBUG=1 shows
    the traceback."""

    def main(self, args=None, *rest, **kw):
        ending.own_process = args is None    # the process's own command line, not a test runner's
        return super().main(args, *rest, **kw)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in COMMANDS:
            cmd = getattr(importlib.import_module(COMMANDS[name]), name)
            if isinstance(cmd, click.Group) and any(p.name == "prefix" for p in cmd.params):
                options.share_prefix(cmd)
            self.add_command(cmd, name)
        return cmd

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name != "agent":    # an agent writes frames, never rich's (nor imports it)
            _quiet_rich_pipes()
        return name, cmd, rest

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_exit(exc)

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug")) or settings.debug()
        try:
            rv = super().invoke(ctx)
            ending.flush_stdout()
            return rv
        except BrokenPipeError:
            ending.stdout_closed()
        except PodtraceError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"podtrace: {_one_line(exc.line())}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("podtrace: interrupted; everything podtrace added was removed", err=True)
            sys.exit(ExitStatus.INTERRUPTED)
        except click.UsageError as exc:
            _usage_exit(exc)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            ending.flush_stdout()
            raise
        except Exception as exc:  # a bug: still one line, never a traceback by default
            if debug:
                traceback.print_exc()
            click.echo(f"podtrace: internal error: {type(exc).__name__}: {_one_line(exc)}; "
                       "run again with --debug and report it", err=True)
            sys.exit(ExitStatus.CANNOT_TRACE)


@click.group(cls=PodtraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="podtrace")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors (also PODTRACE_DEBUG=1).")
def main(debug):
    """podtrace: follow packets between Kubernetes pods across nodes, hop by hop.

    \b
    Examples:
      podtrace lab up                      # a 2-node simulated cluster on this machine
      podtrace flow pod-1-1 pod-2-1        # trace ICMP probes across nodes
      podtrace flow pod-1-1 svc/default/web --proto tcp --port 80
      podtrace doctor                      # what this machine offers for tracing
    """


def kubectl_plugin() -> None:
    """Entry point of the `kubectl-hoptrace` executable: the podtrace CLI, named as kubectl
    shows it (`kubectl hoptrace flow A B`)."""
    main(prog_name=PLUGIN_NAME)


if __name__ == "__main__":
    main()
