"""Server-side printing: the `meta.k8s.io/v1` Table a client gets when it asks for one
(`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`, as `kubectl get` does), with the
columns the real server prints for each kind (priority 1: shown by `-o wide`)."""

from __future__ import annotations

import datetime


def wants_table(accept: str | None) -> bool:
    """Whether an Accept header asks for a meta.k8s.io/v1 Table (before any other type)."""
    for part in (accept or "").split(","):
        params = dict(p.strip().partition("=")[::2] for p in part.split(";")[1:])
        if (params.get("as"), params.get("g"), params.get("v")) == ("Table", "meta.k8s.io", "v1"):
            return True
        if not params:          # a plain type comes first: no table wanted
            return False
    return False


def _age(obj: dict, now: datetime.datetime) -> str:
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return "<unknown>"
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _pod(o: dict, age: str) -> list:
    st, spec = o.get("status") or {}, o.get("spec") or {}
    cs = st.get("containerStatuses") or []
    ready = f"{sum(1 for c in cs if c.get('ready'))}/{len(spec.get('containers') or [])}"
    return [o["metadata"]["name"], ready, st.get("phase") or "Unknown",
            sum(int(c.get("restartCount") or 0) for c in cs), age,
            st.get("podIP") or "<none>", spec.get("nodeName") or "<none>", "<none>", "<none>"]


def _node(o: dict, age: str) -> list:
    st = o.get("status") or {}
    ready = next((c.get("status") for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    addr = {a.get("type"): a.get("address") for a in st.get("addresses") or []}
    info = st.get("nodeInfo") or {}
    roles = sorted(k.rpartition("/")[2] for k in (o["metadata"].get("labels") or {})
                   if k.startswith("node-role.kubernetes.io/"))
    return [o["metadata"]["name"], "Ready" if ready == "True" else "NotReady", ",".join(roles) or "<none>", age,
            info.get("kubeletVersion", ""), addr.get("InternalIP", "<none>"), addr.get("ExternalIP", "<none>"),
            info.get("osImage", ""), info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]


def _service(o: dict, age: str) -> list:
    spec = o.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    sel = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [o["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", "<none>",
            ports or "<none>", age, sel or "<none>"]


def _slice(o: dict, age: str) -> list:
    ports = ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"
    addrs = [a for ep in o.get("endpoints") or [] for a in ep.get("addresses") or []]
    shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [o["metadata"]["name"], o.get("addressType", ""), ports, shown or "<unset>", age]


def _endpoints(o: dict, age: str) -> list:
    pairs = [f"{a['ip']}:{p.get('port')}" for s in o.get("subsets") or [] for a in s.get("addresses") or []
             for p in s.get("ports") or []]
    shown = ",".join(pairs[:3]) + (f" + {len(pairs) - 3} more..." if len(pairs) > 3 else "")
    return [o["metadata"]["name"], shown or "<none>", age]


def _namespace(o: dict, age: str) -> list:
    return [o["metadata"]["name"], (o.get("status") or {}).get("phase", "Active"), age]


def _secret(o: dict, age: str) -> list:
    return [o["metadata"]["name"], o.get("type", "Opaque"), len(o.get("data") or {}), age]


def _event(o: dict, age: str) -> list:
    inv = o.get("involvedObject") or {}
    return [age, o.get("type", ""), o.get("reason", ""), f"{inv.get('kind', '').lower()}/{inv.get('name', '')}",
            o.get("message", "")]


_COLUMNS = {
    # kind → ((name, type, priority), …), row function
    "Pod": ((("Name", "string", 0), ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0),
             ("Age", "string", 0), ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
             ("Readiness Gates", "string", 1)), _pod),
    "Node": ((("Name", "string", 0), ("Status", "string", 0), ("Roles", "string", 0), ("Age", "string", 0),
              ("Version", "string", 0), ("Internal-IP", "string", 1), ("External-IP", "string", 1),
              ("OS-Image", "string", 1), ("Kernel-Version", "string", 1), ("Container-Runtime", "string", 1)),
             _node),
    "Service": ((("Name", "string", 0), ("Type", "string", 0), ("Cluster-IP", "string", 0),
                 ("External-IP", "string", 0), ("Port(s)", "string", 0), ("Age", "string", 0),
                 ("Selector", "string", 1)), _service),
    "EndpointSlice": ((("Name", "string", 0), ("AddressType", "string", 0), ("Ports", "string", 0),
                       ("Endpoints", "string", 0), ("Age", "string", 0)), _slice),
    "Endpoints": ((("Name", "string", 0), ("Endpoints", "string", 0), ("Age", "string", 0)), _endpoints),
    "Namespace": ((("Name", "string", 0), ("Status", "string", 0), ("Age", "string", 0)), _namespace),
    "Secret": ((("Name", "string", 0), ("Type", "string", 0), ("Data", "string", 0), ("Age", "string", 0)),
               _secret),
    "Event": ((("Last Seen", "string", 0), ("Type", "string", 0), ("Reason", "string", 0),
               ("Object", "string", 0), ("Message", "string", 0)), _event),
}


def table(kind: str, objects: list[dict], metadata: dict | None = None) -> dict:
    """A Table of objects of one kind; each row carries the object's metadata (as the default
    `includeObject=Metadata` does), which is where kubectl takes names and namespaces from."""
    columns, row = _COLUMNS[kind]
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": dict(metadata or {}),
        "columnDefinitions": [{"name": n, "type": t, "format": "name" if n == "Name" else "", "description": "",
                               "priority": p} for n, t, p in columns],
        "rows": [{"cells": row(o, _age(o, now)),
                  "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": o.get("metadata") or {}}} for o in objects],
    }
