"""`podtrace capture`: parses a selection of traffic, records it to a trace file, reports."""

from __future__ import annotations

import sys
import time

import click

from tracer import tracemeta
from tracer.cli.options import ip_family_option, prefix_option
from tracer.errors import BadInput, ExitStatus


@click.command("capture")
@click.argument("cidr", nargs=-1, metavar="[CIDR]...")
@click.option("--pod", "pods", multiple=True, metavar="NS/POD", help="Traffic of this pod (repeatable).")
@click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NS",
              help="Traffic of every pod in this namespace (repeatable).")
@click.option("--service", "services", multiple=True, metavar="NS/NAME",
              help="Traffic to the Service's IP and of its backends (repeatable).")
@click.option("--node", "nodes", multiple=True, metavar="NAME",
              help="Traffic of the node's pod CIDR and node address (repeatable).")
@click.option("--cidr", "cidrs", multiple=True, metavar="CIDR", help="Traffic from or to this CIDR.")
@click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535), metavar="PORT",
              help="Only TCP/UDP packets with this port on either side (repeatable).")
@click.option("--all", "all_traffic", is_flag=True,
              help="Every packet, IPv4 and IPv6 (still limited to the lab's namespaces in the lab).")
@ip_family_option("Only this address family's addresses of the selection (default: both).")
@click.option("--duration", "-d", type=click.FloatRange(0.1, 7 * 24 * 3600), default=None, metavar="SECONDS",
              help="Stop after this long (default: until Ctrl-C).")
@click.option("-w", "--write", "output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Trace file to write (default capture-YYYYmmdd-HHMMSS.parquet).")
@click.option("--force", is_flag=True, help="Overwrite the -w file if it exists.")
@click.option("--cluster", type=click.Path(dir_okay=False), default=None,
              help="A `kubectl get nodes,pods,services,endpointslices -A -o json` file.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster). The selection "
                   "is watched: pods that appear or go during the capture are followed.")
@click.option("--context", default=None, help="Kubeconfig context (default: the current one).")
@prefix_option()
@click.option("--tc", is_flag=True, help="Also observe the lab's devices with tc programs.")
@click.option("--on-node", default=None, metavar="NAME",
              help="Lab only: record what that node's namespaces see, as a capture on that node "
                   "would (one file per node; `analyze` takes them together).")
@click.option("--row-group", type=click.IntRange(1024, 10_000_000), default=tracemeta.ROW_GROUP_EVENTS,
              show_default=True, help="Events per Parquet row group (bounds memory).")
@click.option("--ringbuf-pages", type=click.IntRange(8, 65536), default=1024, show_default=True,
              help="Ring buffer size in pages (a power of two).")
def capture(cidr, pods, namespaces, services, nodes, cidrs, ports, all_traffic, ip_family, duration, output, cluster,
            kubeconfig, context, prefix, tc, on_node, row_group, ringbuf_pages, force=False):
    """Record the hop events of a selection of traffic to a Parquet trace file.

    Without a selection, all pod traffic (every node's pod CIDR and the Service IPs).
    Selections add up; --port narrows them. Stop with Ctrl-C, or give --duration.
    Losses (ring buffer full) are counted in the file, never silent.

    \b
    Examples:
      podtrace capture -d 30                                # all pod traffic, 30 s
      podtrace capture --pod default/pod-1-1 -w a.parquet   # one pod, until Ctrl-C
      podtrace capture --service default/web --port 80
      podtrace capture --node node-2 10.96.0.0/16
      podtrace capture --cidr fd00:10:244:2::/64 -d 10     # IPv6 pod CIDR
      podtrace capture -n shop --ip-family 6 -d 10          # the IPv6 addresses only
      podtrace capture --prefix mylab -d 10 -w mylab.parquet   # the lab named mylab
      podtrace capture -n shop --kubeconfig ~/.kube/prod -d 600   # on a node
      podtrace analyze a.parquet
    """
    from rich.console import Console

    from tracer.outfile import refuse_existing
    from tracer.runs.capture import CaptureConfig, Selection, run_capture

    if ringbuf_pages & (ringbuf_pages - 1):
        raise BadInput(f"--ringbuf-pages {ringbuf_pages} is not a power of two", "e.g. 256, 1024 or 4096")
    out = output or time.strftime("capture-%Y%m%d-%H%M%S.parquet")
    refuse_existing(out, force)
    cfg = CaptureConfig(Selection(list(pods), list(namespaces), list(services), list(nodes),
                                  list(cidr) + list(cidrs), list(ports), all_traffic, ip_family),
                        out, duration, cluster, kubeconfig=kubeconfig, context=context,
                        row_group_events=row_group, ringbuf_pages=ringbuf_pages, tc=tc, on_node=on_node,
                        **({"lab_prefix": prefix} if prefix else {}))
    err = Console(stderr=True)
    if err.is_terminal:
        with err.status("starting capture") as status:
            res = run_capture(cfg, progress=lambda d: status.update(progress_line(d)))
    else:
        res = run_capture(cfg)
    for n in res.notes:
        err.print(f"note: {n}", markup=False)
    lost = res.counters.get("lost", 0)
    err.print(f"captured {res.events:,} events (~{res.packets:,} packets, {res.drops:,} drops"
              + (f" + {res.stack_drops:,} socket cleanup, not the network" if res.stack_drops else "") + ") in "
              f"{res.elapsed_s:.1f}s → {res.path} ({res.row_groups} row groups); "
              + (f"[bold red]{lost:,} events lost[/bold red] (ring buffer full: try --ringbuf-pages "
                 f"{cfg.ringbuf_pages * 4} or a narrower selection)" if lost else "no events lost"))
    err.print(f"selection: {'; '.join(res.selection.described)}", markup=False)
    sys.exit(ExitStatus.OK)


def progress_line(d: dict) -> str:
    el = d["elapsed_s"]
    left = f"/{d['duration_s']:g}s" if d.get("duration_s") else ""
    lost = d["lost"]
    return (f"capturing {el:.1f}s{left} · {d['events']:,} events · ~{d['packets']:,} packets · "
            f"{d['drops']:,} drops"
            + (f" (+{d['stack_drops']:,} socket cleanup)" if d.get("stack_drops") else "") + " · " + (f"[bold red]events lost {lost:,}[/bold red]" if lost else "events lost 0")
            + f" · {d['file_bytes'] / 2**20:.1f} MiB")
