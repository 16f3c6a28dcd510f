"""Faults of the cilium lab's eBPF datapath (`lab up --cni cilium --datapath ebpf`)."""

from __future__ import annotations

from tracer.errors import BadInput, EnvironmentProblem
from tracer.lab import cilium_ebpf
from tracer.lab.scenarios.changes import Changes
from tracer.lab.scenarios.labdoc import Lab

ALLOW_NOTE = "No such file or directory"   # bpftool's answer when the entry is already gone


def policy_map(lab: Lab, node: str) -> int:
    """The id of the node's cil_policy map, as the lab recorded it when it loaded the programs."""
    bpf = (lab.doc.get("bpf") or {}).get(node)
    if lab.doc.get("datapath") != "ebpf" or bpf is None:
        raise BadInput(f"lab {lab.prefix} does not run the eBPF datapath",
                       "podtrace lab up --cni cilium --datapath ebpf")
    mid = (bpf.get("maps") or {}).get(cilium_ebpf.POLICY_MAP)
    if mid is None:
        raise EnvironmentProblem(f"the lab's record names no {cilium_ebpf.POLICY_MAP} map on {node}",
                                 f"rebuild the lab: podtrace lab down --prefix {lab.prefix} && podtrace lab up ...")
    return int(mid)


def bpf_policy_drop(ch: Changes, lab: Lab, node: str) -> None:
    """A deny entry (client → the node's first pod) in the node's policy map: the program
    that delivers to that pod (cil_from_overlay for a client on another node) returns
    TC_ACT_SHOT for the flow."""
    n = lab.node(node)
    target = lab.pods_on(node)[0]
    client = lab.client_for(node)
    mid = policy_map(lab, node)
    key = ["key", "hex", *cilium_ebpf.policy_key_hex(client.ip, target.ip)]
    base = ["ip", "netns", "exec", n.netns, "bpftool", "map"]
    ch.run(base + ["update", "id", str(mid), *key, "value", "hex", "01", "00", "00", "00"],
           f"{node}: BPF policy map {cilium_ebpf.POLICY_MAP} (id {mid}) denies {client.name} "
           f"({client.ip}) → {target.name} ({target.ip})",
           base + ["delete", "id", str(mid), *key], undo_ok=[ALLOW_NOTE])
