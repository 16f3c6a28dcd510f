"""The lab seen through the fake API server: its agent DaemonSet's pods, what an exec into an
agent pod or a lab pod runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


AGENT_NAMESPACE = "podtrace"
AGENT_LABELS = {"app.kubernetes.io/name": "podtrace-agent", "app.kubernetes.io/part-of": "podtrace"}


def agent_pods(prefix: str) -> list[dict]:
    """One running agent pod per lab node, as the DaemonSet of manifests/ would make them."""
    from tracer.lab import topology as T

    topo = T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent")))
    out = []
    for n in topo.nodes:
        name = f"podtrace-agent-{hashlib.sha256(n.name.encode()).hexdigest()[:5]}"
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": AGENT_NAMESPACE, "labels": dict(AGENT_LABELS),
                         "creationTimestamp": topo.created_at,
                         "uid": str(hashlib.md5(f"{prefix}/{name}".encode()).hexdigest()),
                         "annotations": {"podtrace.io/netns": n.netns},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": "podtrace-agent", "uid": "ds", "controller": True}]},
            "spec": {"nodeName": n.name, "hostNetwork": True, "hostPID": True,
                     "containers": [{"name": "agent", "image": "podtrace:dev"}]},
            "status": {"phase": "Running", "podIP": n.ip, "podIPs": [{"ip": n.ip}], "hostIP": n.ip,
                       "startTime": topo.created_at,
                       "containerStatuses": [{"name": "agent", "ready": True, "started": True,
                                              "restartCount": 0, "image": "podtrace:dev",
                                              "imageID": "podtrace:dev",
                                              "state": {"running": {"startedAt": topo.created_at}}}]},
        })
    return out


def lab_agent_runner(python: str, cwd: str, env: dict | None = None):
    """exec_runner for agent pods: `podtrace agent` runs on the pod's node — inside the lab
    node's network namespace only (nsenter --net: same mounts, same /proc, like a
    hostNetwork + hostPID container) — and anything else is "not found"."""
    def run(ns: str, pod: dict, container: str | None, command: list[str]):
        if ns != AGENT_NAMESPACE or command[:2] != ["podtrace", "agent"]:
            return None
        node_netns = pod["metadata"]["annotations"]["podtrace.io/netns"]
        argv = ["nsenter", f"--net=/run/netns/{node_netns}", "--", python, "-m", "tracer.cli", *command[1:]]
        return argv, dict(env if env is not None else os.environ, PYTHONPATH=cwd)
    return run


def lab_pod_runner(python: str, cwd: str, env: dict | None = None):
    """exec_runner for a lab that is up: agent pods as `lab_agent_runner`; a lab pod runs the
    command in its own network namespace (`ip netns exec`), as a container of that pod would;
    a pod whose namespace does not exist (the lab is down) has no such executable."""
    agents = lab_agent_runner(python, cwd, env)

    def run(ns: str, pod: dict, container: str | None, command: list[str]):
        if ns == AGENT_NAMESPACE:
            return agents(ns, pod, container, command)
        netns = ((pod.get("metadata") or {}).get("annotations") or {}).get("podtrace.io/netns")
        if not netns or not command or not Path(f"/run/netns/{netns}").exists():
            return None
        return ["ip", "netns", "exec", netns, *command]
    return run
