"""Picks the module describing a lab's CNI flavour (flannel.py, cilium.py, calico.py).

Each flavour module offers the same names: NAME, OVERLAY, HOP_DEVICE, VNI, the step
messages, `plan`, `filter_rules`, the status and inventory fields and the node and pod
batches; optionally `node_batch6`, `node_filter_rules` (per-node filter chains) and
`attach_programs` (tc programs of the flavour's own, once the nodes' devices exist).
"""

from __future__ import annotations

from types import ModuleType

from tracer.lab import calico, cilium, flannel

FLAVOURS: dict[str, ModuleType] = {flannel.NAME: flannel, cilium.NAME: cilium, calico.NAME: calico}


def flavour(cni: str | None) -> ModuleType:
    """The flavour module of a lab; a status document without `cni` is a flannel lab."""
    return FLAVOURS[cni or flannel.NAME]
