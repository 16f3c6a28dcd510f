"""Building and removing the lab: namespaces, devices, iptables, responders, state files.

`up(cfg)` turns a `Topology` into real kernel objects, every one of them inside a network
namespace whose name starts with the lab prefix (nothing is created in the root namespace),
then writes `inventory.json` and, last, `lab.json`: the presence of `lab.json` is what "the
lab is up" means. Any failure or interrupt (Ctrl-C, SIGTERM) during `up` removes everything
with the prefix again. `down(prefix)` finds what to remove from the machine itself (namespaces
by name, processes by network namespace and by an owner tag in their environment), so it
still works when the state file is lost, and does nothing when nothing exists.

Speed: one `ip -batch` per namespace, run in parallel per stage, and one
`iptables-restore --noflush` per node.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from tracer.node import netns
from tracer.errors import EnvironmentProblem, PodtraceError, require_root
from tracer.lab import topology as T
from tracer.lab import view

Progress = Callable[[str], None]

OWNER_ENV = "PODTRACE_LAB_OWNER"
# Test hook: pause (interruptibly) after the named build step, to test rollback at that point.
PAUSE_ENV = "PODTRACE_LAB_PAUSE_AFTER"
STEPS = ("namespaces", "fabric", "nodes", "pods", "services", "responders", "inventory")
RESPONDER_MODULE = "tracer.lab.responder"
_READY_TIMEOUT = 10.0
_TOOLS = {"ip": "iproute2", "bridge": "iproute2", "iptables-restore": "iptables"}

# Popen objects of responders this process started, kept so they can be reaped (no zombies,
# no ResourceWarning) when the same process later runs `down`.
_spawned: dict[int, subprocess.Popen] = {}


class BuildError(EnvironmentProblem):
    """A step of `lab up` failed; the half-built lab has been removed."""


# ---------------------------------------------------------------------------------------
# Public API

def status(prefix: str | None = None, state_dir: Path | str | None = None) -> dict | None:
    """The status document of the lab with this prefix, or None when it is not up."""
    cfg_dir = _lab_dir(prefix, state_dir)
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
        if pid is not None and not _is_responder(pid, doc.get("prefix")):
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
    _check_tools()
    with _locked(cfg.state_dir):
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
        with _shielded():
            _teardown(cfg.prefix, cfg.state_dir)
        topo = T.plan(cfg)
        with _interrupts_as_keyboard_interrupt():
            try:
                doc = _build(topo, say)
            except BaseException as exc:
                with _shielded():
                    # The progress sink may be what failed (e.g. a closed pipe): never let it
                    # stand between a failure and the rollback.
                    with contextlib.suppress(Exception):
                        say(f"lab up failed ({_why(exc)}); removing what it created")
                    _teardown(cfg.prefix, cfg.state_dir)
                raise
    return doc, True


def down(prefix: str | None = None, state_dir: Path | str | None = None) -> list[str]:
    """Remove every namespace, process and file of the lab with this prefix. Returns what was
    removed (empty when there was nothing)."""
    prefix = T.validate_prefix(prefix or T.default_prefix())
    require_root("podtrace lab down")
    root = Path(state_dir) if state_dir else T.default_state_root()
    with _locked(root), _shielded():
        return _teardown(prefix, root)


# ---------------------------------------------------------------------------------------
# Building

def _build(topo: T.Topology, say: Progress) -> dict:
    cfg = topo.config
    n_pods = len(topo.pods)
    cilium = cfg.cni == "cilium"
    stages = [
        ("namespaces", f"creating {len(topo.namespaces)} network namespaces", _make_namespaces),
        ("fabric", f"wiring the fabric bridge to {len(topo.nodes)} node uplinks", _wire_fabric),
        ("nodes", "configuring nodes: cilium_host/cilium_net, cilium_vxlan, lxc devices, "
                  "routes, neighbours, FDB, sysctls", _configure_cilium_nodes)
        if cilium else
        ("nodes", "configuring nodes: cni0, flannel.1, routes, neighbours, FDB, sysctls",
         _configure_nodes),
        ("pods", f"configuring {n_pods} pods", _configure_cilium_pods if cilium else _configure_pods),
        ("services", "programming kube-proxy Services and Cilium's forward rules in iptables"
         if cilium else "programming kube-proxy Services and flannel rules in iptables",
         _program_iptables),
        ("responders", f"starting {n_pods} responders on TCP/UDP {T.APP_PORT}", _start_responders),
        ("inventory", "writing the inventory", _write_inventory),
    ]
    cfg.lab_dir.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}
    for key, message, fn in stages:
        say(message)
        result = fn(topo)
        if key == "responders":
            pids = result
        _maybe_pause(key, say)
    doc = T.status_document(topo, pids)
    view.publish(doc, topo.lab_dir)
    _write_json(topo.status_path, doc)
    return doc


def _make_namespaces(topo: T.Topology) -> None:
    _ip_batch(None, [f"netns add {ns}" for ns in topo.namespaces], "creating namespaces")
    # Before any device exists, so every device inherits it: no IPv6 chatter (router
    # solicitations, MLD) in the lab, only the traffic a test or probe sends.
    for ns in topo.namespaces:
        _sysctls(ns, {"net/ipv6/conf/all/disable_ipv6": "1",
                      "net/ipv6/conf/default/disable_ipv6": "1"})
    # The fabric is a plain switch: bridged underlay frames do not go through iptables.
    _sysctls(topo.fabric_netns, {"net/bridge/bridge-nf-call-iptables": "0"})


def _wire_fabric(topo: T.Topology) -> None:
    lines = ["link set lo up", f"link add {T.FABRIC_BRIDGE} type bridge",
             f"link set {T.FABRIC_BRIDGE} up"]
    for n in topo.nodes:
        lines += [
            f"link add {n.fabric_port} mtu {T.UNDERLAY_MTU} type veth peer name {T.UPLINK} "
            f"address {n.uplink_mac} mtu {T.UNDERLAY_MTU} netns {n.netns}",
            f"link set {n.fabric_port} master {T.FABRIC_BRIDGE} up",
        ]
    _ip_batch(topo.fabric_netns, lines, "wiring the fabric")


def node_batch(topo: T.Topology, n: T.NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a flannel (vxlan) node."""
    lines = [
        "link set lo up",
        f"addr add {n.ip}/24 dev {T.UPLINK}",
        f"link set {T.UPLINK} up",
        f"link add {T.CNI_BRIDGE} address {n.bridge_mac} mtu {T.POD_MTU} type bridge",
        f"addr add {n.gateway}/24 dev {T.CNI_BRIDGE}",
        f"link set {T.CNI_BRIDGE} up",
        f"link add {T.OVERLAY} address {n.mac} mtu {T.POD_MTU} type vxlan id {T.VXLAN_ID} "
        f"dstport {T.VXLAN_PORT} local {n.ip} dev {T.UPLINK} nolearning",
        f"addr add {n.overlay_ip}/32 dev {T.OVERLAY}",
        f"link set {T.OVERLAY} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} mtu {T.POD_MTU} type veth peer name eth0 "
            f"address {p.mac} mtu {T.POD_MTU} netns {p.netns}",
            f"link set {p.host_veth} master {T.CNI_BRIDGE} up",
            # The bridge CNI's hairpinMode, which flannel enables: a pod can reach itself
            # through a Service VIP.
            f"link set {p.host_veth} type bridge_slave hairpin on",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        lines += [
            f"route add {k.pod_cidr} via {k.overlay_ip} dev {T.OVERLAY} onlink",
            f"neigh add {k.overlay_ip} lladdr {k.mac} dev {T.OVERLAY} nud permanent",
        ]
    return lines


def fdb_batch(topo: T.Topology, n: T.NodePlan) -> list[str]:
    return [f"fdb append {k.mac} dev {T.OVERLAY} dst {k.ip}"
            for k in topo.nodes if k.index != n.index]


def pod_batch(p: T.PodPlan) -> list[str]:
    return ["link set lo up", f"addr add {p.ip}/24 dev eth0", "link set eth0 up",
            f"route add default via {p.gateway} dev eth0"]


def _configure_nodes(topo: T.Topology) -> None:
    for n in topo.nodes:
        _sysctls(n.netns, {"net/ipv4/ip_forward": "1",
                           "net/bridge/bridge-nf-call-iptables": "1"})
    _parallel([(["ip", "-n", n.netns, "-batch", "-"], node_batch(topo, n), f"configuring {n.name}")
               for n in topo.nodes])
    _parallel([(["bridge", "-n", n.netns, "-batch", "-"], fdb_batch(topo, n),
                f"programming the VXLAN FDB of {n.name}")
               for n in topo.nodes if len(topo.nodes) > 1])
    for n in topo.nodes:
        got = _read_sysctl(n.netns, "net/bridge/bridge-nf-call-iptables")
        if got != "1":
            raise BuildError(f"net.bridge.bridge-nf-call-iptables is {got!r} in {n.netns}, not 1",
                             "this kernel's br_netfilter is not per network namespace")


def _configure_pods(topo: T.Topology) -> None:
    _parallel([(["ip", "-n", p.netns, "-batch", "-"], pod_batch(p), f"configuring {p.name}")
               for p in topo.pods])


# ---------------------------------------------------------------------------------------
# The cilium flavour: no bridge; lxc devices, cilium_host/cilium_net, cilium_vxlan. See
# docs/runbooks/cilium-path.md for what each kernel object stands in for.

def cilium_node_batch(topo: T.Topology, n: T.NodePlan) -> list[str]:
    """`ip -batch` lines that make a node namespace look like a Cilium node (VXLAN tunnel
    mode, per-endpoint routes, kube-proxy kept)."""
    host, net, vx = T.CILIUM_HOST, T.CILIUM_NET, T.CILIUM_OVERLAY
    lines = [
        "link set lo up",
        f"addr add {n.ip}/24 dev {T.UPLINK}",
        f"link set {T.UPLINK} up",
        # cilium_net carries cilium_host's MAC: what the node sends out of cilium_host comes
        # back up the stack on cilium_net and is forwarded from there (in Cilium, bpf_host's
        # program on cilium_host does that forwarding). NOARP, as on a Cilium node.
        f"link add {host} address {n.bridge_mac} type veth peer name {net} address {n.bridge_mac}",
        f"link set {host} arp off",
        f"link set {net} arp off",
        f"addr add {n.router_ip}/32 dev {host} scope link",
        f"link set {net} up",
        f"link set {host} up",
        f"link add {vx} address {n.mac} mtu {T.POD_MTU} type vxlan id {T.CILIUM_VNI} "
        f"dstport {T.VXLAN_PORT} local {n.ip} dev {T.UPLINK} nolearning",
        f"link set {vx} up",
    ]
    for p in topo.pods_on(n.index):
        lines += [
            f"link add {p.host_veth} address {p.host_mac} mtu {T.POD_MTU} type veth peer name eth0 "
            f"address {p.mac} mtu {T.POD_MTU} netns {p.netns}",
            f"link set {p.host_veth} up",
            # Per-endpoint route; the pod's MAC is known (Cilium writes it from its endpoint
            # map: the node never ARPs for a pod).
            f"route add {p.ip}/32 dev {p.host_veth} scope link",
            f"neigh add {p.ip} lladdr {p.mac} dev {p.host_veth} nud permanent",
        ]
    for k in topo.nodes:
        if k.index == n.index:
            continue
        lines += [
            # Forwarded pod traffic: straight into the overlay (Cilium's tunnel map).
            f"route add {k.pod_cidr} via {k.router_ip} dev {vx} onlink src {n.router_ip}",
            f"neigh add {k.router_ip} lladdr {k.mac} dev {vx} nud permanent",
            # The node's own traffic: Cilium's route, via cilium_host with the router IP.
            f"route add {k.pod_cidr} via {n.router_ip} dev {host} src {n.router_ip} "
            f"mtu {T.POD_MTU} table {T.CILIUM_HOST_TABLE}",
        ]
    lines.append(f"rule add pref {T.CILIUM_RULE_PREF} iif lo to {T.CLUSTER_CIDR} "
                 f"lookup {T.CILIUM_HOST_TABLE}")
    return lines


def cilium_fdb_batch(topo: T.Topology, n: T.NodePlan) -> list[str]:
    return [f"fdb append {k.mac} dev {T.CILIUM_OVERLAY} dst {k.ip}"
            for k in topo.nodes if k.index != n.index]


def cilium_pod_batch(p: T.PodPlan) -> list[str]:
    """A Cilium pod: a /32 and the two routes Cilium's CNI plugin installs (the router IP
    on-link, the default route through it)."""
    return ["link set lo up", f"addr add {p.ip}/32 dev eth0", "link set eth0 up",
            f"route add {p.gateway}/32 dev eth0 scope link",
            f"route add default via {p.gateway} dev eth0 mtu {T.POD_MTU}"]


def cilium_node_sysctls(topo: T.Topology, n: T.NodePlan) -> dict[str, str]:
    """After the devices exist: rp_filter off on Cilium's devices (as cilium-agent and its
    CNI plugin set it), and cilium_net accepting the node's own addresses as sources (what
    the node sends through cilium_host re-enters there)."""
    devs = [T.CILIUM_HOST, T.CILIUM_NET, T.CILIUM_OVERLAY] + [p.host_veth for p in topo.pods_on(n.index)]
    values = {f"net/ipv4/conf/{d}/rp_filter": "0" for d in devs}
    values[f"net/ipv4/conf/{T.CILIUM_NET}/accept_local"] = "1"
    return values


def _configure_cilium_nodes(topo: T.Topology) -> None:
    for n in topo.nodes:
        _sysctls(n.netns, {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0"})
    _parallel([(["ip", "-n", n.netns, "-batch", "-"], cilium_node_batch(topo, n),
                f"configuring {n.name}") for n in topo.nodes])
    _parallel([(["bridge", "-n", n.netns, "-batch", "-"], cilium_fdb_batch(topo, n),
                f"programming the VXLAN FDB of {n.name}")
               for n in topo.nodes if len(topo.nodes) > 1])
    for n in topo.nodes:
        _sysctls(n.netns, cilium_node_sysctls(topo, n))


def _configure_cilium_pods(topo: T.Topology) -> None:
    _parallel([(["ip", "-n", p.netns, "-batch", "-"], cilium_pod_batch(p), f"configuring {p.name}")
               for p in topo.pods])


def _program_iptables(topo: T.Topology) -> None:
    rules = T.iptables_rules(topo)
    _parallel([(["ip", "netns", "exec", n.netns, "iptables-restore", "-w", "5", "--noflush"],
                rules, f"programming iptables on {n.name}") for n in topo.nodes])


def _start_responders(topo: T.Topology) -> dict[str, int]:
    env = dict(os.environ)
    env[OWNER_ENV] = topo.prefix
    # The responder must import this very package even when it is not installed.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    procs: dict[str, subprocess.Popen] = {}
    for p in topo.pods:
        log = open(topo.lab_dir / f"responder-{p.name}.log", "ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", p.netns, sys.executable, "-m", RESPONDER_MODULE,
                 "--name", p.name, "--port", str(T.APP_PORT)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, env=env, cwd="/",
            )
        finally:
            log.close()
        _spawned[proc.pid] = proc
        procs[p.key] = proc
    inodes = {p.key: netns.inode(p.netns) for p in topo.pods}
    waiting = dict(procs)
    deadline = time.monotonic() + _READY_TIMEOUT
    while waiting:
        for key, proc in list(waiting.items()):
            if proc.poll() is not None:
                name = key.split("/", 1)[1]
                log = (topo.lab_dir / f"responder-{name}.log").read_text(errors="replace")
                last = log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}"
                raise BuildError(f"the responder of {name} died: {last}")
            if _listening(proc.pid, inodes[key], T.APP_PORT):
                del waiting[key]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise BuildError(f"responders not listening after {_READY_TIMEOUT:.0f} s: "
                             + ", ".join(sorted(waiting)))
        time.sleep(0.01)
    return {key: proc.pid for key, proc in procs.items()}


def _listening(pid: int, ns_inode: int, port: int) -> bool:
    """True once `pid` is inside the pod namespace with TCP LISTEN and UDP sockets on `port`.
    /proc/PID/net shows the namespace of PID, so this needs no traffic."""
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino != ns_inode:
            return False
        tcp = Path(f"/proc/{pid}/net/tcp").read_text()
        udp = Path(f"/proc/{pid}/net/udp").read_text()
    except OSError:
        return False
    hexport = f":{port:04X}"

    def bound(table: str, state: str | None) -> bool:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(hexport) and (state is None or fields[3] == state):
                return True
        return False

    return bound(tcp, "0A") and bound(udp, None)


def _write_inventory(topo: T.Topology) -> None:
    _write_json(topo.inventory_path, T.inventory(topo))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _maybe_pause(step: str, say: Progress) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        say(f"paused after {step} ({PAUSE_ENV})")
        time.sleep(3600)


# ---------------------------------------------------------------------------------------
# Removing

def _leftovers(prefix: str, state_root: Path) -> bool:
    pat = T.namespace_pattern(prefix)
    return (any(pat.match(ns) for ns in netns.list_names())
            or (state_root / prefix).exists()
            or bool(_owned_pids(prefix, [])))


def _teardown(prefix: str, state_root: Path) -> list[str]:
    removed: list[str] = []
    lab_dir = state_root / prefix
    pat = T.namespace_pattern(prefix)
    names = [ns for ns in netns.list_names() if pat.match(ns)]

    pids = _owned_pids(prefix, names)
    if pids:
        _kill(pids)
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
        from tracer.kernel import tc as tcattach

        forgotten = tcattach.forget_netns(names)   # records of tc filters that went with them
        if forgotten:
            removed.append(f"{forgotten} tc attachment record(s)")
    if lab_dir.exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(f"state {lab_dir}")
    with contextlib.suppress(OSError):
        state_root.rmdir()  # only when no other lab or tool keeps files there
    for pid, proc in list(_spawned.items()):  # reap responders that died on their own
        if proc.poll() is not None:
            del _spawned[pid]
    return removed


def _owned_pids(prefix: str, names: Iterable[str]) -> set[int]:
    """Processes that belong to the lab: inside one of its namespaces, or tagged with its
    prefix in their environment (a responder whose namespace name is already gone)."""
    inodes = set()
    for ns in names:
        with contextlib.suppress(OSError):
            inodes.add(netns.inode(ns))
    me = os.getpid()
    tag = f"{OWNER_ENV}={prefix}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            if inodes and os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                found.add(pid)
                continue
            if RESPONDER_MODULE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    return found


def _is_responder(pid: int, prefix: str | None) -> bool:
    try:
        if RESPONDER_MODULE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        if prefix is None:
            return True
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        return True  # not root: the command line is all we can check
    except OSError:
        return False
    return f"{OWNER_ENV}={prefix}".encode() in environ.split(b"\0")


def _kill(pids: set[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while True:
            pids = {pid for pid in pids if _alive(pid)}
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not pids:
            return
    raise EnvironmentProblem(f"processes survived SIGKILL: {sorted(pids)}", "check `ps`")


def _alive(pid: int) -> bool:
    """Reaps our own children; a zombie counts as gone."""
    proc = _spawned.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _spawned[pid]
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---------------------------------------------------------------------------------------
# Helpers

def _lab_dir(prefix: str | None, state_dir: Path | str | None) -> Path:
    prefix = T.validate_prefix(prefix or T.default_prefix())
    return (Path(state_dir) if state_dir else T.default_state_root()) / prefix


def _doc_namespaces(doc: dict) -> list[str]:
    return [doc.get("fabric_netns"), *(n["netns"] for n in doc.get("nodes", [])),
            *(p["netns"] for p in doc.get("pods", []))]


def _check_tools() -> None:
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"`{tool}` is not installed",
                                     f"install it: apt-get install {package}")


@contextlib.contextmanager
def _locked(state_root: Path):
    """Serialise lab up/down on this machine (flock on the state root directory)."""
    while True:
        state_root.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A concurrent `down` may have removed the directory while we waited.
            try:
                same = os.stat(state_root).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt():
    """During `up`, SIGTERM unwinds like Ctrl-C so the rollback runs."""
    if not _in_main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _shielded():
    """A second Ctrl-C or SIGTERM must not cut a cleanup short; the first one already
    asked to stop."""
    if not _in_main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _why(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, PodtraceError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _sysctls(ns: str, values: dict[str, str]) -> None:
    # setns() on this thread: /proc/sys/net resolves to the namespace of the caller.
    with netns.entered(ns):
        for key, value in values.items():
            try:
                Path("/proc/sys", key).write_text(value)
            except OSError as exc:
                raise BuildError(f"cannot set {key.replace('/', '.')}={value} in {ns}: "
                                 f"{exc.strerror}") from exc


def _read_sysctl(ns: str, key: str) -> str:
    with netns.entered(ns):
        return Path("/proc/sys", key).read_text().strip()


def _ip_batch(ns: str | None, lines: list[str], what: str) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    _parallel([(argv, lines, what)])


def _parallel(jobs: list[tuple[list[str], list[str] | str, str]]) -> None:
    """Run commands concurrently, each fed its batch on stdin; raise on the first failure."""
    running = []
    try:
        for argv, lines, what in jobs:
            text = lines if isinstance(lines, str) else "".join(line + "\n" for line in lines)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            running.append((proc, what))
            # Batches are far below a pipe's capacity: writing never blocks, so every
            # command is already working while the next one starts.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(text)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        failures = []
        for proc, what in running:
            err = proc.stderr.read()
            proc.wait(timeout=60)
            if proc.returncode != 0:
                failures.append(f"{what}: {_first_error(err)}")
    finally:
        for proc, _ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    if failures:
        raise BuildError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))


def _first_error(err: str) -> str:
    lines = [line.strip() for line in err.strip().splitlines() if line.strip()]
    return " / ".join(lines[:2]) if lines else "failed"
