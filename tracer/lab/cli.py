"""`podtrace lab …`: parses options into a LabConfig, calls tracer.lab.build, renders results."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from tracer import settings
from tracer.errors import BadInput, EnvironmentProblem, require_root
from tracer.lab import build, scenarios
from tracer.lab import topology as T
from tracer.lab.model import prefix_flag


# --prefix: also after any lab command, its default shown as in effect (tracer/cli/options.py).
@click.group("lab", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--prefix", default=None, metavar="NAME",
              help="Name prefix of every namespace the lab creates (env PODTRACE_LAB_PREFIX).")
@click.pass_context
def lab(ctx, prefix):
    """A simulated multi-node Kubernetes cluster made of network namespaces.

    \b
    Nodes, pods, a fabric bridge as the underlay, flannel-style VXLAN between nodes,
    kube-proxy-style Services in iptables and a responder on TCP/UDP 8080 in every pod
    that answers with its pod name (to plain HTTP too). `--ip-family ipv6|dual` gives pods
    and Services IPv6 addresses (fd00:10:244:N::/64, fd00:10:96::/112; Services in
    ip6tables). Nothing outside namespaces named PREFIX-* is touched.

    \b
    Examples:
      sudo podtrace lab up                       # 2 nodes x 2 pods, flannel
      sudo podtrace lab up --nodes 3 --pods-per-node 4
      podtrace lab status -o json                # names, IPs, netns, Services, inventory path
      sudo ip netns exec ptlab-pod-1-1 ip route  # look inside a pod
      sudo podtrace lab down
    """
    ctx.obj = {"prefix": T.validate_prefix(prefix or settings.lab_prefix())}


@lab.command("up")
@click.option("--cni", type=click.Choice(T.CNIS), default="flannel", show_default=True,
              help="Which CNI's datapath to build.")
@click.option("--nodes", type=int, default=2, show_default=True, metavar="N",
              help="Number of nodes (1-16).")
@click.option("--pods-per-node", type=int, default=2, show_default=True, metavar="M",
              help="Pods on each node (1-8).")
@click.option("--ip-family", type=click.Choice(T.IP_FAMILIES), default="ipv4", show_default=True,
              help="Pod and Service addresses: IPv4, IPv6 (over an IPv6 underlay) or both "
                   "(dual-stack, IPv4 first, over the IPv4 underlay).")
@click.option("--proxy", type=click.Choice(T.PROXY_MODES), default="iptables", show_default=True,
              help="How kube-proxy programs Services: iptables chains, the nftables "
                   "`kube-proxy` table, or IPVS virtual servers on kube-ipvs0.")
@click.option("--datapath", type=click.Choice(T.DATAPATHS), default="legacy", show_default=True,
              help="Cilium only: legacy (the kernel routes pod traffic) or ebpf (tc programs "
                   "forward it with bpf_redirect_peer/bpf_redirect_neigh and do Service NAT; "
                   "netfilter never sees it).")
@click.option("--calico-mode", type=click.Choice(T.CALICO_MODES), default=None,
              help="With --cni calico: how pod traffic crosses nodes, IP-in-IP through tunl0 "
                   "(the default), VXLAN through vxlan.calico, or routed on the underlay.")
@click.pass_context
def up_cmd(ctx, cni, nodes, pods_per_node, ip_family, proxy, datapath, calico_mode):
    """Build the lab (a no-op when it is already up).

    \b
    Examples:
      sudo podtrace lab up
      sudo podtrace lab up --nodes 3 --pods-per-node 1
      sudo podtrace lab up --ip-family dual  # pods and Services with IPv4 and IPv6
      sudo podtrace lab up --proxy nftables  # kube-proxy in nftables mode
      sudo podtrace lab up --cni cilium --datapath ebpf  # Cilium's BPF forwarding
      sudo podtrace lab up --cni calico --calico-mode routed
      sudo podtrace lab up --prefix mylab   # a second, separate lab
      sudo PODTRACE_LAB_PREFIX=mylab podtrace lab up   # the same
    """
    if calico_mode is not None and cni != "calico":
        raise BadInput("--calico-mode applies to the calico lab only", "add --cni calico, or drop --calico-mode")
    cfg = T.LabConfig(prefix=ctx.obj["prefix"], cni=cni, nodes=nodes, pods_per_node=pods_per_node,
                      ip_family=ip_family, proxy=proxy, datapath=datapath,
                      calico_mode=calico_mode or "ipip")
    require_root("podtrace lab up")
    started = time.monotonic()
    with _Progress(cfg.prefix) as progress:
        doc, created = build.up(cfg, progress=progress)
    if not created:
        click.echo(f"lab {cfg.prefix} is already up ({_shape(doc)}); nothing to do. "
                   f"To rebuild it: podtrace lab down{prefix_flag(cfg.prefix)} && podtrace lab up{prefix_flag(cfg.prefix)}")
        return
    elapsed = time.monotonic() - started
    click.echo(f"lab {cfg.prefix} is up in {elapsed:.1f} s: {_shape(doc)}")
    click.echo(f"inventory: {doc['inventory']}")
    pods = doc["pods"]
    if len(doc["nodes"]) > 1:
        click.echo(f"try: sudo podtrace flow {pods[0]['name']} {pods[-1]['name']}{prefix_flag(cfg.prefix)}")
    click.echo(f"     podtrace lab status{prefix_flag(cfg.prefix)}")


@lab.command("status")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
def status_cmd(ctx, output):
    """Show the lab's nodes, pods and Services.

    \b
    Examples:
      podtrace lab status
      podtrace lab status -o json | jq -r '.pods[] | "\\(.name) \\(.ip) \\(.netns)"'
    """
    prefix = ctx.obj["prefix"]
    doc = build.status(prefix)
    if doc is None:
        hint = "podtrace lab up" if prefix == T.DEFAULT_PREFIX else f"podtrace lab --prefix {prefix} up"
        raise EnvironmentProblem("no lab is up", f"run: {hint}")
    broken = scenarios.broken(prefix)
    if output == "json":
        if broken:
            doc = dict(doc, broken=broken)
        click.echo(json.dumps(doc, indent=2))
        return
    _render_table(doc, build.missing_parts(doc))
    if broken:
        click.echo("broken: " + ", ".join(
            f"{name} ({rec['node'] or 'every node'})" for name, rec in broken.items())
            + f"; undo with: podtrace lab fix SCENARIO{prefix_flag(prefix)}")


@lab.command("down")
@click.pass_context
def down_cmd(ctx):
    """Remove the lab: every namespace, device, process and file it made.

    Safe to run when nothing exists.

    \b
    Examples:
      sudo podtrace lab down
      sudo podtrace lab --prefix mylab down
    """
    prefix = ctx.obj["prefix"]
    require_root("podtrace lab down")
    started = time.monotonic()
    removed = build.down(prefix)
    elapsed = time.monotonic() - started
    if not removed:
        click.echo(f"no lab {prefix} here; nothing to remove")
        return
    n_ns = sum(item.startswith("netns ") for item in removed)
    n_proc = sum(item.startswith("process ") for item in removed)
    parts = [f"{n_ns} namespace{'s' if n_ns != 1 else ''}",
             f"{n_proc} process{'es' if n_proc != 1 else ''}"]
    if any(item.startswith("state ") for item in removed):
        parts.append("its state files")
    click.echo(f"lab {prefix} removed in {elapsed:.1f} s: {', '.join(parts)}")


@lab.command("break")
@click.argument("scenario", required=False, metavar="SCENARIO")
@click.option("--node", metavar="NODE", default=None,
              help="The node to break (default: the scenario's own; see `lab scenarios`).")
@click.option("--ip-family", "ip_family", type=click.Choice(["4", "6"]), default=None,
              help="Break it for targets of this address family (a dual-stack lab; default: "
                   "the lab's first family).")
@click.option("--list", "list_", is_flag=True, help="List the scenarios and exit.")
@click.pass_context
def break_cmd(ctx, scenario, node, ip_family, list_):
    """Inject a real fault (SCENARIO) into the lab; `podtrace lab fix` undoes it exactly.

    Breaking a scenario that is already broken changes nothing.

    \b
    Examples:
      podtrace lab break --list
      sudo podtrace lab break netpol-drop
      sudo podtrace lab break ip-forward-off --node node-2
      sudo podtrace lab break no-route --ip-family 6   # a dual-stack lab's IPv6 side
      sudo podtrace lab fix ip-forward-off
    """
    if list_:
        _print_scenarios(ctx.obj["prefix"], "table")
        return
    if scenario is None:
        raise click.UsageError("give a SCENARIO (one of: " + ", ".join(scenarios.names())
                               + ") or --list")
    scenarios.get(scenario)  # unknown names are bad input before anything else is checked
    require_root("podtrace lab break")
    out = scenarios.break_scenario(scenario, node, prefix=ctx.obj["prefix"],
                                   family=int(ip_family) if ip_family else None)
    if not out.changed:
        click.echo(out.message)
        return
    click.echo(f"{out.message}:")
    for line in out.changes:
        click.echo(f"  - {line}")
    click.echo(f"see it: {out.show}")
    click.echo(f"undo:   podtrace lab fix {scenario}{prefix_flag(ctx.obj['prefix'])}")


@lab.command("fix")
@click.argument("scenario", metavar="SCENARIO")
@click.pass_context
def fix_cmd(ctx, scenario):
    """Undo a fault injected with `podtrace lab break`, restoring the state before it.

    Each change is listed as restored (old → new value) or as already restored, when it
    was fixed by hand (following the runbook) before. Fixing a scenario that is not broken
    changes nothing.

    \b
    Examples:
      sudo podtrace lab fix netpol-drop
      podtrace lab status      # lists what is still broken
    """
    scenarios.get(scenario)
    require_root("podtrace lab fix")
    out = scenarios.fix_scenario(scenario, prefix=ctx.obj["prefix"])
    if not out.changed:
        click.echo(out.message)
        return
    click.echo(f"{out.message}:")
    for line in out.changes:
        click.echo(f"  - {line}")
    click.echo(f"check: {out.show}")


@lab.command("scenarios")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
def scenarios_cmd(ctx, output):
    """List the faults `podtrace lab break` can inject, and the flow command that shows each.

    With a lab up, only those that apply to its CNI; `-o json` gives each one's flavours
    (`applies_to`).

    \b
    Examples:
      podtrace lab scenarios
      podtrace lab scenarios -o json | jq -r '.[].name'
    """
    _print_scenarios(ctx.obj["prefix"], output)


def _print_scenarios(prefix: str, output: str) -> None:
    try:
        doc = build.status(prefix)
    except EnvironmentProblem:
        doc = None
    lab_view = scenarios.Lab(doc) if doc else scenarios.Lab.planned(T.LabConfig(prefix=prefix, state_dir=Path("/run/podtrace")))
    rows = scenarios.listing(lab_view)
    # A running lab: only the scenarios that apply to its CNI and to one of its address
    # families; none running: all of them.
    fams = {f"ipv{f}" for f in lab_view.families}
    hidden = [r["name"] for r in rows
              if doc and (scenarios.flavour_key(doc) not in r["applies_to"]
                          or not fams & set(r["families"]))]
    rows = [r for r in rows if r["name"] not in hidden]
    broken = scenarios.broken(prefix) if doc else {}
    if output == "json":
        for row in rows:
            row["broken"] = row["name"] in broken
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        where = "every node" if r["cluster_wide"] else (r["default_node"] or "n/a on this lab")
        mark = "  [broken]" if r["name"] in broken else ""
        click.echo(f"{r['name']:<{width}}  {r['summary']} (default: {where}){mark}")
        click.echo(f"{'':<{width}}  show: {r['flow'] or '-'}")
        click.echo(f"{'':<{width}}  applies to: {', '.join(r['applies_to'])}")
        click.echo(f"{'':<{width}}  targets: {', '.join(r['families'])}")
    if hidden:
        family = doc.get("ip_family", "ipv4")
        click.echo(f"({len(hidden)} more do not apply to the {scenarios.flavour_key(doc)} "
                   f"{'' if family == 'ipv4' else family + ' '}lab {prefix}: {', '.join(hidden)})")
    if doc is None:
        click.echo("(no lab is up: every scenario, each with the CNI flavours it applies to, and "
                   "the node and pod names of the default lab; `podtrace lab up` first to break one)")


def _cni(doc: dict) -> str:
    """The CNI, with its datapath when it is not the default one ("cilium, ebpf datapath")."""
    dp = doc.get("datapath", "legacy")
    return doc["cni"] + ("" if dp == "legacy" else f", {dp} datapath")


def _shape(doc: dict) -> str:
    family = doc.get("ip_family", "ipv4")
    proxy = doc.get("proxy", "iptables")
    mode = f" ({doc['calico_mode']})" if doc.get("calico_mode") else ""
    return (f"{_cni(doc)}{mode}{'' if family == 'ipv4' else ', ' + family}"
            f"{'' if proxy == 'iptables' else ', kube-proxy ' + proxy}, {len(doc['nodes'])} nodes, "
            f"{len(doc['pods'])} pods, {len(doc['services'])} services")


class _Progress:
    """Step messages on stderr: a spinner and a tick per finished step on a terminal, one
    plain line per step otherwise."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tty = sys.stderr.isatty()
        self._status = None
        self._console = None
        self._current = None

    def __enter__(self):
        if self.tty:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
            self._status = self._console.status(f"lab {self.prefix}: starting")
            self._status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        if not self.tty:
            click.echo(f"podtrace: lab {self.prefix}: {message}", err=True)
            return
        self._done()
        self._current = message
        self._status.update(f"lab {self.prefix}: {message}")

    def _done(self):
        if self._current is not None:
            self._console.print(f"[green]✓[/green] {self._current}")
            self._current = None

    def __exit__(self, exc_type, *rest):
        if self._status is not None:
            if exc_type is None:
                self._done()
            self._status.__exit__(exc_type, *rest)
        return False


def _render_table(doc: dict, missing: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output is not cut to 80 columns: names and netns must stay greppable.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    family = doc.get("ip_family", "ipv4")
    proxy = doc.get("proxy", "iptables")
    mode = f" {doc['calico_mode']}" if doc.get("calico_mode") else ""
    console.print(f"[bold]lab {doc['prefix']}[/bold] ({_cni(doc)}{mode}{'' if family == 'ipv4' else ', ' + family}"
                  f"{'' if proxy == 'iptables' else ', kube-proxy ' + proxy}), up since "
                  f"{doc.get('created_at', '?')}", highlight=False)
    console.print(f"underlay {doc['underlay_cidr']} on bridge "
                  f"{doc.get('fabric_bridge', 'br0')} in netns {doc['fabric_netns']}", highlight=False)
    console.print(f"inventory {doc['inventory']}", highlight=False)
    if missing:
        console.print(f"[red]incomplete:[/red] {', '.join(missing)}; "
                      f"run: podtrace lab down{prefix_flag(doc['prefix'])} && podtrace lab up{prefix_flag(doc['prefix'])}",
                      highlight=False)

    def table(title: str, *cols: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for col in cols:
            t.add_column(col, no_wrap=True)
        return t

    nodes = table("nodes", "node", "ip", "pod cidr", "netns", "overlay (vtep mac)")
    for n in doc["nodes"]:
        nodes.add_row(n["name"], n["ip"], " ".join(n.get("pod_cidrs") or [n["pod_cidr"]]), n["netns"],
                      f"{n['overlay']} ({n.get('mac', '?')})" if n.get("mac") else (n["overlay"] or "(routed)"))
    console.print(nodes)

    pods = table("pods", "pod", "node", "ip", "netns", "host veth")
    for p in doc["pods"]:
        name = p["name"] if p["namespace"] == "default" else f"{p['namespace']}/{p['name']}"
        pods.add_row(name, p["node"], " ".join(p.get("ips") or [p["ip"]]), p["netns"], p["host_veth"])
    console.print(pods)

    svcs = table("services", "service", "cluster ip", "ports", "backends")
    for s in doc["services"]:
        ports = " ".join(f"{p['port']}/{p['protocol'].lower()}→{p['target_port']}" for p in s["ports"])
        backends = " ".join(b.removeprefix("default/") for b in s["backends"])
        svcs.add_row(f"{s['namespace']}/{s['name']}", " ".join(s.get("cluster_ips") or [s["cluster_ip"]]),
                     ports, backends)
    console.print(svcs)
