"""The lab's common model: configuration, names, addresses, plan records.

Pure data, no privileges and no side effects. Everything here is deterministic for a given
config, so two runs of `lab up` describe the same cluster. What differs between CNI
flavours lives in `tracer.lab.flannel`, `tracer.lab.cilium` and `tracer.lab.calico`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tracer import settings
from tracer.errors import BadInput

DEFAULT_PREFIX = settings.DEFAULT_LAB_PREFIX
DEFAULT_STATE_ROOT = settings.DEFAULT_STATE_DIR
CNIS = ("flannel", "cilium", "calico")
BUILT_CNIS = ("flannel", "cilium", "calico")
DATAPATHS = ("legacy", "ebpf")   # the cilium lab's: Linux routing, or tc programs (cilium_ebpf.py)
# How a calico lab carries pod traffic between nodes: IP-in-IP (Calico's default), VXLAN,
# or routed on the underlay (what BGP peering gives).
CALICO_MODES = ("ipip", "vxlan", "routed")

UNDERLAY_CIDR = "172.30.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
# IPv6 (ipv6 and dual labs): node N's pods in fd00:10:244:N::/64, Services in fd00:10:96::/112,
# the underlay of an ipv6 lab in fd00:172:30::/64.
UNDERLAY_CIDR6 = "fd00:172:30::/64"
CLUSTER_CIDR6 = "fd00:10:244::/56"
SERVICE_CIDR6 = "fd00:10:96::/112"
IP_FAMILIES = ("ipv4", "ipv6", "dual")
# How kube-proxy programs Services: iptables (KUBE-SERVICES chains), nftables (the
# `kube-proxy` table) or ipvs (virtual servers on kube-ipvs0).
PROXY_MODES = ("iptables", "nftables", "ipvs")
FABRIC_BRIDGE = "br0"
UPLINK = "eth0"
VXLAN_PORT = 8472
UNDERLAY_MTU = 1500
POD_MTU = 1450
# VXLAN over an IPv6 underlay costs 70 bytes, not 50 (flannel sets its MTU the same way).
POD_MTU6 = UNDERLAY_MTU - 70
APP_PORT = 8080
K8S_NAMESPACE = "default"
LAB_LABEL = "podtrace-lab"
MASQ_MARK = "0x4000/0x4000"

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_PREFIX_MAX = 20
UID_NS = uuid.UUID("6d1f3c52-2f0e-4a39-9a51-7c1d0f4f2b10")


def default_prefix() -> str:
    return settings.lab_prefix()


def prefix_flag(prefix: str | None) -> str:
    """` --prefix NAME` for a command printed as a hint, when the lab is not the default one."""
    return "" if not prefix or prefix == DEFAULT_PREFIX else f" --prefix {prefix}"


def default_state_root() -> Path:
    return settings.state_dir()


@dataclass(frozen=True)
class LabConfig:
    """How to build the lab. `state_dir` is the root; this lab's files live in `lab_dir`."""

    prefix: str = field(default_factory=default_prefix)
    cni: str = "flannel"
    nodes: int = 2
    pods_per_node: int = 2
    state_dir: Path = field(default_factory=default_state_root)
    ip_family: str = "ipv4"
    proxy: str = "iptables"
    datapath: str = "legacy"         # cilium: "legacy" (Linux routing) or "ebpf" (tc programs)
    calico_mode: str = "ipip"         # calico labs only: see CALICO_MODES

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
        if self.ip_family not in IP_FAMILIES:
            raise BadInput(f"unknown IP family {self.ip_family!r}", f"use one of: {', '.join(IP_FAMILIES)}")
        if self.proxy not in PROXY_MODES:
            raise BadInput(f"unknown kube-proxy mode {self.proxy!r}", f"use one of: {', '.join(PROXY_MODES)}")
        if self.datapath not in DATAPATHS:
            raise BadInput(f"unknown datapath {self.datapath!r}", f"use one of: {', '.join(DATAPATHS)}")
        if self.datapath == "ebpf" and self.cni != "cilium":
            raise BadInput(f"--datapath ebpf is Cilium's datapath, not {self.cni}'s", "use --cni cilium --datapath ebpf")
        if self.datapath == "ebpf" and self.ip_family != "ipv4":
            raise BadInput("the lab's eBPF datapath forwards IPv4 only", "use --ip-family ipv4 with --datapath ebpf")
        if self.datapath == "ebpf" and self.proxy != "iptables":
            raise BadInput(f"--proxy {self.proxy} does not apply to the eBPF datapath: its BPF programs "
                           "translate Services in place of kube-proxy", "leave out --proxy with --datapath ebpf")
        if self.calico_mode not in CALICO_MODES:
            raise BadInput(f"unknown Calico mode {self.calico_mode!r}", f"use one of: {', '.join(CALICO_MODES)}")
        if self.cni == "calico" and self.ip_family != "ipv4":
            raise BadInput(f"the calico lab is IPv4 only, not {self.ip_family}",
                           "use --ip-family ipv4 with --cni calico, or --cni flannel|cilium")

    @property
    def families(self) -> tuple[int, ...]:
        """The address families of pods and Services, the first one first (4, 6)."""
        return families(self.ip_family)

    @property
    def underlay_family(self) -> int:
        """The family of the nodes' underlay addresses (6 only in an ipv6 lab)."""
        return 6 if self.ip_family == "ipv6" else 4

    @property
    def lab_dir(self) -> Path:
        return self.state_dir / self.prefix


def families(ip_family: str | None) -> tuple[int, ...]:
    """ipv4 → (4,), ipv6 → (6,), dual → (4, 6) (IPv4 first, as an IPv4-primary cluster)."""
    return {"ipv6": (6,), "dual": (4, 6)}.get(ip_family or "ipv4", (4,))


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or len(prefix) > _PREFIX_MAX:
        raise BadInput(
            f"bad lab prefix {prefix!r}",
            f"use lowercase letters, digits and inner dashes, at most {_PREFIX_MAX} characters",
        )
    return prefix


def lab_dir(prefix: str | None, state_dir: Path | str | None) -> Path:
    """Where the files of the lab with this prefix live (the default prefix and state root
    when not given)."""
    prefix = validate_prefix(prefix or default_prefix())
    return (Path(state_dir) if state_dir else default_state_root()) / prefix


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


def hash_mac(text: str) -> str:
    """A stable, locally administered unicast MAC."""
    digest = hashlib.sha256(text.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def ip_mac(ip: str) -> str:
    """0a:58 + the IPv4 bytes: how the CNI bridge plugin derives stable MACs. For an IPv6
    lab address (fd00:10:244:N::x) 0a:58 + the two bytes of N and the last two: unique in
    the lab, like the IPv4 form."""
    if ":" in ip:
        b = ipaddress.IPv6Address(ip).packed
        return "0a:58:" + ":".join(f"{x:02x}" for x in (b[6], b[7], b[14], b[15]))
    return "0a:58:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


# Addresses of each family, by node index i (1, 2, …) and pod index j (1, 2, …).
def pod_mtu(underlay_family: int) -> int:
    """The MTU of pods, overlay and bridge over an underlay of this family."""
    return POD_MTU if underlay_family == 4 else POD_MTU6


def node_ip(family: int, i: int) -> str:
    return f"172.30.0.{10 + i}" if family == 4 else f"fd00:172:30::{i:x}"


def pod_cidr(family: int, i: int) -> str:
    return f"10.244.{i}.0/24" if family == 4 else f"fd00:10:244:{i:x}::/64"


def pod_gateway(family: int, i: int) -> str:
    """The pods' gateway (flannel: on cni0; cilium: the router IP on cilium_host)."""
    return f"10.244.{i}.1" if family == 4 else f"fd00:10:244:{i:x}::1"


def subnet_zero(family: int, i: int) -> str:
    """The pod CIDR's network address: what flannel puts on its VXLAN device."""
    return f"10.244.{i}.0" if family == 4 else f"fd00:10:244:{i:x}::"


def pod_ip(family: int, i: int, j: int) -> str:
    return f"10.244.{i}.{1 + j}" if family == 4 else f"fd00:10:244:{i:x}::{1 + j:x}"


def service_ip(family: int, v4: str) -> str:
    """A Service's ClusterIP of this family, from its IPv4 one: 10.96.0.10 ↔ fd00:10:96::10."""
    return v4 if family == 4 else "fd00:10:96::" + v4.rsplit(".", 1)[1]


def plen(family: int) -> int:
    return 32 if family == 4 else 128


def subnet_len(family: int) -> int:
    """Prefix length of a pod CIDR and of the underlay."""
    return 24 if family == 4 else 64


def cluster_cidr(family: int) -> str:
    return CLUSTER_CIDR if family == 4 else CLUSTER_CIDR6


def service_cidr(family: int) -> str:
    return SERVICE_CIDR if family == 4 else SERVICE_CIDR6


def underlay_cidr(family: int) -> str:
    return UNDERLAY_CIDR if family == 4 else UNDERLAY_CIDR6


def nodad(family: int) -> str:
    """` nodad` for an IPv6 `ip addr add`: usable at once, no duplicate address detection."""
    return " nodad" if family == 6 else ""


def addr_family(addr: str) -> int:
    return 6 if ":" in addr else 4


def hash16(text: str) -> str:
    """kube-proxy's chain-name hash: base32(sha256(text))[:16]."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def uid(prefix: str, kind: str, name: str) -> str:
    """A stable Kubernetes object UID for this lab."""
    return str(uuid.uuid5(UID_NS, f"{prefix}/{kind}/{name}"))


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
    # Every family's value, the first family's first (that one is also in the field above).
    pod_cidrs: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    overlay_ips: tuple[str, ...] = ()
    router_ips: tuple[str, ...] = ()
    mtu: int = POD_MTU                # of the overlay, the bridge and the pods' links
    overlay: str | None = None        # calico: the tunnel device of its mode (None: routed)


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
    ips: tuple[str, ...] = ()         # every family's address, `ip` first
    gateways: tuple[str, ...] = ()    # every family's gateway, `gateway` first
    mtu: int = POD_MTU

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
    # The same per family: ((4, endpoint chains), (6, endpoint chains)) as the lab has them;
    # kube-proxy names the KUBE-SVC chain alike in iptables and ip6tables.
    family_chains: tuple[tuple[int, tuple[tuple[str, str], ...]], ...] = ()


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    cluster_ip: str
    selector: dict
    ports: tuple[ServicePortPlan, ...]
    backends: tuple[PodPlan, ...]
    cluster_ips: tuple[str, ...] = ()    # every family's ClusterIP, `cluster_ip` first

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPlan:
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

    @property
    def families(self) -> tuple[int, ...]:
        return self.config.families

    def pods_on(self, node_index: int) -> list[PodPlan]:
        return [p for p in self.pods if p.node_index == node_index]
