"""Kubernetes metadata as an inventory of pods, Services and nodes (from a `v1 List` file).

`tracer.cluster.endpoints.resolve()` turns the user's SRC/DST specs into `Endpoint`s of it."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tracer.errors import BadInput


@dataclass
class Pod:
    namespace: str
    name: str
    node: str | None
    ip: str | None
    netns: str | None = None        # lab only: the named network namespace of the pod
    host_veth: str | None = None
    uid: str | None = None
    owner_kind: str | None = None     # the controller in ownerReferences (ReplicaSet, Job, …)
    owner_name: str | None = None
    workload_kind: str | None = None  # what a person calls it (Deployment, CronJob, …)
    workload_name: str | None = None
    host_network: bool = False
    ips: list[str] = field(default_factory=list)   # status.podIPs (ip is the first); empty: [ip]

    def __post_init__(self):
        self.ips = _ordered(self.ip, self.ips)
        self.ip = self.ips[0] if self.ips else self.ip

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def addresses(self) -> list[str]:
        """Every address of the pod, in the API's order (the first is `ip`)."""
        return _ordered(self.ip, self.ips)

    @property
    def workload(self) -> str | None:
        """"Deployment/web", "StatefulSet/db", "DaemonSet/…", "CronJob/…"; None for bare pods."""
        return f"{self.workload_kind}/{self.workload_name}" if self.workload_kind else None


@dataclass
class Service:
    namespace: str
    name: str
    cluster_ip: str | None
    ports: list[dict] = field(default_factory=list)     # {port, target_port, protocol, name}
    backends: list[str] = field(default_factory=list)   # "ns/pod"
    backend_ips: list[str] = field(default_factory=list)
    selector: dict = field(default_factory=dict)
    cluster_ips: list[str] = field(default_factory=list)   # spec.clusterIPs (cluster_ip is the first)

    def __post_init__(self):
        self.cluster_ips = _ordered(self.cluster_ip, self.cluster_ips)
        self.cluster_ip = self.cluster_ips[0] if self.cluster_ips else self.cluster_ip

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def addresses(self) -> list[str]:
        """Every cluster IP of the Service, in the API's order (the first is `cluster_ip`)."""
        return _ordered(self.cluster_ip, self.cluster_ips)


def _ordered(first: str | None, more) -> list[str]:
    """The addresses of an object, its primary first, each once, as podtrace prints them
    (IPv6 compressed); unparsable entries are dropped. A list that does not hold the primary
    is stale (podIP changed, podIPs not yet): the primary alone."""
    out: list[str] = []
    more = [a for a in more or [] if a]
    if first and more and _norm(first) not in {_norm(a) for a in more}:
        more = []
    for a in ([first] if first else []) + more:
        if not a:
            continue
        try:
            a = str(ipaddress.ip_address(a))
        except ValueError:
            continue
        if a not in out:
            out.append(a)
    return out


def _norm(a: str) -> str:
    try:
        return str(ipaddress.ip_address(a))
    except ValueError:
        return a


def families(addrs) -> list[int]:
    """The address families (4, 6) of some addresses, in their order."""
    out: list[int] = []
    for a in addrs:
        try:
            v = ipaddress.ip_address(a).version
        except ValueError:
            continue
        if v not in out:
            out.append(v)
    return out


def of_family(addrs, family: int | None) -> list[str]:
    """The addresses of one family (None: all)."""
    if family is None:
        return list(addrs)
    out = []
    for a in addrs:
        try:
            if ipaddress.ip_address(a).version == family:
                out.append(a)
        except ValueError:
            continue
    return out


@dataclass
class Slice:
    """The part of an EndpointSlice a trace needs: which Service, which ready backends."""

    namespace: str
    name: str
    service: str | None               # "ns/name" of the Service it belongs to
    backends: list[str] = field(default_factory=list)
    backend_ips: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Node:
    name: str
    ip: str | None
    pod_cidr: str | None = None
    netns: str | None = None
    pod_cidrs: list[str] = field(default_factory=list)   # spec.podCIDRs (pod_cidr is the first)
    addresses: list[str] = field(default_factory=list)   # every status address (InternalIP, ExternalIP)
    ips: list[str] = field(default_factory=list)         # the InternalIPs (ip is the first)
    # the node's own addresses on its CNI's devices, from the CNI's node annotations: Cilium's
    # router IP (cilium_host), Calico's IPIP / VXLAN tunnel address. The node's own traffic to
    # pods of other nodes leaves with one of them as its source.
    cni_ips: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.ips = _ordered(self.ip, self.ips)
        self.ip = self.ips[0] if self.ips else self.ip

    def internal_ips(self) -> list[str]:
        """The node's InternalIPs, one per family on a dual-stack node (the first is `ip`)."""
        return _ordered(self.ip, self.ips)

    def own_ips(self) -> list[str]:
        """Every address that names this node: its InternalIPs, then its CNI addresses."""
        return list(dict.fromkeys([*self.internal_ips(), *self.cni_ips]))

    def cidrs(self) -> list[str]:
        """The node's pod CIDRs: spec.podCIDRs, else spec.podCIDR."""
        return list(dict.fromkeys([*self.pod_cidrs, *([self.pod_cidr] if self.pod_cidr else [])]))


@dataclass
class Inventory:
    pods: dict[str, Pod] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    source: str = "none"
    slices: dict[str, Slice] = field(default_factory=dict)
    # Address indexes, kept by the mutators below (upsert_*/remove_*/apply). Code that fills
    # the dicts directly is still served right: a stale index is rebuilt on first use.
    _ip_index: dict = field(default_factory=dict, repr=False, compare=False)
    _indexed: tuple | None = field(default=None, repr=False, compare=False)
    _slices_by_svc: dict = field(default_factory=dict, repr=False, compare=False)

    def by_ip(self) -> dict[str, tuple[str, str]]:
        """ip → (kind, key) for pods, Service VIPs and nodes."""
        out: dict[str, tuple[str, str]] = {}
        for n in self.nodes.values():
            for a in n.own_ips():
                out[a] = ("node", n.name)
        for s in self.services.values():
            for a in s.addresses():
                out[a] = ("service", s.key)
        for p in self.pods.values():
            for a in p.addresses():
                out[a] = ("pod", p.key)
        return out

    def cidr_owner(self, ip: str | None) -> Node | None:
        """The node an address belongs to: the node whose pod CIDR holds it (the narrowest
        wins), else the node that has it as an address; None when no node claims it."""
        return cidr_owner(self, ip)

    # -- indexed lookups -------------------------------------------------------------------

    def _sizes(self) -> tuple:
        return (len(self.pods), len(self.services), len(self.nodes))

    def reindex(self) -> None:
        """Rebuild the address index from the dicts (O(n)); the mutators keep it current."""
        idx: dict[str, dict[str, list[str]]] = {"pod": {}, "service": {}, "node": {}}
        for n in self.nodes.values():
            for a in n.own_ips():
                idx["node"].setdefault(a, []).append(n.name)
        for sv in self.services.values():
            for a in sv.addresses():
                idx["service"].setdefault(a, []).append(sv.key)
        for p in self.pods.values():
            for a in p.addresses():
                idx["pod"].setdefault(a, []).append(p.key)
        self._ip_index = idx
        self._indexed = self._sizes()

    def _fresh(self) -> bool:
        """Whether the mutators may keep the index incrementally (it matches the dicts)."""
        if self._indexed is None and not (self.pods or self.services or self.nodes):
            self._ip_index = {"pod": {}, "service": {}, "node": {}}
            self._indexed = (0, 0, 0)
        return self._indexed == self._sizes()

    def _index(self) -> dict:
        if self._indexed != self._sizes():
            self.reindex()
        return self._ip_index

    def _index_add(self, kind: str, ips, key: str) -> None:
        for ip in _as_list(ips):
            if ip and self._indexed is not None:
                keys = self._ip_index[kind].setdefault(ip, [])
                if key in keys:
                    keys.remove(key)
                keys.append(key)

    def _index_drop(self, kind: str, ips, key: str) -> None:
        for ip in _as_list(ips):
            if ip and self._indexed is not None:
                keys = self._ip_index[kind].get(ip)
                if keys and key in keys:
                    keys.remove(key)
                    if not keys:
                        del self._ip_index[kind][ip]

    def lookup_ip(self, ip: str) -> tuple[str | None, str | None]:
        """(kind, key) of an address, as `by_ip()` would say, in O(1): pods first, then
        Service VIPs, then nodes."""
        idx = self._index()
        for kind, table in (("pod", self.pods), ("service", self.services), ("node", self.nodes)):
            keys = idx[kind].get(ip)
            if not keys:
                continue
            obj = table.get(keys[-1])
            have = [] if obj is None else (obj.own_ips() if kind == "node" else obj.addresses())
            if ip not in have:      # the dicts were changed behind the index's back
                self.reindex()
                return self.by_ip().get(ip, (None, None))
            return kind, keys[-1]
        return None, None

    def describe_ip(self, ip: str | None) -> dict | None:
        """What an address seen at a hop is: {"kind", "key", "node", "workload"}; None when
        the inventory does not know it. For enriching hops."""
        if not ip:
            return None
        kind, key = self.lookup_ip(ip)
        if kind is None:
            return None
        out = {"kind": kind, "key": key, "node": None, "workload": None}
        if kind == "pod":
            pod = self.pods[key]
            out["node"], out["workload"] = pod.node, pod.workload
        elif kind == "node":
            out["node"] = key
        return out

    # -- mutators (used by the live cluster watch; they keep the indexes right) -----------

    def upsert_pod(self, pod: Pod) -> None:
        old = self.pods.get(pod.key)
        fresh = self._fresh()
        if old is not None:
            self._index_drop("pod", old.addresses(), old.key)
            # Lab/agent facts are not in the API object: keep them across updates.
            pod.netns = pod.netns or old.netns
            pod.host_veth = pod.host_veth or old.host_veth
        self.pods[pod.key] = pod
        self._index_add("pod", pod.addresses(), pod.key)
        if fresh:
            self._indexed = self._sizes()

    def remove_pod(self, key: str) -> Pod | None:
        fresh = self._fresh()
        old = self.pods.pop(key, None)
        if old is not None:
            self._index_drop("pod", old.addresses(), key)
            if fresh:
                self._indexed = self._sizes()
        return old

    def upsert_node(self, node: Node) -> None:
        old = self.nodes.get(node.name)
        fresh = self._fresh()
        if old is not None:
            self._index_drop("node", old.own_ips(), old.name)
            node.netns = node.netns or old.netns
        self.nodes[node.name] = node
        self._index_add("node", node.own_ips(), node.name)
        if fresh:
            self._indexed = self._sizes()

    def remove_node(self, name: str) -> Node | None:
        fresh = self._fresh()
        old = self.nodes.pop(name, None)
        if old is not None:
            self._index_drop("node", old.own_ips(), name)
            if fresh:
                self._indexed = self._sizes()
        return old

    def upsert_service(self, svc: Service) -> None:
        old = self.services.get(svc.key)
        fresh = self._fresh()
        if old is not None:
            self._index_drop("service", old.addresses(), old.key)
        self.services[svc.key] = svc
        self._index_add("service", svc.addresses(), svc.key)
        if fresh:
            self._indexed = self._sizes()
        self._recompute_backends(svc.key)

    def remove_service(self, key: str) -> Service | None:
        fresh = self._fresh()
        old = self.services.pop(key, None)
        if old is not None:
            self._index_drop("service", old.addresses(), key)
            if fresh:
                self._indexed = self._sizes()
        return old

    def upsert_slice(self, sl: Slice) -> None:
        old = self.slices.get(sl.key)
        if old is not None and old.service != sl.service:
            self._slice_unlink(old)
        self.slices[sl.key] = sl
        if sl.service:
            keys = self._slices_by_svc.setdefault(sl.service, [])
            if sl.key not in keys:
                keys.append(sl.key)
            self._recompute_backends(sl.service)

    def remove_slice(self, key: str) -> Slice | None:
        old = self.slices.pop(key, None)
        if old is not None:
            self._slice_unlink(old)
        return old

    def _slice_unlink(self, sl: Slice) -> None:
        keys = self._slices_by_svc.get(sl.service or "")
        if keys and sl.key in keys:
            keys.remove(sl.key)
        if sl.service:
            self._recompute_backends(sl.service)

    def _recompute_backends(self, svc_key: str) -> None:
        svc = self.services.get(svc_key)
        if svc is None:
            return
        backends: list[str] = []
        ips: list[str] = []
        for sk in self._slices_by_svc.get(svc_key, []):
            sl = self.slices.get(sk)
            if sl is None:
                continue
            backends += [b for b in sl.backends if b not in backends]
            ips += [a for a in sl.backend_ips if a not in ips]
        svc.backends, svc.backend_ips = backends, ips

    def apply(self, event: str, obj: dict) -> str | None:
        """One watch event ("ADDED", "MODIFIED", "DELETED") of a Pod, Node, Service or
        EndpointSlice object (a dict as the API serves it). Returns the key it touched."""
        kind = obj.get("kind")
        md = obj.get("metadata") or {}
        ns = md.get("namespace", "default")
        name = md.get("name")
        if not name:
            return None
        if kind == "Pod":
            if event == "DELETED":
                self.remove_pod(f"{ns}/{name}")
            else:
                self.upsert_pod(pod_from_obj(obj))
            return f"{ns}/{name}"
        if kind == "Node":
            if event == "DELETED":
                self.remove_node(name)
            else:
                self.upsert_node(node_from_obj(obj))
            return name
        if kind == "Service":
            if event == "DELETED":
                self.remove_service(f"{ns}/{name}")
            else:
                self.upsert_service(service_from_obj(obj))
            return f"{ns}/{name}"
        if kind == "EndpointSlice":
            if event == "DELETED":
                self.remove_slice(f"{ns}/{name}")
            else:
                self.upsert_slice(slice_from_obj(obj))
            return f"{ns}/{name}"
        return None


def _as_list(ips) -> list:
    return list(ips) if isinstance(ips, (list, tuple)) else [ips]


def narrowest(ip: str | None, cidrs):
    """Of (CIDR, owner) pairs, the owner of the narrowest CIDR holding `ip` (None: none does,
    or `ip` is no address)."""
    try:
        addr = ipaddress.ip_address(ip) if ip else None
    except ValueError:
        return None
    best = None
    for c, owner in cidrs:
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError:
            continue
        if addr is not None and addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, owner)
    return best[1] if best else None


def cidr_owner(inv: Inventory, ip: str | None) -> Node | None:
    """The node that owns an address: pod CIDRs (the narrowest match), then node addresses."""
    owner = narrowest(ip, ((c, n) for n in inv.nodes.values() for c in n.cidrs()))
    if owner is not None:
        return owner
    return next((n for n in inv.nodes.values() if ip and (ip == n.ip or ip in n.addresses)), None)


@dataclass
class Endpoint:
    spec: str
    ip: str
    pod: Pod | None = None
    service: Service | None = None
    node: Node | None = None
    owner: Node | None = None       # a bare IP's node: whose pod CIDR (or address) it is
    literal: bool = False           # the user typed the address (its family is fixed)

    def as_json(self) -> dict:
        return {
            "spec": self.spec,
            "ip": self.ip,
            "pod": self.pod.key if self.pod else None,
            "node": (self.pod.node if self.pod else (self.node.name if self.node else None)),
            "service": self.service.key if self.service else None,
            "owner": self.owner.name if self.owner else None,
        }

    def addresses(self) -> list[str]:
        """Every address a packet of this endpoint may carry: a VIP and its backends; a node's
        address on its CNI's devices (the source of its own traffic to pods elsewhere)."""
        out = [self.ip]
        fam = families([self.ip])[0] if self.ip else None
        if self.service:     # the backends a packet of this family reaches (DNAT keeps the family)
            out += of_family(self.service.backend_ips, fam)
        elif self.node is not None and self.pod is None and not self.literal:
            out += [a for a in of_family(self.node.cni_ips, fam) if a not in out]
        return out


def load_list(path: str | Path) -> Inventory:
    """A `kubectl get nodes,pods,services,endpointslices -A -o json` document."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise BadInput(f"cluster file {p} does not exist", "pass a `kubectl get … -o json` file") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"cluster file {p} is not JSON ({exc.msg} at line {exc.lineno})",
                       "pass the output of `kubectl get nodes,pods,services,endpointslices -A -o json`") from None
    except UnicodeDecodeError:
        raise BadInput(f"cluster file {p} is not JSON (not UTF-8 text)",
                       "pass the output of `kubectl get nodes,pods,services,endpointslices -A -o json`") from None
    except OSError as exc:   # unreadable: a directory in the path, EACCES, EIO, ...
        raise BadInput(f"cluster file {p} cannot be read ({exc.strerror or exc})",
                       "pass a readable `kubectl get … -o json` file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise BadInput(f"cluster file {p} is not a Kubernetes List (no `items`)",
                       "pass the output of `kubectl get nodes,pods,services,endpointslices -A -o json`")
    try:
        return from_items(doc["items"], source=str(p))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:   # an object of the wrong shape
        raise BadInput(f"cluster file {p} holds a malformed object ({type(exc).__name__}: {exc})",
                       "pass the unedited output of `kubectl get nodes,pods,services,endpointslices -A -o json`") from None


def _owner(refs: list[dict] | None) -> dict | None:
    refs = refs or []
    return next((r for r in refs if r.get("controller")), refs[0] if refs else None)


# A CronJob's controller names its Jobs <cronjob>-<scheduled time in minutes since the epoch>.
_CRONJOB_JOB = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>[0-9]{8,})$")


def workload_of(owner_kind: str | None, owner_name: str | None, labels: dict | None) -> tuple[str | None, str | None]:
    """(kind, name) of the workload behind a pod's controller, derived from names like kubectl
    users read them, without fetching the owner: ReplicaSet `web-5d4f8b7c9` with the pod label
    `pod-template-hash: 5d4f8b7c9` → Deployment `web`; Job `backup-28476120` → CronJob `backup`;
    StatefulSet, DaemonSet and others are their own workload."""
    if not owner_kind or not owner_name:
        return None, None
    labels = labels or {}
    if owner_kind == "ReplicaSet":
        h = labels.get("pod-template-hash")
        if h and owner_name.endswith("-" + h) and len(owner_name) > len(h) + 1:
            return "Deployment", owner_name[: -len(h) - 1]
        return "ReplicaSet", owner_name
    if owner_kind == "Job":
        m = _CRONJOB_JOB.match(owner_name)
        if m:
            return "CronJob", m.group("cronjob")
        return "Job", owner_name
    if owner_kind == "Node":      # a static (mirror) pod
        return "StaticPod", owner_name
    return owner_kind, owner_name


def pod_from_obj(it: dict) -> Pod:
    md = it.get("metadata") or {}
    spec = it.get("spec") or {}
    ref = _owner(md.get("ownerReferences"))
    okind, oname = (ref.get("kind"), ref.get("name")) if ref else (None, None)
    wkind, wname = workload_of(okind, oname, md.get("labels"))
    status = it.get("status") or {}
    return Pod(md.get("namespace", "default"), md["name"], spec.get("nodeName"),
               status.get("podIP"),
               uid=md.get("uid"), owner_kind=okind, owner_name=oname,
               workload_kind=wkind, workload_name=wname,
               host_network=bool(spec.get("hostNetwork")),
               ips=[a.get("ip") for a in status.get("podIPs") or [] if isinstance(a, dict)])


# Node annotations whose value is an address of the node on its CNI's devices.
CNI_ADDRESS_ANNOTATIONS = ("network.cilium.io/ipv4-cilium-host", "network.cilium.io/ipv6-cilium-host",
                           "projectcalico.org/IPv4IPIPTunnelAddr", "projectcalico.org/IPv4VXLANTunnelAddr",
                           "projectcalico.org/IPv6VXLANTunnelAddr")


def cni_addresses(annotations: dict) -> list[str]:
    """The node's addresses on its CNI's devices named by its annotations (valid ones only)."""
    out = []
    for key in CNI_ADDRESS_ANNOTATIONS:
        v = str(annotations.get(key) or "").split("/")[0].strip()
        try:
            out.append(str(ipaddress.ip_address(v)))
        except ValueError:
            continue
    return list(dict.fromkeys(out))


def node_from_obj(it: dict) -> Node:
    md = it.get("metadata") or {}
    raw = (it.get("status") or {}).get("addresses") or []
    addrs: dict = {}
    for a in raw:     # the first address of a type (a dual-stack node has an InternalIP per family)
        addrs.setdefault(a.get("type"), a.get("address"))
    spec = it.get("spec") or {}
    cidrs = [c for c in spec.get("podCIDRs") or [] if c]
    return Node(md["name"], addrs.get("InternalIP"), spec.get("podCIDR") or (cidrs[0] if cidrs else None),
                pod_cidrs=cidrs,
                ips=[a.get("address") for a in raw if a.get("type") == "InternalIP" and a.get("address")],
                addresses=[a.get("address") for a in raw if a.get("type") in ("InternalIP", "ExternalIP")
                           and a.get("address")],
                cni_ips=cni_addresses(md.get("annotations") or {}))


def service_from_obj(it: dict) -> Service:
    md = it.get("metadata") or {}
    spec = it.get("spec") or {}
    ports = [{"port": p.get("port"), "target_port": p.get("targetPort", p.get("port")),
              "protocol": p.get("protocol", "TCP"), "name": p.get("name")}
             for p in spec.get("ports") or []]
    cip = spec.get("clusterIP")
    # headless (clusterIP "None"): no address, whatever a stale clusterIPs list says
    cips = [] if cip in ("None", "") else [c for c in spec.get("clusterIPs") or [] if c not in (None, "None", "")]
    return Service(md.get("namespace", "default"), md["name"], None if cip in (None, "None", "") else cip,
                   ports, selector=dict(spec.get("selector") or {}), cluster_ips=cips)


def slice_from_obj(sl: dict) -> Slice:
    md = sl.get("metadata") or {}
    ns = md.get("namespace", "default")
    svc_name = (md.get("labels") or {}).get("kubernetes.io/service-name")
    out = Slice(ns, md.get("name", ""), f"{ns}/{svc_name}" if svc_name else None)
    if sl.get("addressType") not in (None, "IPv4", "IPv6"):   # FQDN slices carry no address
        return out
    for ep in sl.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        ref = ep.get("targetRef") or {}
        if ref.get("kind") == "Pod":
            key = f"{ref.get('namespace', ns)}/{ref.get('name')}"
            if key not in out.backends:
                out.backends.append(key)
        for a in ep.get("addresses") or []:
            try:
                a = str(ipaddress.ip_address(a))
            except ValueError:
                continue
            if a not in out.backend_ips:
                out.backend_ips.append(a)
    return out


def from_items(items: list[dict], source: str) -> Inventory:
    inv = Inventory(source=source)
    slices: list[dict] = []
    for it in items:
        kind = it.get("kind")
        if kind == "Node":
            node = node_from_obj(it)
            inv.nodes[node.name] = node
        elif kind == "Pod":
            pod = pod_from_obj(it)
            inv.pods[pod.key] = pod
        elif kind == "Service":
            svc = service_from_obj(it)
            inv.services[svc.key] = svc
        elif kind == "EndpointSlice":
            slices.append(it)
    for raw in slices:
        sl = slice_from_obj(raw)
        if sl.service is None or sl.service not in inv.services:
            continue
        inv.upsert_slice(sl)
    inv.reindex()
    return inv
