"""Choosing where a run's cluster metadata comes from: a file, the API, or a local topology."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from tracer.cluster import inventory
from tracer.cluster import topology as topology_mod
from tracer.cluster.topology import Topology
from tracer.errors import EnvironmentProblem

if TYPE_CHECKING:
    from tracer.cluster.api import Connection


@dataclass
class ClusterView:
    """The metadata a run works from, and how it reaches the nodes."""

    inv: inventory.Inventory
    topology: Topology | None = None   # this machine holds the nodes (the lab): their shape
    conn: Connection | None = None     # a live API connection: agents run on the cluster's nodes


def topology_inventory(topo: Topology) -> inventory.Inventory:
    """A topology's inventory file, with the namespaces and veths only the topology knows."""
    inv = inventory.load_list(topo.inventory)
    inv.source = topo.source
    topo.apply(inv)
    return inv


def local(cluster: str | None, lab_prefix: str | None) -> ClusterView | None:
    """--cluster FILE, else the topology published on this machine, else None. A file's pods
    get the topology's namespaces when they are the same pods (same key, same address)."""
    topo = topology_mod.load_local(lab_prefix)
    if cluster:
        inv = inventory.load_list(cluster)
        if topo is not None:
            mine = topology_inventory(topo)
            for key, pod in inv.pods.items():
                lp = mine.pods.get(key)
                if lp and lp.ip == pod.ip:
                    pod.netns, pod.host_veth = lp.netns, lp.host_veth
        return ClusterView(inv, topo)
    if topo is not None:
        return ClusterView(topology_inventory(topo), topo)
    return None


def lab_ahead(cluster: str | None, kubeconfig: str | None, context: str | None, lab_prefix: str | None) -> bool:
    """Whether `load` will take the lab's topology, told without reading it (before the
    endpoints are resolved): no --cluster, no kubeconfig, and a lab up with this prefix. False
    when it cannot tell (a bad prefix or --context: `load` says what is wrong)."""
    if cluster or kubeconfig or not lab_prefix:
        return False
    try:
        from tracer.cluster import api

        return api.find_config(None, context) is None and topology_mod.path_for(lab_prefix).exists()
    except Exception:
        return False


def load(cluster: str | None, kubeconfig: str | None, context: str | None, lab_prefix: str | None,
         specs: Iterable[str] = (), namespace: str | None = None) -> ClusterView:
    """--cluster FILE, else the kubeconfig / in-cluster config (the objects `specs` name),
    else the lab's topology when the lab is up: the contract's order. Names in `specs`
    without a namespace are in `namespace` (default "default")."""
    if not cluster:
        from tracer.cluster import api, fetch

        ref = api.find_config(kubeconfig, context)
        if ref is not None:
            conn = api.connect(kubeconfig, context, ref=ref)
            inv, _streams = fetch.inventory_for(conn, [s for s in specs if s], namespace)
            return ClusterView(inv, None, conn)
    view = local(cluster, lab_prefix)
    if view is None:
        raise EnvironmentProblem(
            "no cluster metadata: no --cluster FILE and no lab is up",
            "pass --cluster FILE (kubectl get nodes,pods,services,endpointslices -A -o json) or run `podtrace lab up`")
    return view
