"""What the lab is made of: names, addresses, MACs, Services, kube-proxy rules, inventory.

Pure planning, no privileges and no side effects: `plan(LabConfig)` gives a `Topology`
that `tracer.lab.build` turns into namespaces and devices, and from which the status
document (`podtrace lab status -o json`) and the Kubernetes inventory (a `v1 List`) are
derived. Everything here is deterministic for a given config, so two runs of `lab up`
describe the same cluster.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import os
import platform
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tracer.errors import BadInput

DEFAULT_PREFIX = "ptlab"
DEFAULT_STATE_ROOT = "/run/podtrace"
CNIS = ("flannel", "cilium")
BUILT_CNIS = ("flannel", "cilium")

UNDERLAY_CIDR = "172.30.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
FABRIC_BRIDGE = "br0"
UPLINK = "eth0"
CNI_BRIDGE = "cni0"
OVERLAY = "flannel.1"
VXLAN_ID = 1
VXLAN_PORT = 8472
UNDERLAY_MTU = 1500
POD_MTU = 1450
APP_PORT = 8080
K8S_NAMESPACE = "default"
LAB_LABEL = "podtrace-lab"
MASQ_MARK = "0x4000/0x4000"

# The cilium flavour (see docs/runbooks/cilium-path.md). Real Cilium moves packets with BPF
# programs on lxc*, cilium_host and cilium_vxlan; the lab builds the same devices and
# addresses and lets the kernel's own routing, neighbour and VXLAN code do the moving.
CILIUM_HOST = "cilium_host"      # holds the node's router IP (scope link); the pods' gateway
CILIUM_NET = "cilium_net"        # cilium_host's veth peer, no IP
CILIUM_OVERLAY = "cilium_vxlan"
# Real Cilium runs cilium_vxlan in metadata (external) mode and puts the source pod's
# security identity in the VNI; the lab uses one fixed VNI, the first identity Cilium's
# allocator hands out (1-255 are reserved identities, e.g. 2 = world).
CILIUM_VNI = 256
# Traffic the node itself originates towards other nodes' pods follows Cilium's own routes
# (via cilium_host, src router IP): they live in this table, looked up for `iif lo` only.
# Forwarded pod traffic uses the main table, whose routes go straight to cilium_vxlan
# (what Cilium's BPF does with its tunnel map).
CILIUM_HOST_TABLE = 200
CILIUM_RULE_PREF = 100
# `podtrace lab break` scenarios that are about flannel's objects and do not apply to the
# cilium lab, with the reason given to the user.
CILIUM_UNSUPPORTED_SCENARIOS = {
    "br-netfilter-off": "the cilium lab has no bridge: pods hang off lxc devices and every "
                        "packet between them is routed, so bridge-nf-call-iptables changes nothing",
    "fdb-missing": f"it removes an FDB entry of {OVERLAY}; the cilium lab's overlay is "
                   f"{CILIUM_OVERLAY}",
    "neigh-wrong": f"it rewrites a neighbour entry on {OVERLAY}; the cilium lab's overlay is "
                   f"{CILIUM_OVERLAY}",
}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_PREFIX_MAX = 20
_UID_NS = uuid.UUID("6d1f3c52-2f0e-4a39-9a51-7c1d0f4f2b10")


def default_prefix() -> str:
    return os.environ.get("PODTRACE_LAB_PREFIX") or DEFAULT_PREFIX


def default_state_root() -> Path:
    return Path(os.environ.get("PODTRACE_STATE_DIR") or DEFAULT_STATE_ROOT)


@dataclass(frozen=True)
class LabConfig:
    """How to build the lab. `state_dir` is the root; this lab's files live in `lab_dir`."""

    prefix: str = field(default_factory=default_prefix)
    cni: str = "flannel"
    nodes: int = 2
    pods_per_node: int = 2
    state_dir: Path = field(default_factory=default_state_root)

    def __post_init__(self):
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        validate_prefix(self.prefix)
        if self.cni not in CNIS:
            raise BadInput(f"unknown CNI {self.cni!r}", f"use one of: {', '.join(CNIS)}")
        if self.cni not in BUILT_CNIS:
            raise BadInput(f"the {self.cni} lab is not built yet", "use --cni flannel")
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= 16:
            raise BadInput(f"--nodes must be between 1 and 16, not {self.nodes}")
        if not isinstance(self.pods_per_node, int) or not 1 <= self.pods_per_node <= 8:
            raise BadInput(f"--pods-per-node must be between 1 and 8, not {self.pods_per_node}")

    @property
    def lab_dir(self) -> Path:
        return self.state_dir / self.prefix


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or len(prefix) > _PREFIX_MAX:
        raise BadInput(
            f"bad lab prefix {prefix!r}",
            f"use lowercase letters, digits and inner dashes, at most {_PREFIX_MAX} characters",
        )
    return prefix


def namespace_pattern(prefix: str) -> re.Pattern:
    """Matches exactly the network namespaces a lab with this prefix creates, and no other
    lab's (prefix `pttest` does not match `pttest-x-fabric`)."""
    return re.compile(rf"^{re.escape(prefix)}-(fabric|node-[0-9]+|pod-[0-9]+-[0-9]+)$")


def fabric_netns(prefix: str) -> str:
    return f"{prefix}-fabric"


def node_netns(prefix: str, i: int) -> str:
    return f"{prefix}-node-{i}"


def pod_netns(prefix: str, i: int, j: int) -> str:
    return f"{prefix}-pod-{i}-{j}"


def host_veth_name(namespace: str, pod: str) -> str:
    """`veth` + 8 hex chars of sha1("ns/pod"): stable per pod, like real CNIs."""
    return "veth" + hashlib.sha1(f"{namespace}/{pod}".encode()).hexdigest()[:8]


def flannel_mac(i: int) -> str:
    return f"0e:00:00:00:00:{i:02x}"


def lxc_name(namespace: str, pod: str) -> str:
    """`lxc` + 12 hex chars of sha256: Cilium's Endpoint2IfName (15 characters, the most
    IFNAMSIZ allows), keyed by "ns/pod" here instead of the endpoint ID so it is stable."""
    return "lxc" + hashlib.sha256(f"{namespace}/{pod}".encode()).hexdigest()[:12]


def cilium_vtep_mac(i: int) -> str:
    return f"0e:c1:00:00:00:{i:02x}"


def _hash_mac(text: str) -> str:
    """A stable, locally administered unicast MAC."""
    digest = hashlib.sha256(text.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def scenario_unsupported(cni: str | None, scenario: str) -> str | None:
    """Why `podtrace lab break SCENARIO` does not apply to a lab of this CNI, or None."""
    if cni == "cilium":
        return CILIUM_UNSUPPORTED_SCENARIOS.get(scenario)
    return None


def _ip_mac(ip: str) -> str:
    """0a:58 + the IPv4 bytes: how the CNI bridge plugin derives stable MACs."""
    return "0a:58:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(service_port_name: str, protocol: str) -> str:
    """kube-proxy's servicePortChainName: KUBE-SVC- + base32(sha256(svcPortName + proto))[:16]."""
    return "KUBE-SVC-" + _hash16(service_port_name + protocol.lower())


def sep_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """kube-proxy's servicePortEndpointChainName (endpoint is "ip:port")."""
    return "KUBE-SEP-" + _hash16(service_port_name + protocol.lower() + endpoint)


def _uid(prefix: str, kind: str, name: str) -> str:
    return str(uuid.uuid5(_UID_NS, f"{prefix}/{kind}/{name}"))


@dataclass(frozen=True)
class NodePlan:
    index: int
    name: str
    netns: str
    ip: str
    uplink_mac: str
    fabric_port: str
    pod_cidr: str
    gateway: str
    bridge_mac: str
    overlay_ip: str
    mac: str
    router_ip: str | None = None      # cilium: the router IP on cilium_host


@dataclass(frozen=True)
class PodPlan:
    node_index: int
    index: int
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    mac: str
    gateway: str
    host_veth: str
    host_mac: str | None = None       # cilium: the lxc device's MAC (what ARP answers)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def labels(self) -> dict:
        return {"app": self.name, LAB_LABEL: "true"}


@dataclass(frozen=True)
class ServicePortPlan:
    name: str
    port: int
    target_port: int
    protocol: str
    chain: str
    endpoint_chains: tuple[tuple[str, str], ...]  # (pod key, KUBE-SEP-… chain), backend order


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    cluster_ip: str
    selector: dict
    ports: tuple[ServicePortPlan, ...]
    backends: tuple[PodPlan, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Topology:
    config: LabConfig
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    created_at: str

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @property
    def fabric_netns(self) -> str:
        return fabric_netns(self.prefix)

    @property
    def namespaces(self) -> list[str]:
        return [self.fabric_netns, *(n.netns for n in self.nodes), *(p.netns for p in self.pods)]

    @property
    def lab_dir(self) -> Path:
        return self.config.lab_dir

    @property
    def status_path(self) -> Path:
        return self.lab_dir / "lab.json"

    @property
    def inventory_path(self) -> Path:
        return self.lab_dir / "inventory.json"

    def pods_on(self, node_index: int) -> list[PodPlan]:
        return [p for p in self.pods if p.node_index == node_index]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(cfg: LabConfig, created_at: str | None = None) -> Topology:
    if cfg.cni == "cilium":
        nodes, pods = _cilium_plan(cfg)
        return _with_services(cfg, nodes, pods, created_at)
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        gateway = f"10.244.{i}.1"
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=f"172.30.0.{10 + i}", uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=f"10.244.{i}.0/24", gateway=gateway,
            bridge_mac=_ip_mac(gateway), overlay_ip=f"10.244.{i}.0", mac=flannel_mac(i),
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ip = f"10.244.{i}.{1 + j}"
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ip, mac=_ip_mac(ip), gateway=gateway,
                host_veth=host_veth_name(K8S_NAMESPACE, name),
            ))
    return _with_services(cfg, nodes, pods, created_at)


def _cilium_plan(cfg: LabConfig) -> tuple[list[NodePlan], list[PodPlan]]:
    """Same nodes, pod CIDRs and pod IPs as flannel; the router IP 10.244.N.1 sits on
    cilium_host and is every pod's gateway (and the peers' overlay next hop); pods hang off
    `lxc…` devices."""
    nodes = []
    pods = []
    for i in range(1, cfg.nodes + 1):
        router = f"10.244.{i}.1"
        nodes.append(NodePlan(
            index=i, name=f"node-{i}", netns=node_netns(cfg.prefix, i),
            ip=f"172.30.0.{10 + i}", uplink_mac=f"02:00:ac:1e:00:{10 + i:02x}",
            fabric_port=f"n{i}", pod_cidr=f"10.244.{i}.0/24", gateway=router,
            bridge_mac=_ip_mac(router), overlay_ip=router, mac=cilium_vtep_mac(i),
            router_ip=router,
        ))
        for j in range(1, cfg.pods_per_node + 1):
            name = f"pod-{i}-{j}"
            ip = f"10.244.{i}.{1 + j}"
            pods.append(PodPlan(
                node_index=i, index=j, name=name, namespace=K8S_NAMESPACE, node=f"node-{i}",
                netns=pod_netns(cfg.prefix, i, j), ip=ip, mac=_ip_mac(ip), gateway=router,
                host_veth=lxc_name(K8S_NAMESPACE, name),
                host_mac=_hash_mac(f"lxc/{K8S_NAMESPACE}/{name}"),
            ))
    return nodes, pods


def _with_services(cfg: LabConfig, nodes: list[NodePlan], pods: list[PodPlan],
                   created_at: str | None) -> Topology:
    last = [p for p in pods if p.node_index == cfg.nodes][-1]
    services = (
        _service("web", "10.96.0.10", {"app": last.name}, [last]),
        _service("echo", "10.96.0.20", {LAB_LABEL: "true"}, pods),
    )
    return Topology(cfg, tuple(nodes), tuple(pods), services, created_at or _now())


def _service(name: str, cluster_ip: str, selector: dict, backends: list[PodPlan]) -> ServicePlan:
    ports = []
    for port_name, proto in (("http", "TCP"), ("udp", "UDP")):
        spn = f"{K8S_NAMESPACE}/{name}:{port_name}"
        ports.append(ServicePortPlan(
            name=port_name, port=80, target_port=APP_PORT, protocol=proto,
            chain=svc_chain(spn, proto),
            endpoint_chains=tuple((b.key, sep_chain(spn, proto, f"{b.ip}:{APP_PORT}")) for b in backends),
        ))
    return ServicePlan(name, K8S_NAMESPACE, cluster_ip, dict(selector), tuple(ports), tuple(backends))


# ---------------------------------------------------------------------------------------
# kube-proxy (iptables mode) and flannel rules, one iptables-restore document per node.

def iptables_rules(topo: Topology) -> str:
    """The nat and filter rules kube-proxy and flannel would program on every node, for
    `iptables-restore --noflush` (every node gets the same Service rules)."""
    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    for svc in topo.services:
        for port in svc.ports:
            nat.append(f":{port.chain} - [0:0]")
            nat.extend(f":{sep} - [0:0]" for _, sep in port.endpoint_chains)
    nat += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE",
    ]
    by_key = {p.key: p for p in topo.pods}
    for svc in topo.services:
        for port in svc.ports:
            proto = port.protocol.lower()
            spn = f"{svc.key}:{port.name}"
            match = f"-d {svc.cluster_ip}/32 -p {proto} -m {proto} --dport {port.port}"
            nat.append(f'-A KUBE-SERVICES {match} -m comment --comment "{spn} cluster IP" '
                       f"-j {port.chain}")
            # Traffic to the VIP from outside the pod network must be masqueraded back.
            nat.append(f"-A {port.chain} ! -s {CLUSTER_CIDR} {match} "
                       f'-m comment --comment "{spn} cluster IP" -j KUBE-MARK-MASQ')
            n = len(port.endpoint_chains)
            for k, (key, sep) in enumerate(port.endpoint_chains):
                ip = by_key[key].ip
                stat = (f"-m statistic --mode random --probability {1.0 / (n - k):.11f} "
                        if k < n - 1 else "")
                nat.append(f'-A {port.chain} -m comment --comment "{spn} -> {ip}:{port.target_port}" '
                           f"{stat}-j {sep}")
            for key, sep in port.endpoint_chains:
                ip = by_key[key].ip
                # Hairpin: a pod reaching itself through the VIP must be masqueraded.
                nat.append(f'-A {sep} -s {ip}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
                nat.append(f'-A {sep} -p {proto} -m comment --comment "{spn}" -m {proto} '
                           f"-j DNAT --to-destination {ip}:{port.target_port}")
    nat.append("COMMIT")
    if topo.config.cni == "cilium":
        return "\n".join(nat + _cilium_filter()) + "\n"
    flt = [
        "*filter",
        f'-A FORWARD -s {CLUSTER_CIDR} -m comment --comment "flanneld forward" -j ACCEPT',
        f'-A FORWARD -d {CLUSTER_CIDR} -m comment --comment "flanneld forward" -j ACCEPT',
        "COMMIT",
    ]
    return "\n".join(nat + flt) + "\n"


def _cilium_filter() -> list[str]:
    """The filter rules Cilium (iptables mode, per-endpoint routes) installs for forwarded
    traffic: a CILIUM_FORWARD chain fed from FORWARD that accepts what enters or leaves
    cilium_host, cilium_net and the lxc devices. The rule texts are Cilium's own."""
    def accept(match: str, comment: str) -> str:
        return f'-A CILIUM_FORWARD {match} -m comment --comment "cilium: {comment}" -j ACCEPT'

    return [
        "*filter",
        ":CILIUM_FORWARD - [0:0]",
        '-A FORWARD -m comment --comment "cilium-feeder: CILIUM_FORWARD" -j CILIUM_FORWARD',
        accept(f"-o {CILIUM_HOST}", f"any->cluster on {CILIUM_HOST} forward accept"),
        accept(f"-i {CILIUM_HOST}", f"cluster->any on {CILIUM_HOST} forward accept (nodeport)"),
        accept("-i lxc+", "cluster->any on lxc+ forward accept"),
        accept(f"-i {CILIUM_NET}", f"cluster->any on {CILIUM_NET} forward accept (nodeport)"),
        # With per-endpoint routes, forwarded traffic to pods leaves by their lxc device.
        accept("-o lxc+", "any->cluster on lxc+ forward accept"),
        "COMMIT",
    ]


# ---------------------------------------------------------------------------------------
# The status document (`podtrace lab status -o json`).

def status_document(topo: Topology, pids: dict[str, int] | None = None) -> dict:
    """The contract's lab status document. `pids` maps "default/pod-i-j" to the responder's
    pid once the lab is built."""
    pids = pids or {}
    if topo.config.cni == "cilium":
        return _cilium_status_document(topo, pids)
    return {
        "prefix": topo.prefix,
        "cni": topo.config.cni,
        "created_at": topo.created_at,
        "state_dir": str(topo.lab_dir),
        "inventory": str(topo.inventory_path),
        "fabric_netns": topo.fabric_netns,
        "fabric_bridge": FABRIC_BRIDGE,
        "underlay_cidr": UNDERLAY_CIDR,
        "cluster_cidr": CLUSTER_CIDR,
        "service_cidr": SERVICE_CIDR,
        "vxlan": {"vni": VXLAN_ID, "port": VXLAN_PORT},
        "nodes": [
            {
                "name": n.name, "index": n.index, "netns": n.netns, "ip": n.ip,
                "pod_cidr": n.pod_cidr, "uplink": UPLINK, "overlay": OVERLAY,
                "bridge": CNI_BRIDGE, "mac": n.mac, "overlay_ip": n.overlay_ip,
                "gateway": n.gateway, "uplink_mac": n.uplink_mac, "bridge_mac": n.bridge_mac,
                "fabric_port": n.fabric_port,
            }
            for n in topo.nodes
        ],
        "pods": [
            {
                "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                "netns": p.netns, "host_veth": p.host_veth, "tcp_port": APP_PORT,
                "udp_port": APP_PORT, "mac": p.mac, "interface": "eth0", "gateway": p.gateway,
                "labels": p.labels, "responder_pid": pids.get(p.key),
            }
            for p in topo.pods
        ],
        "services": _status_services(topo),
    }


def _cilium_status_document(topo: Topology, pids: dict[str, int]) -> dict:
    """The same document for the cilium flavour. Per node, `bridge` is cilium_host: the
    device a pod's gateway (router) IP lives on, the one hop device a tracer attaches to
    besides the lxc devices, the overlay and the uplink (there is no bridge). `overlay_ip`
    is the router IP (the next hop the peers' overlay routes name) and `mac` the
    cilium_vxlan MAC (the VTEP MAC those next hops resolve to)."""
    return {
        "prefix": topo.prefix,
        "cni": "cilium",
        "created_at": topo.created_at,
        "state_dir": str(topo.lab_dir),
        "inventory": str(topo.inventory_path),
        "fabric_netns": topo.fabric_netns,
        "fabric_bridge": FABRIC_BRIDGE,
        "underlay_cidr": UNDERLAY_CIDR,
        "cluster_cidr": CLUSTER_CIDR,
        "service_cidr": SERVICE_CIDR,
        "vxlan": {"vni": CILIUM_VNI, "port": VXLAN_PORT},
        "host_routes": {"table": CILIUM_HOST_TABLE, "rule_pref": CILIUM_RULE_PREF},
        "nodes": [
            {
                "name": n.name, "index": n.index, "netns": n.netns, "ip": n.ip,
                "pod_cidr": n.pod_cidr, "uplink": UPLINK, "overlay": CILIUM_OVERLAY,
                "bridge": CILIUM_HOST, "cilium_host": CILIUM_HOST, "cilium_net": CILIUM_NET,
                "router_ip": n.router_ip, "mac": n.mac, "overlay_ip": n.overlay_ip,
                "gateway": n.gateway, "uplink_mac": n.uplink_mac, "bridge_mac": n.bridge_mac,
                "fabric_port": n.fabric_port,
            }
            for n in topo.nodes
        ],
        "pods": [
            {
                "namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip,
                "netns": p.netns, "host_veth": p.host_veth, "host_mac": p.host_mac,
                "tcp_port": APP_PORT, "udp_port": APP_PORT, "mac": p.mac, "interface": "eth0",
                "gateway": p.gateway, "labels": p.labels, "responder_pid": pids.get(p.key),
            }
            for p in topo.pods
        ],
        "services": _status_services(topo),
    }


def _status_services(topo: Topology) -> list[dict]:
    return [
        {
            "namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
            "ports": [
                {"name": port.name, "port": port.port, "target_port": port.target_port,
                 "protocol": port.protocol, "chain": port.chain,
                 "endpoint_chains": dict(port.endpoint_chains)}
                for port in s.ports
            ],
            "selector": dict(s.selector),
            "backends": [b.key for b in s.backends],
            "backend_ips": [b.ip for b in s.backends],
        }
        for s in topo.services
    ]


# ---------------------------------------------------------------------------------------
# The inventory: what `kubectl get nodes,pods,services,endpointslices -A -o json` would print.

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x"}
_K8S_VERSION = "v1.30.0"
_IMAGE = "podtrace.local/lab-responder:latest"


def inventory(topo: Topology) -> dict:
    items = [_node_obj(topo, n) for n in topo.nodes]
    items += [_pod_obj(topo, p) for p in topo.pods]
    items += [_service_obj(topo, s) for s in topo.services]
    items += [_slice_obj(topo, s) for s in topo.services]
    return {"apiVersion": "v1", "kind": "List", "items": items,
            "metadata": {"resourceVersion": ""}}


def _meta(topo: Topology, kind: str, name: str, namespace: str | None = None,
          labels: dict | None = None, **extra) -> dict:
    meta = {"name": name, "uid": _uid(topo.prefix, kind, f"{namespace or ''}/{name}"),
            "resourceVersion": "1", "creationTimestamp": topo.created_at}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    meta.update(extra)
    return meta


def _node_obj(topo: Topology, n: NodePlan) -> dict:
    arch = _ARCH.get(platform.machine(), platform.machine() or "amd64")
    labels = {
        "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch, "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": arch, LAB_LABEL: "true",
    }
    if topo.config.cni == "cilium":
        # What cilium-agent writes on its node (annotate-k8s-node).
        annotations = {
            "network.cilium.io/ipv4-cilium-host": n.router_ip,
            "network.cilium.io/ipv4-pod-cidr": n.pod_cidr,
            "podtrace.io/netns": n.netns,
        }
    else:
        annotations = {
            "flannel.alpha.coreos.com/backend-data": f'{{"VNI":{VXLAN_ID},"VtepMAC":"{n.mac}"}}',
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": n.ip,
            "podtrace.io/netns": n.netns,
        }
    machine = uuid.uuid5(_UID_NS, f"{topo.prefix}/machine/{n.name}").hex
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": _meta(topo, "Node", n.name, labels=labels, annotations=annotations),
        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": n.ip},
                          {"type": "Hostname", "address": n.name}],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": topo.created_at, "lastTransitionTime": topo.created_at,
            }],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": arch, "bootID": machine, "machineID": machine,
                "systemUUID": str(uuid.UUID(machine)),
                "containerRuntimeVersion": "podtrace-lab://0.1.0",
                "kernelVersion": platform.release(), "kubeProxyVersion": _K8S_VERSION,
                "kubeletVersion": _K8S_VERSION, "operatingSystem": "linux",
                "osImage": "podtrace lab (Linux network namespaces)",
            },
        },
    }


def _container_ports() -> list[dict]:
    return [{"name": "http", "containerPort": APP_PORT, "protocol": "TCP"},
            {"name": "udp", "containerPort": APP_PORT, "protocol": "UDP"}]


def _pod_obj(topo: Topology, p: PodPlan) -> dict:
    node = topo.nodes[p.node_index - 1]
    t = topo.created_at
    cond = [{"type": c, "status": "True", "lastProbeTime": None, "lastTransitionTime": t}
            for c in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
    # Each lab pod is the one replica of a Deployment of its own name, as `kubectl create
    # deployment` would make it: owned by ReplicaSet NAME-HASH, labelled pod-template-hash.
    template_hash = hashlib.sha256(f"{p.namespace}/{p.name}".encode()).hexdigest()[:10]
    rs = f"{p.name}-{template_hash}"
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
             "uid": _uid(topo.prefix, "ReplicaSet", f"{p.namespace}/{rs}"),
             "controller": True, "blockOwnerDeletion": True}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta(topo, "Pod", p.name, p.namespace, {**p.labels, "pod-template-hash": template_hash},
                          annotations={"podtrace.io/netns": p.netns,
                                       "podtrace.io/host-veth": p.host_veth},
                          ownerReferences=[owner]),
        "spec": {
            "nodeName": p.node,
            "containers": [{
                "name": "responder", "image": _IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-m", "tracer.lab.responder"],
                "args": ["--name", p.name, "--port", str(APP_PORT)],
                "ports": _container_ports(),
            }],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
            "hostIP": node.ip, "hostIPs": [{"ip": node.ip}], "startTime": t,
            "qosClass": "BestEffort", "conditions": cond,
            "containerStatuses": [{
                "name": "responder", "ready": True, "started": True, "restartCount": 0,
                "image": _IMAGE, "imageID": _IMAGE,
                "containerID": "podtrace-lab://" + hashlib.sha256(p.netns.encode()).hexdigest(),
                "state": {"running": {"startedAt": t}},
            }],
        },
    }


def _service_obj(topo: Topology, s: ServicePlan) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(topo, "Service", s.name, s.namespace, {LAB_LABEL: "true"}),
        "spec": {
            "type": "ClusterIP", "clusterIP": s.cluster_ip, "clusterIPs": [s.cluster_ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port,
                       "protocol": p.protocol} for p in s.ports],
            "selector": dict(s.selector),
        },
        "status": {"loadBalancer": {}},
    }


def _slice_obj(topo: Topology, s: ServicePlan) -> dict:
    suffix = hashlib.sha1(f"{topo.prefix}/{s.key}".encode()).hexdigest()[:5]
    svc_uid = _uid(topo.prefix, "Service", f"{s.namespace}/{s.name}")
    meta = _meta(
        topo, "EndpointSlice", f"{s.name}-{suffix}", s.namespace,
        {"kubernetes.io/service-name": s.name,
         "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
         LAB_LABEL: "true"},
        generateName=f"{s.name}-",
        ownerReferences=[{"apiVersion": "v1", "kind": "Service", "name": s.name, "uid": svc_uid,
                          "controller": True, "blockOwnerDeletion": True}],
    )
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [b.ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": b.node,
                "targetRef": {"kind": "Pod", "namespace": b.namespace, "name": b.name,
                              "uid": _uid(topo.prefix, "Pod", f"{b.namespace}/{b.name}")},
            }
            for b in s.backends
        ],
        "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol}
                  for p in s.ports],
    }
