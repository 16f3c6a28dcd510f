"""Which pod owns a host-side veth on this node (from /proc, netlink, CRI).

A host-side veth → its peer's network namespace (IFLA_LINK + IFLA_LINK_NETNSID, matched by
RTM_GETNSID against the namespaces of /proc and /run/netns, both through pyroute2) → the pod
(CRI sandbox, pod cgroup, or pod IP).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tracer import settings
from tracer.cluster import inventory
from tracer.cluster.topology import NodeDevices, PodPlace, Topology
from tracer.errors import BadInput, EnvironmentProblem, PodtraceError
from tracer.node import netns


def host_proc() -> Path:
    """The host's /proc: the agent mounts it at /host/proc (PODTRACE_HOST_PROC)."""
    return settings.host_proc()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]



@dataclass(frozen=True)
class Link:
    ifindex: int
    ifname: str
    kind: str | None              # "veth", "bridge", "vxlan", …
    peer_ifindex: int | None      # IFLA_LINK: the peer's ifindex, in the peer's namespace
    link_netnsid: int | None      # the peer namespace's id, as this namespace numbers it
    master: str | None = None


def _nsid(value) -> int | None:
    """A netns id as the kernel reports it (u32 on the wire, -1 meaning none)."""
    if value is None:
        return None
    value = int(value)
    return None if value < 0 or value >= 2 ** 31 else value


def links_of(msgs) -> list[Link]:
    """RTM_NEWLINK messages (pyroute2's `get_links()`) → Links."""
    msgs = list(msgs)
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
    out = []
    for m in msgs:
        info = m.get_attr("IFLA_LINKINFO")
        peer = m.get_attr("IFLA_LINK")
        out.append(Link(int(m["index"]), m.get_attr("IFLA_IFNAME") or "",
                        info.get_attr("IFLA_INFO_KIND") if info is not None else None,
                        int(peer) if peer else None, _nsid(m.get_attr("IFLA_LINK_NETNSID")),
                        names.get(m.get_attr("IFLA_MASTER"))))
    return out


def _ipr(node_netns: str | None):
    """A netlink socket in namespace `node_netns` (a name under /run/netns or a path; None:
    this one). A socket keeps the namespace it was made in."""
    from pyroute2 import IPRoute

    if node_netns is None:
        return IPRoute()
    with netns.entered(node_netns):
        return IPRoute()


_FIB_LEAF = re.compile(r"^\s*\|-- ([0-9.]+)\s*$")


def parse_fib_trie(text: str) -> list[str]:
    """Local IPv4 addresses of a namespace from its /proc/PID/net/fib_trie (no setns)."""
    out: list[str] = []
    last = None
    for line in text.splitlines():
        m = _FIB_LEAF.match(line)
        if m:
            last = m.group(1)
            continue
        if last and "/32 host LOCAL" in line:
            if not last.startswith("127.") and last not in out:
                out.append(last)
    return out


def parse_if_inet6(text: str) -> list[str]:
    """Global and unique-local IPv6 addresses of a namespace from its /proc/PID/net/if_inet6
    (no setns): `ADDR32HEX IFINDEX PREFIXLEN SCOPE FLAGS NAME` per line; link-local (scope
    0x20), host (0x10) and tentative/dadfailed addresses are not a pod's address."""
    import ipaddress

    out: list[str] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or len(f[0]) != 32:
            continue
        try:
            scope, flags = int(f[3], 16), int(f[4], 16)
            addr = str(ipaddress.IPv6Address(bytes.fromhex(f[0])))
        except ValueError:
            continue
        if scope != 0 or flags & 0x48:      # IFA_F_TENTATIVE 0x40, IFA_F_DADFAILED 0x08
            continue
        if addr not in out:
            out.append(addr)
    return out


_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a /proc/PID/cgroup of a container (systemd or cgroupfs kubelet driver)."""
    m = _POD_UID.search(text)
    return m.group(1).replace("_", "-") if m else None


def parse_crictl_inspectp(text: str) -> list[dict]:
    """`crictl inspectp -o json ID…` (one JSON document per sandbox, concatenated) →
    [{"namespace", "name", "uid", "pid", "netns_path"}]."""
    out = []
    dec = json.JSONDecoder()
    pos, text = 0, text.strip()
    while pos < len(text):
        doc, end = dec.raw_decode(text, pos)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        docs = doc if isinstance(doc, list) else [doc]
        for d in docs:
            st = d.get("status") or {}
            md = st.get("metadata") or {}
            info = d.get("info") or {}
            path = None
            for ns in ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []:
                if ns.get("type") == "network" and ns.get("path"):
                    path = ns["path"]
            out.append({"namespace": md.get("namespace"), "name": md.get("name"), "uid": md.get("uid"),
                        "pid": info.get("pid"), "netns_path": path})
    return out


def cri_netns_map(run: Callable = subprocess.run, timeout: float = 5.0) -> tuple[dict[int, str], str | None]:
    """netns inode → "ns/pod" from the container runtime (crictl), and a note when crictl
    cannot be used (missing, no runtime socket): the caller falls back to /proc."""
    try:
        ids = run(["crictl", "pods", "-q", "--state", "ready"], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {}, "crictl not installed"
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"crictl failed: {_first_line(exc)}"
    if ids.returncode != 0:
        return {}, f"crictl pods failed: {(ids.stderr or '').strip().splitlines()[-1:] or ids.returncode}"
    sandboxes = ids.stdout.split()
    if not sandboxes:
        return {}, None
    try:
        got = run(["crictl", "inspectp", "-o", "json", *sandboxes], capture_output=True, text=True,
                  timeout=timeout)
        entries = parse_crictl_inspectp(got.stdout) if got.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {}, f"crictl inspectp failed: {_first_line(exc)}"
    out = {}
    for e in entries:
        path = e["netns_path"] or (str(host_proc() / str(e["pid"]) / "ns" / "net") if e["pid"] else None)
        if not path or not e["name"]:
            continue
        with contextlib.suppress(OSError):
            out[os.stat(path).st_ino] = f"{e['namespace']}/{e['name']}"
    return out, None


@dataclass(frozen=True)
class NetnsRef:
    inode: int
    path: str                   # something open()-able: /proc/PID/ns/net or /run/netns/NAME
    pid: int | None = None
    name: str | None = None     # a named (ip netns) namespace


def scan_netns(proc: Path | None = None, run_netns: Path = Path("/run/netns")) -> dict[int, NetnsRef]:
    """Every network namespace with a process in it (one pid each) or a name under
    /run/netns. /proc/PID/ns/net of another user's process, or of one holding capabilities
    we lack, needs CAP_SYS_PTRACE: those are skipped, and /run/netns names still count."""
    proc = proc or host_proc()
    out: dict[int, NetnsRef] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        path = entry / "ns" / "net"
        with contextlib.suppress(OSError):
            ino = os.stat(path).st_ino
            if ino not in out:
                out[ino] = NetnsRef(ino, str(path), pid=int(entry.name))
    if run_netns.is_dir():
        for entry in run_netns.iterdir():
            with contextlib.suppress(OSError):
                ino = os.stat(entry).st_ino
                ref = out.get(ino)
                out[ino] = NetnsRef(ino, ref.path if ref else str(entry), ref.pid if ref else None, entry.name)
    return out


@dataclass
class VethOwner:
    host_ifname: str
    host_ifindex: int
    peer_ifindex: int | None
    nsid: int | None
    netns_inode: int | None = None
    pid: int | None = None
    netns_name: str | None = None
    ips: list[str] = field(default_factory=list)
    pod: str | None = None          # "ns/name"
    method: str | None = None       # how the pod was recognised: cri, cgroup or ip
    note: str | None = None

    def as_json(self) -> dict:
        return dict(self.__dict__)


def _ns_addresses(ref: NetnsRef) -> list[str]:
    """The namespace's IPv4 addresses (fib_trie), then its IPv6 ones (if_inet6)."""
    if ref.pid is not None:
        with contextlib.suppress(OSError):
            net = host_proc() / str(ref.pid) / "net"
            return parse_fib_trie((net / "fib_trie").read_text()) + _inet6(net)
    with contextlib.suppress(OSError, PodtraceError), netns.entered(ref.path):
        # A namespace nobody lives in: fib_trie of this thread, now inside it.
        net = Path("/proc/thread-self/net")
        return parse_fib_trie((net / "fib_trie").read_text()) + _inet6(net)
    return []


def _inet6(net: Path) -> list[str]:
    try:
        return parse_if_inet6((net / "if_inet6").read_text())
    except OSError:      # IPv6 disabled on this kernel: no file
        return []


def _identify(ref: NetnsRef, inv: inventory.Inventory | None, cri: dict[int, str]) -> tuple[str | None, str | None, list[str]]:
    ips = _ns_addresses(ref)
    if ref.inode in cri:
        return cri[ref.inode], "cri", ips
    if inv is not None and ref.pid is not None:
        with contextlib.suppress(OSError):
            uid = pod_uid_from_cgroup((host_proc() / str(ref.pid) / "cgroup").read_text())
            if uid:
                for p in inv.pods.values():
                    if p.uid == uid:
                        return p.key, "cgroup", ips
    if inv is not None:
        for ip in ips:
            kind, key = inv.lookup_ip(ip)
            if kind == "pod" and not inv.pods[key].host_network:
                return key, "ip", ips
    return None, None, ips


def _read_links(node_netns: str | None) -> list[Link]:
    try:
        with contextlib.closing(_ipr(node_netns)) as ipr:
            return links_of(ipr.get_links())
    except OSError as exc:
        raise EnvironmentProblem(f"cannot list links: {_first_line(exc)}", "run as root") from None


def _nsids(node_netns: str | None, candidates: list[NetnsRef]) -> dict[int, NetnsRef]:
    """nsid → namespace, as `node_netns` numbers the others (RTM_GETNSID by fd)."""
    out: dict[int, NetnsRef] = {}
    with contextlib.closing(_ipr(node_netns)) as ipr:
        for ref in candidates:
            try:
                fd = os.open(ref.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                got = ipr.get_netnsid(fd=fd)
            except Exception:  # pyroute2 raises NetlinkError for a namespace it cannot ask about
                got = None
            finally:
                os.close(fd)
            nsid = _nsid((got or {}).get("nsid"))
            if nsid is not None:
                out.setdefault(nsid, ref)
    return out


def host_veth_owners(inv: inventory.Inventory | None = None, node_netns: str | None = None, cri: bool = True,
                     only: str | None = None) -> dict[str, VethOwner]:
    """Every veth of the node whose peer is in another namespace → the pod that owns it.
    `node_netns`: None (this namespace: the agent, hostNetwork), a name under /run/netns
    (the lab's nodes) or a path."""
    links = [ln for ln in _read_links(node_netns)
             if ln.kind == "veth" and ln.link_netnsid is not None and (only is None or ln.ifname == only)]
    if not links:
        return {}
    cri_map, note = cri_netns_map() if cri else ({}, "CRI not asked")
    self_ino = os.stat(netns.netns_path(node_netns) if node_netns else "/proc/thread-self/ns/net").st_ino
    by_nsid = _nsids(node_netns, [r for r in scan_netns().values() if r.inode != self_ino])
    out = {}
    for ln in links:
        owner = VethOwner(ln.ifname, ln.ifindex, ln.peer_ifindex, ln.link_netnsid)
        ref = by_nsid.get(ln.link_netnsid)
        if ref is None:
            owner.note = "peer namespace not found (no process in it and no /run/netns name)"
        else:
            owner.netns_inode, owner.pid, owner.netns_name = ref.inode, ref.pid, ref.name
            owner.pod, owner.method, owner.ips = _identify(ref, inv, cri_map)
            if owner.pod is None:
                owner.note = "no pod of the inventory matches this namespace" + (f" ({note})" if note else "")
        out[ln.ifname] = owner
    return out


def host_veth_owner(ifname: str, inv: inventory.Inventory | None = None, node_netns: str | None = None,
                    cri: bool = True) -> VethOwner:
    """The pod behind one host-side veth (see host_veth_owners)."""
    got = host_veth_owners(inv, node_netns, cri, only=ifname)
    if ifname not in got:
        raise BadInput(f"{ifname} is not a veth with a peer in another namespace",
                       "give a host-side pod interface (ip -d link show type veth)")
    return got[ifname]


def uplinks(node_ips: Iterable[str] = ()) -> list[str]:
    """The devices this namespace reaches the other nodes and the world by (asked of the
    routing table; no packet is sent). They lead to the network, never into a pod — a veth
    there means a node that is itself a container or a namespace (kind, the lab)."""
    out = []
    with contextlib.closing(_ipr(None)) as ipr:
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        node_ips = list(node_ips)
        world = ["1.1.1.1"] + (["2606:4700:4700::1111"] if any(":" in a for a in node_ips) else [])
        for ip in [*node_ips, *world]:
            try:
                routes = ipr.route("get", dst=ip, family=socket.AF_INET6 if ":" in ip else socket.AF_INET)
            except Exception:  # pyroute2's NetlinkError: no route there
                continue
            out += [dev for r in routes if (dev := names.get(r.get_attr("RTA_OIF"))) and dev != "lo"]
    return list(dict.fromkeys(out))


def local_pods(inv: inventory.Inventory | None = None, node_ips: Iterable[str] = (), cri: bool = False,
               ) -> tuple[int, dict[str, VethOwner], list[str]]:
    """This node as seen from its own namespace: (its netns inode, host veth → owner for
    every pod namespace hanging off it, the uplinks). Pods of other nodes that share the
    kernel (kind, the lab) are not behind this namespace's veths, so they are not here."""
    ups = uplinks(node_ips)
    host_ino = os.stat("/proc/thread-self/ns/net").st_ino
    owners = {name: o for name, o in host_veth_owners(inv, None, cri=cri).items()
              if o.netns_inode and o.netns_inode != host_ino and name not in ups}
    return host_ino, owners, ups


def pod_netns_inodes(inv: inventory.Inventory, node_netns: str | None = None, cri: bool = True) -> dict[int, str]:
    """netns inode → "ns/pod" for the pods of this node: what BPF events carry, so hops
    inside a pod's namespace can be named on a real node."""
    return {o.netns_inode: o.pod for o in host_veth_owners(inv, node_netns, cri).values()
            if o.pod and o.netns_inode}


# The CNIs' own devices on a node, by role (the pods' host veths are found, not named).
CNI_BRIDGES = ("cni0", "cbr0", "cilium_host")                    # flannel/bridge, kubenet, cilium
CNI_OVERLAYS = ("flannel.1", "cilium_vxlan", "vxlan.calico", "tunl0")
CNI_OTHERS = ("cilium_net",)


@dataclass
class LocalNode:
    """This node as its agent finds it: the topology of one node, and what events need named."""

    topology: Topology
    namespaces: dict[str, dict]       # netns inode → {"ips", "host"}: this node's and its pods'
    netns_by_ip: dict[str, str]       # a flow pod's address → its namespace path
    wanted: list[str]                 # the PodPlace keys of the flow's pods on this node

    def netns_filter(self) -> list[int] | None:
        """This node's traffic is in its own namespace and its pods'; anything else the kernel
        runs (other namespaces on a shared kernel) is not this node's to report. No local pod
        found (not a veth-based CNI): None, the whole kernel."""
        return [int(i) for i in self.namespaces] if len(self.namespaces) > 1 else None

    def devices(self) -> list[str]:
        """The hop devices here: the CNI's and the uplinks always, the flow's pods' veths."""
        return [dev for _ns, dev in self.topology.devices(self.wanted, nodes=[self.topology.nodes[0].name])]


def discover(node: str, pod_ips: Iterable[str], node_ips: Iterable[str]) -> LocalNode:
    """On a real node: its pods (the namespaces behind the host-side veths here) with their
    addresses, its CNI devices and uplinks, as a one-node Topology; `pod_ips` are the flow's."""
    pod_ips = set(pod_ips)
    host_ino, owners, ups = local_pods(None, node_ips, cri=False)
    host = NetnsRef(host_ino, "/proc/self/ns/net", pid=os.getpid())
    namespaces: dict[str, dict] = {str(host_ino): {"ips": _ns_addresses(host), "host": True}}
    netns_by_ip: dict[str, str] = {}
    places, wanted = [], []
    for owner in owners.values():
        namespaces[str(owner.netns_inode)] = {"ips": owner.ips, "host": False}
        path = f"/proc/{owner.pid}/ns/net" if owner.pid else f"/run/netns/{owner.netns_name}"
        key = owner.pod or f"?/{owner.host_ifname}"    # unnamed without an inventory: by its veth
        places.append(PodPlace(key=key, node=node, netns=path, host_veth=owner.host_ifname))
        for ip in owner.ips:
            if ip in pod_ips:
                netns_by_ip[ip] = path
        if set(owner.ips) & pod_ips:
            wanted.append(key)
    names = {ln.ifname for ln in _read_links(None)}
    bridge = next((n for n in CNI_BRIDGES if n in names), None)
    overlay = next((n for n in CNI_OVERLAYS if n in names), None)
    others = [n for n in (*CNI_BRIDGES, *CNI_OVERLAYS, *CNI_OTHERS) if n in names and n not in (bridge, overlay)]
    me = NodeDevices(name=node, uplink=ups[0] if ups else None, bridge=bridge, overlay=overlay,
                     others=tuple(others + ups[1:]))
    topo = Topology(source=f"node {node}", nodes=(me,), pods=tuple(places))
    return LocalNode(topo, namespaces, netns_by_ip, wanted)
