"""`podtrace flow`: parses the options into a FlowConfig, runs the trace, renders the result."""

from __future__ import annotations

import time

import click
from click.core import ParameterSource

from tracer.cli.options import ip_family_option, prefix_option
from tracer.errors import BadInput, ExitStatus

EARLY_AGENTS = 3     # the lab's agents of a cross-node flow: both ends' nodes and the fabric


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--proto", type=click.Choice(["icmp", "tcp", "udp"]), default=None,
              help="Probe protocol (default icmp; tcp to a Service's first port).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TCP/UDP destination port.")
@ip_family_option("Address family of the flow between dual-stack ends (default: SRC's first family "
                  "that DST has too, as Kubernetes orders podIPs).")
@click.option("--count", type=click.IntRange(1, 1000), default=3, show_default=True, help="Probes to send.")
@click.option("--timeout", type=click.FloatRange(0.05, 30), default=1.0, show_default=True,
              help="Seconds to wait for each probe's answer.")
@click.option("--size", type=int, default=None, metavar="BYTES",
              help="IP size of ICMP/UDP probes, sent unfragmentable: DF set, IPv6 never fragmented "
                   "(finds MTU black holes).")
@click.option("--sport", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Fixed source port of TCP/UDP probes (reproduce one conntrack entry).")
@click.option("--sample", type=click.IntRange(1, 65536), default=1, show_default=True, metavar="N",
              help="Trace 1 packet in N (the same packets on every hop and node).")
@click.option("--max-events", "budget", type=click.IntRange(0, 10_000_000), default=50_000, show_default=True,
              metavar="PER_S", help="Event budget per second per node, and for a watch's merge of all nodes (a watch keeps 4 s of it in all); beyond it podtrace samples more (0: no limit).")
@click.option("--no-probe", "no_probe", is_flag=True, help="Send nothing; watch real traffic for --duration.")
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds to watch with --no-probe.")
@click.option("--cluster", type=click.Path(dir_okay=False), default=None,
              help="A `kubectl get nodes,pods,services,endpointslices -A -o json` file.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster).")
@click.option("--context", default=None, help="kubeconfig context to use.")
@click.option("--transport", type=click.Choice(["portforward", "exec"]), default="portforward", show_default=True,
              help="How the agents of a cluster are reached: port-forward to their loopback server, or exec "
                   "(needs pods/exec: a shell in the privileged agent pods; for clusters that forbid port-forward).")
@click.option("-n", "--namespace", default=None, metavar="NS",
              help="Namespace of SRC/DST given without one (POD, pod/POD, svc/NAME).  [default: default]")
@prefix_option()
@click.option("-o", "--output", type=click.Choice(["table", "compact", "wide", "json"]), default="table",
              show_default=True,
              help="table: one line per path, full tables for failing packets (= compact); "
                   "wide: every packet's table; json: the whole result.")
@click.option("-w", "--write", "--save", "save", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the raw events to a Parquet trace file (as `capture -w`; --save is the same).")
@click.option("--force", is_flag=True, help="Overwrite the -w/--save file if it exists.")
@click.option("--single-process", "single", is_flag=True, hidden=True,
              help="Trace every node from this process instead of one agent per node (lab only).")
def flow(src, dst, proto, ip_family, port, count, timeout, size, sport, sample, budget, no_probe, duration, cluster, kubeconfig,
         context, transport, namespace, prefix, output, save, single, force=False):
    """Follow probe packets from SRC to DST hop by hop, and say where they died.

    SRC and DST: NAMESPACE/POD, POD or pod/POD (namespace default, or -n),
    svc/NAME (the same namespace), svc/NAMESPACE/NAME, node/NAME or an IPv4 or IPv6
    address (an IPv4-mapped IPv6 address is its IPv4 address). A dual-stack pair of ends
    takes --ip-family 4|6.

    \b
    Exit status: 0 every probe delivered and answered; 3 the trace found a failure;
    2 bad input; 1 this machine cannot trace (the message says how to fix it);
    130 interrupted (Ctrl-C while tracing shows and saves what was traced so far).

    \b
    Examples:
      podtrace flow pod-1-1 pod-2-1
      podtrace flow default/pod-1-1 svc/default/web --proto tcp --port 80 -o json
      podtrace flow pod-1-1 svc/web                # svc/NAME: a Service of namespace default (tcp/80)
      podtrace flow -n shop web-0 svc/cart         # both in namespace shop
      podtrace flow pod-1-1 pod-2-2 --proto udp --port 8080 -w trace.parquet
      podtrace flow pod-1-1 node/node-2 --prefix mylab   # the lab named mylab
      podtrace flow pod-1-1 pod-2-1 --no-probe --duration 10
      podtrace flow pod-1-1 pod-2-1 -o wide   # every packet's hop table
      podtrace flow pod-1-1 pod-2-1 --size 1450        # MTU black hole?
      podtrace flow pod-1-1 pod-2-1 --ip-family 6      # dual-stack pods, over IPv6
      podtrace flow pod-1-1 fd00:10:244:2::2 --proto tcp --port 8080
    """
    t_start = time.monotonic()    # start-up counts from here, the imports below included
    _flow_flags_agree(no_probe)   # before the heavy imports: a bad flag answers at once
    from tracer.outfile import refuse_existing

    refuse_existing(save, force)
    from tracer import settings
    from tracer.agents import spawn
    from tracer.cluster import sources
    from tracer.config import FlowConfig

    cfg = FlowConfig(src=src, dst=dst, proto=proto, port=port, count=count, timeout=timeout,
                     probe=not no_probe, duration=duration, cluster=cluster, save=save, size=size, sport=sport,
                     kubeconfig=kubeconfig, context=context, transport=transport, sample=sample, budget=budget,
                     namespace=namespace, ip_family=ip_family,
                     lab_prefix=prefix or settings.lab_prefix(),
                     mode="single" if single else settings.flow_mode(), t_start=t_start)
    # the lab's agent processes (both ends' nodes and the fabric) start now, importing while
    # this one imports and resolves
    with spawn.Early(EARLY_AGENTS if cfg.mode == "agents" and sources.lab_ahead(
            cluster, kubeconfig, context, cfg.lab_prefix) else 0) as early:
        result, err = _run(cfg, early, output)
    from tracer import render
    from tracer.cli.ending import leave

    doc = result.as_json()
    if output == "json":
        click.echo(render.to_json(doc))
    else:
        from rich.console import Console

        out = Console()
        if not out.is_terminal:
            out = Console(width=160)  # piped into a file or a ticket: keep whole rows
        render.flow_human(result, out, output)
        if save and not result.interrupted:
            err.print(f"trace saved to {save}")
    if result.interrupted:   # like ping: what was traced is shown above; one line says how far it got
        click.echo(f"podtrace: interrupted {result.interrupted.after}; the packets traced until then are shown"
                   + (f", saved to {save} (marked incomplete)" if save else "")
                   + "; everything podtrace added was removed", err=True)
        leave(ExitStatus.INTERRUPTED)
    leave(ExitStatus.OK if result.ok else ExitStatus.TRACE_FAILED)


def _run(cfg, early, output):
    """The trace itself: (its result, the stderr console that showed its progress)."""
    from rich.console import Console

    from tracer.runs.flow import run_flow

    err = Console(stderr=True)
    if err.is_terminal and output != "json":
        with err.status("resolving endpoints") as status:
            return run_flow(cfg, progress=lambda msg: status.update(msg), early=early), err
    return run_flow(cfg, early=early), err


def _flow_flags_agree(no_probe: bool) -> None:
    """Probe options with --no-probe (which sends nothing), or --duration without it (probes
    end when they are answered), would be silently ignored: refuse them as bad input."""
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
