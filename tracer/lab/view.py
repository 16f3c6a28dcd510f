"""The lab's side of the topology interface: its status document as a cluster Topology."""

from __future__ import annotations

from pathlib import Path

from tracer.cluster import topology as topology_mod
from tracer.cluster.topology import NodeDevices, PodPlace, Topology


def topology(doc: dict) -> Topology:
    """What product code needs of an up lab: nodes and their devices, pods and their
    namespaces, the fabric; the rest of the status document stays the lab's own."""
    nodes = tuple(NodeDevices(name=n["name"], netns=n.get("netns"), ip=n.get("ip"),
                              uplink=n.get("uplink"), bridge=n.get("bridge"), overlay=n.get("overlay"),
                              overlay_ip=n.get("overlay_ip"), vtep_mac=n.get("mac"))
                  for n in doc.get("nodes", []))
    pods = tuple(PodPlace(key=f"{p['namespace']}/{p['name']}", node=p["node"], netns=p.get("netns"),
                          host_veth=p.get("host_veth"))
                 for p in doc.get("pods", []))
    prefix = doc.get("prefix", "")
    return Topology(source=f"lab {prefix}".strip(), inventory=doc.get("inventory"), nodes=nodes, pods=pods,
                    fabric_netns=doc.get("fabric_netns"), labels={"prefix": prefix, "cni": doc.get("cni"),
                            **({"datapath": doc["datapath"]} if doc.get("datapath") == "ebpf" else {})})


def publish(doc: dict, lab_dir: Path) -> None:
    """Write the lab's topology where product code looks for it (before `lab.json`, whose
    presence means the lab is up)."""
    topology_mod.write(topology(doc), Path(lab_dir) / topology_mod.TOPOLOGY_FILE)


def published(lab_dir: Path) -> bool:
    return (Path(lab_dir) / topology_mod.TOPOLOGY_FILE).is_file()
