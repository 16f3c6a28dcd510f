"""Command line: parses options into config objects and renders results. No behaviour here."""

from __future__ import annotations

import os
import sys
import traceback

import click

from tracer.errors import PodtraceError


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _usage_exit(exc: click.UsageError):
    """A bad flag or argument: one line and exit 2, like any other bad input (click's own
    rendering is a usage block of several lines)."""
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise exc   # no arguments at all: show the help
    where = exc.ctx.command_path if exc.ctx else "podtrace"
    click.echo(f"podtrace: {_one_line(exc.format_message()).rstrip('.')}; see `{where} --help`", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Maps podtrace errors to one line on stderr and the contract's exit code. Anything
    unexpected is one line too (exit 1); `--debug` or PODTRACE_DEBUG=1 shows the traceback."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_exit(exc)

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug")) or os.environ.get("PODTRACE_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except PodtraceError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"podtrace: {_one_line(exc.line())}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("podtrace: interrupted; everything podtrace added was removed", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            _usage_exit(exc)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line, never a traceback by default
            if debug:
                traceback.print_exc()
            click.echo(f"podtrace: internal error: {type(exc).__name__}: {_one_line(exc)}; "
                       "run again with --debug and report it", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="podtrace")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors (also PODTRACE_DEBUG=1).")
def main(debug):
    """podtrace: follow packets between Kubernetes pods across nodes, hop by hop.

    \b
    Examples:
      podtrace lab up                      # a 2-node simulated cluster on this machine
      podtrace flow pod-1-1 pod-2-1        # trace ICMP probes across nodes
      podtrace flow pod-1-1 svc/default/web --proto tcp --port 80
    """


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--proto", type=click.Choice(["icmp", "tcp", "udp"]), default=None,
              help="Probe protocol (default icmp; tcp to a Service's first port).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TCP/UDP destination port.")
@click.option("--count", type=click.IntRange(1, 1000), default=3, show_default=True, help="Probes to send.")
@click.option("--timeout", type=click.FloatRange(0.05, 30), default=1.0, show_default=True,
              help="Seconds to wait for each probe's answer.")
@click.option("--size", type=int, default=None, metavar="BYTES",
              help="IP size of ICMP/UDP probes, sent with DF set (finds MTU black holes).")
@click.option("--sport", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Fixed source port of TCP/UDP probes (reproduce one conntrack entry).")
@click.option("--sample", type=click.IntRange(1, 65536), default=1, show_default=True, metavar="N",
              help="Trace 1 packet in N (the same packets on every hop and node).")
@click.option("--max-events", "budget", type=click.IntRange(0, 10_000_000), default=50_000, show_default=True,
              metavar="PER_S", help="Event budget per second per node; beyond it podtrace samples more (0: no limit).")
@click.option("--no-probe", "no_probe", is_flag=True, help="Send nothing; watch real traffic for --duration.")
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds to watch with --no-probe.")
@click.option("--cluster", type=click.Path(dir_okay=False), default=None,
              help="A `kubectl get nodes,pods,services,endpointslices -A -o json` file.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster).")
@click.option("--context", default=None, help="kubeconfig context to use.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="Write the raw events to a Parquet trace file.")
@click.option("--single-process", "single", is_flag=True, hidden=True,
              help="Trace every node from this process instead of one agent per node (lab only).")
def flow(src, dst, proto, port, count, timeout, size, sport, sample, budget, no_probe, duration, cluster, kubeconfig, context,
         output, save, single):
    """Follow probe packets from SRC to DST hop by hop, and say where they died.

    SRC and DST: NAMESPACE/POD, POD (namespace default), svc/NAMESPACE/NAME,
    node/NAME or an IPv4 address.

    \b
    Exit status: 0 every probe delivered and answered; 3 the trace found a failure;
    2 bad input; 1 this machine cannot trace (the message says how to fix it).

    \b
    Examples:
      podtrace flow pod-1-1 pod-2-1
      podtrace flow default/pod-1-1 svc/default/web --proto tcp --port 80 -o json
      podtrace flow pod-1-1 pod-2-2 --proto udp --port 8080 --save trace.parquet
      podtrace flow pod-1-1 pod-2-1 --no-probe --duration 10
      podtrace flow pod-1-1 pod-2-1 --size 1450        # MTU black hole?
    """
    _flow_flags_agree(no_probe)   # before the heavy imports: a bad flag answers at once
    from rich.console import Console

    from tracer import render
    from tracer.config import FlowConfig
    from tracer.runs.flow import run_flow

    err = Console(stderr=True)
    cfg = FlowConfig(src=src, dst=dst, proto=proto, port=port, count=count, timeout=timeout,
                     probe=not no_probe, duration=duration, cluster=cluster, save=save, size=size, sport=sport,
                     kubeconfig=kubeconfig, context=context, sample=sample, budget=budget,
                     mode="single" if single else "agents")
    if err.is_terminal and output == "table":
        with err.status("resolving endpoints") as status:
            result = run_flow(cfg, progress=lambda msg: status.update(msg))
    else:
        result = run_flow(cfg)
    doc = result.as_json()
    if output == "json":
        click.echo(render.to_json(doc))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=160)  # piped into a file or a ticket: keep whole rows
        render.flow_table(doc, out)
        if save:
            err.print(f"trace saved to {save}")
    sys.exit(0 if result.ok else 3)


def _flow_flags_agree(no_probe: bool) -> None:
    """Probe options with --no-probe (which sends nothing), or --duration without it (probes
    end when they are answered), would be silently ignored: refuse them as bad input."""
    from click.core import ParameterSource

    from tracer.errors import BadInput

    ctx = click.get_current_context()
    given = [f"--{n}" for n in ("count", "timeout", "size", "sport")
             if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if no_probe and given:
        raise BadInput(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to probes, "
                       "and --no-probe sends none",
                       "drop them, or drop --no-probe")
    if not no_probe and ctx.get_parameter_source("duration") == ParameterSource.COMMANDLINE:
        raise BadInput("--duration is how long --no-probe watches; probes end when answered",
                       "add --no-probe, or use --count/--timeout for probes")


@main.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(output):
    """Check what this machine offers for tracing and what blocks `flow`.

    Kernel, config, BTF, kernel headers (real, substitute or none), tracefs/debugfs,
    privileges, BCC, every hook of the catalog (active, or why not), and where cluster
    metadata comes from. Exit 0 when `flow` can run, 1 with a fix for each problem.

    \b
    Examples:
      sudo podtrace doctor
      sudo podtrace doctor -o json | jq '.hooks[] | select(.active)'
    """
    from rich.console import Console

    from tracer import doctor as doc_mod
    from tracer import render

    rep = doc_mod.report()
    if output == "json":
        click.echo(render.to_json(rep))
    else:
        out = Console()
        render.doctor_table(rep, out if out.is_terminal else Console(width=160))
    sys.exit(0 if rep["can_trace"] else 1)


@main.command()
@click.option("--serve", is_flag=True,
              help="Stay up as the DaemonSet's main process: idle, and remove what killed traces left.")
def agent(serve):
    """Per-node tracer driven by `podtrace flow` (reads a request on stdin, streams framed
    records on stdout). Not for interactive use: `flow` starts it, as a local process per
    lab node or through the Kubernetes exec API in the agent pod of each node."""
    from tracer.agents import agent as agent_mod

    sys.exit(agent_mod.idle() if serve else agent_mod.main())


@main.command()
def cleanup():
    """Remove what a killed podtrace left behind, and nothing a running one still uses:

    \b
    - tc filters of podtrace (named `podtrace:<direction>:<pid>:<start time>`) whose process
      is gone, and the clsact qdiscs it added, in this namespace and every lab namespace;
    - unfinished trace files (`FILE.part` of `flow --save` / `capture -w`) whose writer is
      gone: what they hold is kept as FILE's name with `.incomplete` before the suffix
      (`trace.parquet` → `trace.incomplete.parquet`, never over an existing file), marked
      incomplete; `podtrace analyze` loads it and says so.

    The owners are recorded under $PODTRACE_STATE_DIR (default /run/podtrace); a process is
    told by its pid and start time, so a reused pid is not mistaken for a running owner.

    \b
    Example:
      sudo podtrace cleanup
    """
    from tracer.node import ownership
    from tracer.kernel import tc as tcattach
    from tracer.errors import require_root
    from tracer.node.netns import list_names

    require_root("podtrace cleanup")
    removed = [f"removed {r}" for r in tcattach.cleanup(list_names())]
    removed += ownership.cleanup_writers()
    for r in removed:
        click.echo(r)
    click.echo(f"cleanup: {len(removed)} leftover(s) removed" if removed else "cleanup: nothing left behind")


# Commands whose modules pull in pandas/pyarrow are imported only when used, so `--help`,
# usage errors and `lab` stay fast.
_LAZY = {"capture": ("tracer.runs.capture", "capture"), "analyze": ("tracer.analysis", "analyze")}


def _lazy_get_command(self, ctx, name):
    cmd = click.Group.get_command(self, ctx, name)
    if cmd is None and name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        cmd = getattr(importlib.import_module(module), attr)
        self.add_command(cmd, name)
    return cmd


def _lazy_list_commands(self, ctx):
    return sorted(set(click.Group.list_commands(self, ctx)) | set(_LAZY))


_Group.get_command = _lazy_get_command
_Group.list_commands = _lazy_list_commands


def _register():
    from tracer.lab.cli import lab

    main.add_command(lab)


_register()


PLUGIN_NAME = "kubectl hoptrace"     # krew's `podtrace` is another project


def kubectl_plugin() -> None:
    """Entry point of the `kubectl-hoptrace` executable: the podtrace CLI, named as kubectl
    shows it (`kubectl hoptrace flow A B`)."""
    main(prog_name=PLUGIN_NAME)


if __name__ == "__main__":
    main()
