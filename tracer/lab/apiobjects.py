"""The lab's Kubernetes objects: the `v1 List` its API server would return.

What `kubectl get nodes,pods,services,endpointslices -A -o json` would print for the lab,
written to `inventory.json` by `lab up`.
"""

from __future__ import annotations

import hashlib
import platform
import uuid

from tracer.lab.cni import flavour
from tracer.lab.model import APP_PORT, LAB_LABEL, UID_NS, NodePlan, PodPlan, ServicePlan, LabPlan, \
    uid

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x"}
_K8S_VERSION = "v1.30.0"
_IMAGE = "podtrace.local/lab-responder:latest"


def inventory(topo: LabPlan) -> dict:
    """The lab as a `v1 List` (the inventory file `lab up` writes)."""
    items = [_node_obj(topo, n) for n in topo.nodes]
    items += [_pod_obj(topo, p) for p in topo.pods]
    items += [_service_obj(topo, s) for s in topo.services]
    # One EndpointSlice per Service and address family, as the EndpointSlice controller makes them.
    items += [_slice_obj(topo, s, f) for s in topo.services for f in topo.families]
    return {"apiVersion": "v1", "kind": "List", "items": items,
            "metadata": {"resourceVersion": ""}}


def _meta(topo: LabPlan, kind: str, name: str, namespace: str | None = None,
          labels: dict | None = None, **extra) -> dict:
    meta = {"name": name, "uid": uid(topo.prefix, kind, f"{namespace or ''}/{name}"),
            "resourceVersion": "1", "creationTimestamp": topo.created_at}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    meta.update(extra)
    return meta


def _node_obj(topo: LabPlan, n: NodePlan) -> dict:
    arch = _ARCH.get(platform.machine(), platform.machine() or "amd64")
    labels = {
        "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch, "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": arch, LAB_LABEL: "true",
    }
    annotations = {**flavour(topo.config.cni).node_annotations(n), "podtrace.io/netns": n.netns}
    machine = uuid.uuid5(UID_NS, f"{topo.prefix}/machine/{n.name}").hex
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": _meta(topo, "Node", n.name, labels=labels, annotations=annotations),
        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": list(n.pod_cidrs or (n.pod_cidr,))},
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


def _pod_obj(topo: LabPlan, p: PodPlan) -> dict:
    node = topo.nodes[p.node_index - 1]
    t = topo.created_at
    cond = [{"type": c, "status": "True", "lastProbeTime": None, "lastTransitionTime": t}
            for c in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
    # Each lab pod is the one replica of a Deployment of its own name, as `kubectl create
    # deployment` would make it: owned by ReplicaSet NAME-HASH, labelled pod-template-hash.
    template_hash = hashlib.sha256(f"{p.namespace}/{p.name}".encode()).hexdigest()[:10]
    rs = f"{p.name}-{template_hash}"
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
             "uid": uid(topo.prefix, "ReplicaSet", f"{p.namespace}/{rs}"),
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
                "args": ["--name", p.name, "--port", str(APP_PORT),
                         *(["--ipv6"] if 6 in topo.families else [])],
                "ports": _container_ports(),
            }],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "phase": "Running", "podIP": p.ip, "podIPs": [{"ip": ip} for ip in (p.ips or (p.ip,))],
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


_FAMILY = {4: "IPv4", 6: "IPv6"}


def _service_obj(topo: LabPlan, s: ServicePlan) -> dict:
    fams = topo.families
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(topo, "Service", s.name, s.namespace, {LAB_LABEL: "true"}),
        "spec": {
            "type": "ClusterIP", "clusterIP": s.cluster_ip,
            "clusterIPs": list(s.cluster_ips or (s.cluster_ip,)),
            "ipFamilies": [_FAMILY[f] for f in fams],
            "ipFamilyPolicy": "RequireDualStack" if len(fams) > 1 else "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port,
                       "protocol": p.protocol} for p in s.ports],
            "selector": dict(s.selector),
        },
        "status": {"loadBalancer": {}},
    }


def _slice_obj(topo: LabPlan, s: ServicePlan, family: int = 4) -> dict:
    # The IPv4 slice keeps the name an ipv4 lab has always had; the IPv6 one another suffix.
    seed = f"{topo.prefix}/{s.key}" + ("" if family == 4 else "/IPv6")
    suffix = hashlib.sha1(seed.encode()).hexdigest()[:5]
    svc_uid = uid(topo.prefix, "Service", f"{s.namespace}/{s.name}")
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
        "addressType": _FAMILY[family],
        "endpoints": [
            {
                "addresses": [next(ip for ip in (b.ips or (b.ip,)) if (":" in ip) == (family == 6))],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": b.node,
                "targetRef": {"kind": "Pod", "namespace": b.namespace, "name": b.name,
                              "uid": uid(topo.prefix, "Pod", f"{b.namespace}/{b.name}")},
            }
            for b in s.backends
        ],
        "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol}
                  for p in s.ports],
    }
