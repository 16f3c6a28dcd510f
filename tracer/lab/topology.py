"""Plans the lab: the nodes, pods and Services one `LabConfig` stands for.

`plan(LabConfig)` gives a `LabPlan` (pure: no privileges, no side effects, the same for
the same config) that `tracer.lab.build` turns into namespaces and devices. The common
model and the documents derived from a plan are re-exported here, so callers need one
import: `from tracer.lab import topology as T`.
"""

from __future__ import annotations

import datetime as _dt

from tracer.lab.apiobjects import inventory
from tracer.lab.cilium import (CILIUM_HOST, CILIUM_HOST_TABLE, CILIUM_NET, CILIUM_OVERLAY,
                               CILIUM_RULE_PREF, CILIUM_VNI, cilium_vtep_mac, lxc_name)
from tracer.lab.cni import flavour
from tracer.lab.flannel import CNI_BRIDGE, OVERLAY, VXLAN_ID, flannel_mac, host_veth_name
from tracer.lab.kubeproxy import iptables_rules, sep_chain, service, svc_chain
from tracer.lab.model import (CALICO_MODES, CLUSTER_CIDR6, DATAPATHS, IP_FAMILIES, PROXY_MODES,
                              SERVICE_CIDR6, UNDERLAY_CIDR6, families)
from tracer.lab.model import (APP_PORT, BUILT_CNIS, CLUSTER_CIDR, CNIS, DEFAULT_PREFIX,
                              DEFAULT_STATE_ROOT, FABRIC_BRIDGE, K8S_NAMESPACE, LAB_LABEL,
                              MASQ_MARK, POD_MTU, SERVICE_CIDR, UNDERLAY_CIDR, UNDERLAY_MTU,
                              UPLINK, VXLAN_PORT, LabConfig, NodePlan, PodPlan, ServicePlan,
                              ServicePortPlan, LabPlan, default_prefix, default_state_root,
                              fabric_netns, lab_dir, namespace_pattern, node_netns, pod_netns,
                              validate_prefix)
from tracer.lab.statusdoc import status_document

__all__ = [
    "CALICO_MODES", "CLUSTER_CIDR6", "DATAPATHS", "IP_FAMILIES", "PROXY_MODES", "SERVICE_CIDR6",
    "UNDERLAY_CIDR6", "families",
    "APP_PORT", "BUILT_CNIS", "CILIUM_HOST", "CILIUM_HOST_TABLE", "CILIUM_NET", "CILIUM_OVERLAY",
    "CILIUM_RULE_PREF", "CILIUM_VNI", "CLUSTER_CIDR", "CNIS", "CNI_BRIDGE", "DEFAULT_PREFIX",
    "DEFAULT_STATE_ROOT", "FABRIC_BRIDGE", "K8S_NAMESPACE", "LAB_LABEL", "MASQ_MARK", "OVERLAY",
    "POD_MTU", "SERVICE_CIDR", "UNDERLAY_CIDR", "UNDERLAY_MTU", "UPLINK", "VXLAN_ID", "VXLAN_PORT",
    "LabConfig", "NodePlan", "PodPlan", "ServicePlan", "ServicePortPlan", "LabPlan",
    "cilium_vtep_mac", "default_prefix", "default_state_root", "fabric_netns", "flannel_mac",
    "host_veth_name", "inventory", "iptables_rules", "lab_dir", "lxc_name", "namespace_pattern",
    "node_netns", "plan", "pod_netns", "sep_chain", "status_document", "svc_chain",
    "validate_prefix",
]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(cfg: LabConfig, created_at: str | None = None) -> LabPlan:
    """Nodes and pods as the CNI flavour lays them out, and two Services: `web` (backed by
    the last pod of the last node) and `echo` (backed by every pod)."""
    nodes, pods = flavour(cfg.cni).plan(cfg)
    last = [p for p in pods if p.node_index == cfg.nodes][-1]
    services = (
        service("web", "10.96.0.10", {"app": last.name}, [last], cfg.families),
        service("echo", "10.96.0.20", {LAB_LABEL: "true"}, pods, cfg.families),
    )
    return LabPlan(cfg, tuple(nodes), tuple(pods), services, created_at or _now())
