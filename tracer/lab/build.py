"""Brings the lab up or down (build stages, rollback on failure, teardown).

`up(cfg)` turns a `LabPlan` into real kernel objects, every one of them inside a network
namespace whose name starts with the lab prefix (nothing is created in the root namespace),
then writes `inventory.json` and, last, `lab.json`: the presence of `lab.json` is what "the
lab is up" means. Any failure or interrupt (Ctrl-C, SIGTERM) during `up` removes everything
with the prefix again. `down(prefix)` finds what to remove from the machine itself (namespaces
by name, processes by network namespace and by an owner tag in their environment), so it
still works when the state file is lost, and does nothing when nothing exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from tracer.errors import EnvironmentProblem, require_root
from tracer import testhooks
from tracer.lab import cilium_ebpf, guard, kubeproxy_ipvs, kubeproxy_nft, processes, shell
from tracer.lab import topology as T
from tracer.lab import view
from tracer.lab.cni import flavour
from tracer.lab.processes import OWNER_ENV
from tracer.lab.shell import BuildError
from tracer.node import netns

__all__ = ["BuildError", "OWNER_ENV", "PAUSE_ENV", "STEPS", "Progress", "down", "missing_parts",
           "status", "up"]

Progress = Callable[[str], None]

# Test hook: pause (interruptibly) after the named build step, to test rollback at that point.
PAUSE_ENV = "PODTRACE_LAB_PAUSE_AFTER"
STEPS = ("namespaces", "fabric", "nodes", "pods", "services", "responders", "inventory")
_TOOLS = {"ip": "iproute2", "bridge": "iproute2", "iptables-restore": "iptables"}
_TOOLS6 = {"ip6tables-restore": "iptables"}
_PROXY_TOOLS = {"nftables": {"nft": "nftables"},
                "ipvs": {"ipvsadm": "ipvsadm", "ipset": "ipset"}}
# IPv6 labs: no duplicate address detection (addresses usable at once) and no router
# solicitations or autoconfiguration: only the traffic a test or probe sends, plus the
# neighbour discovery that traffic needs.
_V6_NS_SYSCTLS = {
    "net/ipv6/conf/all/disable_ipv6": "0", "net/ipv6/conf/default/disable_ipv6": "0",
    "net/ipv6/conf/all/accept_dad": "0", "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/all/accept_ra": "0", "net/ipv6/conf/default/accept_ra": "0",
    "net/ipv6/conf/all/router_solicitations": "0", "net/ipv6/conf/default/router_solicitations": "0",
    "net/ipv6/conf/all/autoconf": "0", "net/ipv6/conf/default/autoconf": "0",
}


def status(prefix: str | None = None, state_dir: Path | str | None = None) -> dict | None:
    """The status document of the lab with this prefix, or None when it is not up."""
    cfg_dir = T.lab_dir(prefix, state_dir)
    try:
        return json.loads((cfg_dir / "lab.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot read {cfg_dir / 'lab.json'}: {exc}",
                                 "run: podtrace lab down && podtrace lab up") from exc


def missing_parts(doc: dict) -> list[str]:
    """What an up lab's status document lists but the machine no longer has."""
    missing = [f"netns {ns}" for ns in _doc_namespaces(doc) if not netns.exists(ns)]
    for pod in doc.get("pods", []):
        pid = pod.get("responder_pid")
        if pid is not None and not processes.is_responder(pid, doc.get("prefix")):
            missing.append(f"responder of {pod['name']} (pid {pid})")
    if not Path(doc.get("inventory", "")).is_file():
        missing.append(f"inventory {doc.get('inventory')}")
    if not view.published(Path(doc.get("state_dir", ""))):
        missing.append("topology")
    return missing


def up(cfg: T.LabConfig, progress: Progress | None = None) -> tuple[dict, bool]:
    """Build the lab. Returns (status document, created); created is False when the lab was
    already up, in which case nothing was touched."""
    say = progress or (lambda _msg: None)
    require_root("podtrace lab up")
    _check_tools(6 in cfg.families, cfg.proxy)
    with guard.locked(cfg.state_dir):
        try:
            doc = status(cfg.prefix, cfg.state_dir)
        except EnvironmentProblem:
            doc = None  # unreadable state: whatever is there gets removed as leftovers
        if doc is not None:
            missing = missing_parts(doc)
            if not missing:
                return doc, False
            say(f"lab {cfg.prefix} is incomplete ({', '.join(missing[:3])}); rebuilding it")
        elif _leftovers(cfg.prefix, cfg.state_dir):
            say(f"removing leftovers of an unfinished lab {cfg.prefix}")
        with guard.shielded():
            _teardown(cfg.prefix, cfg.state_dir)
        topo = T.plan(cfg)
        with guard.interrupts_as_keyboard_interrupt():
            try:
                doc = _build(topo, say)
            except BaseException as exc:
                with guard.shielded():
                    # The progress sink may be what failed (e.g. a closed pipe): never let it
                    # stand between a failure and the rollback.
                    with contextlib.suppress(Exception):
                        say(f"lab up failed ({guard.why(exc)}); removing what it created")
                    _teardown(cfg.prefix, cfg.state_dir)
                raise
    return doc, True


def down(prefix: str | None = None, state_dir: Path | str | None = None) -> list[str]:
    """Remove every namespace, process and file of the lab with this prefix. Returns what was
    removed (empty when there was nothing)."""
    prefix = T.validate_prefix(prefix or T.default_prefix())
    require_root("podtrace lab down")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with guard.locked(root), guard.shielded():
        return _teardown(prefix, root)


def _build(topo: T.LabPlan, say: Progress) -> dict:
    fl = flavour(topo.config.cni)
    n_pods = len(topo.pods)
    ebpf = getattr(topo.config, "datapath", "legacy") == "ebpf"
    services = ((cilium_ebpf.STEP, cilium_ebpf.load) if ebpf
                else (proxy_step(topo, fl.SERVICES_STEP), _program_services))
    stages = [
        ("namespaces", f"creating {len(topo.namespaces)} network namespaces", _make_namespaces),
        ("fabric", f"wiring the fabric bridge to {len(topo.nodes)} node uplinks", _wire_fabric),
        ("nodes", fl.NODES_STEP, _configure_nodes),
        ("pods", f"configuring {n_pods} pods", _configure_pods),
        ("services", *services),
        ("responders", f"starting {n_pods} responders on TCP/UDP {T.APP_PORT}", processes.start),
        ("inventory", "writing the inventory", _write_inventory),
    ]
    topo.lab_dir.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}
    bpf: dict | None = None
    for key, message, fn in stages:
        say(message)
        result = fn(topo)
        if key == "responders":
            pids = result
        elif key == "services" and ebpf:
            bpf = result
        _maybe_pause(key, say)
    doc = T.status_document(topo, pids)
    if bpf is not None:
        doc["bpf"] = bpf    # per node: the programs attached (device, direction, id) and map ids
    view.publish(doc, topo.lab_dir)
    _write_json(topo.status_path, doc)
    return doc


def _make_namespaces(topo: T.LabPlan) -> None:
    shell.ip_batch(None, [f"netns add {ns}" for ns in topo.namespaces], "creating namespaces")
    v6 = 6 in topo.families or topo.config.underlay_family == 6
    # Before any device exists, so every device inherits it. An ipv4 lab: no IPv6 at all, so
    # no IPv6 chatter (router solicitations, MLD), only the traffic a test or probe sends.
    # An ipv6 or dual lab: IPv6 on, without DAD, router solicitations or autoconfiguration.
    for ns in topo.namespaces:
        if v6 and ns != topo.fabric_netns:
            shell.sysctls(ns, _V6_NS_SYSCTLS)
        else:
            shell.sysctls(ns, {"net/ipv6/conf/all/disable_ipv6": "1",
                               "net/ipv6/conf/default/disable_ipv6": "1"})
    # The fabric is a plain switch: bridged underlay frames do not go through iptables.
    shell.sysctls(topo.fabric_netns, {"net/bridge/bridge-nf-call-iptables": "0"})
    if v6:
        shell.sysctls(topo.fabric_netns, {"net/bridge/bridge-nf-call-ip6tables": "0"})


def _wire_fabric(topo: T.LabPlan) -> None:
    # A switch without a querier of its own: it floods multicast (IPv6 neighbour
    # solicitations of an IPv6 underlay included) rather than guessing who listens.
    snoop = " mcast_snooping 0" if topo.config.underlay_family == 6 else ""
    lines = ["link set lo up", f"link add {T.FABRIC_BRIDGE} type bridge{snoop}",
             f"link set {T.FABRIC_BRIDGE} up"]
    for n in topo.nodes:
        lines += [
            f"link add {n.fabric_port} mtu {T.UNDERLAY_MTU} type veth peer name {T.UPLINK} "
            f"address {n.uplink_mac} mtu {T.UNDERLAY_MTU} netns {n.netns}",
            f"link set {n.fabric_port} master {T.FABRIC_BRIDGE} up",
        ]
    shell.ip_batch(topo.fabric_netns, lines, "wiring the fabric")


def _configure_nodes(topo: T.LabPlan) -> None:
    fl = flavour(topo.config.cni)
    for n in topo.nodes:
        shell.sysctls(n.netns, fl.node_sysctls(n))
    shell.parallel([(["ip", "-n", n.netns, "-batch", "-"], fl.node_batch(topo, n),
                     f"configuring {n.name}") for n in topo.nodes])
    batch6 = getattr(fl, "node_batch6", None)
    if batch6 is not None and 6 in topo.families:
        shell.parallel([(["ip", "-6", "-n", n.netns, "-batch", "-"], batch6(topo, n),
                         f"configuring IPv6 on {n.name}") for n in topo.nodes])
    shell.parallel([(["bridge", "-n", n.netns, "-batch", "-"], fl.fdb_batch(topo, n),
                     f"programming the VXLAN FDB of {n.name}")
                    for n in topo.nodes if len(topo.nodes) > 1])
    for n in topo.nodes:
        after = fl.node_sysctls_after(topo, n)
        if after:
            shell.sysctls(n.netns, after)
        for key, (want, why) in fl.node_checks(n).items():
            got = shell.read_sysctl(n.netns, key)
            if got != want:
                raise BuildError(f"{key.replace('/', '.')} is {got!r} in {n.netns}, not {want}", why)
    programs = getattr(fl, "attach_programs", None)   # a flavour's own tc programs (calico)
    if programs is not None:
        programs(topo)


def _configure_pods(topo: T.LabPlan) -> None:
    fl = flavour(topo.config.cni)
    shell.parallel([(["ip", "-n", p.netns, "-batch", "-"], fl.pod_batch(p), f"configuring {p.name}")
                    for p in topo.pods])


def proxy_step(topo: T.LabPlan, iptables_step: str) -> str:
    """The progress message of the Services step in the lab's kube-proxy mode."""
    return {"nftables": "programming kube-proxy's nftables table (nftables mode)",
            "ipvs": "programming IPVS virtual servers on kube-ipvs0 (ipvs mode)"}.get(
        topo.config.proxy, iptables_step)


def _program_services(topo: T.LabPlan) -> None:
    """One `iptables-restore --noflush` per node and family (`ip6tables-restore` for IPv6):
    kube-proxy's nat rules in iptables mode, the CNI's filter rules in every mode; in
    nftables mode one `nft -f` per node and family with the `kube-proxy` table; in ipvs mode
    kube-ipvs0, the virtual servers and kube-proxy's ipset-based rules."""
    mode = topo.config.proxy
    fl = flavour(topo.config.cni)
    jobs = []
    per_node = getattr(fl, "node_filter_rules", None)   # calico's Felix chains
    for family in topo.families:
        if mode == "iptables":
            rules = T.iptables_rules(topo) if family == 4 else T.iptables_rules(topo, family)
        elif mode == "ipvs":
            rules = kubeproxy_ipvs.iptables_rules(topo, family)
        else:
            rules = "\n".join(fl.filter_rules(family)) + "\n"
        tool = "iptables-restore" if family == 4 else "ip6tables-restore"
        jobs += [(["ip", "netns", "exec", n.netns, tool, "-w", "5", "--noflush"],
                  rules + ("\n".join(per_node(topo, n)) + "\n" if per_node and family == 4 else ""),
                  f"programming {tool.removesuffix('-restore')} on {n.name}")
                 for n in topo.nodes]
        if mode == "nftables":
            jobs += [(["ip", "netns", "exec", n.netns, "nft", "-f", "-"], kubeproxy_nft.ruleset(topo, family),
                      f"programming the {kubeproxy_nft.nft_family(family)} kube-proxy table on {n.name}")
                     for n in topo.nodes]
    if mode == "ipvs":
        kubeproxy_ipvs.program(topo)   # the ipsets the iptables rules match come first
    shell.parallel(jobs)


def _write_inventory(topo: T.LabPlan) -> None:
    _write_json(topo.inventory_path, T.inventory(topo))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _maybe_pause(step: str, say: Progress) -> None:
    if testhooks.lab_pause_after() == step:
        say(f"paused after {step} ({PAUSE_ENV})")
        time.sleep(3600)


def _leftovers(prefix: str, state_root: Path) -> bool:
    pat = T.namespace_pattern(prefix)
    return (any(pat.match(ns) for ns in netns.list_names())
            or (state_root / prefix).exists()
            or bool(processes.owned_pids(prefix, [])))


def _teardown(prefix: str, state_root: Path) -> list[str]:
    removed: list[str] = []
    lab_dir = state_root / prefix
    pat = T.namespace_pattern(prefix)
    names = [ns for ns in netns.list_names() if pat.match(ns)]

    pids = processes.owned_pids(prefix, names)
    if pids:
        processes.kill(pids)
        removed += [f"process {pid}" for pid in sorted(pids)]
    if names:
        # -force: keep going past a namespace that vanished meanwhile.
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in names),
                       capture_output=True, text=True, timeout=60)
        removed += [f"netns {ns}" for ns in names]
        still = [ns for ns in names if netns.exists(ns)]
        if still:
            raise EnvironmentProblem(f"could not delete network namespaces: {', '.join(still)}",
                                     "delete them with `ip netns del NAME`")
        from tracer.kernel import tc

        forgotten = tc.forget_netns(names)   # records of tc filters that went with them
        if forgotten:
            removed.append(f"{forgotten} tc attachment record(s)")
    if lab_dir.exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(f"state {lab_dir}")
    with contextlib.suppress(OSError):
        state_root.rmdir()  # only when no other lab or tool keeps files there
    processes.reap()
    return removed


def _doc_namespaces(doc: dict) -> list[str]:
    return [doc.get("fabric_netns"), *(n["netns"] for n in doc.get("nodes", [])),
            *(p["netns"] for p in doc.get("pods", []))]


def _check_tools(v6: bool = False, proxy: str = "iptables") -> None:
    if proxy == "ipvs":
        kubeproxy_ipvs.check_kernel()
    for tool, package in {**_TOOLS, **(_TOOLS6 if v6 else {}), **_PROXY_TOOLS.get(proxy, {})}.items():
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"`{tool}` is not installed",
                                     f"install it: apt-get install {package}")
