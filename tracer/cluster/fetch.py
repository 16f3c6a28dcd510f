"""Fetching only the objects a trace's SRC/DST name from the API server (no cluster-wide list).

`inventory_for()` returns the inventory and the `Stream`s that keep exactly that current.
"""

from __future__ import annotations

import ipaddress

from typing import Iterable, Iterator

from tracer.cluster import inventory, names
from tracer.cluster.api import SERVICE_NAME_LABEL, Connection, Stream, _call
from tracer.errors import BadInput, EnvironmentProblem


def _selector(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _items(conn: Connection, stream: Stream, what: str, page: int = 500, restarts: int = 3) -> Iterator[dict]:
    """Every object of a (paginated) list, with `kind` set (list items have none). The pages
    are one snapshot of the server's; when it has compacted that snapshot before the last
    page (410 on a continue token), the list starts over, up to `restarts` times."""
    from kubernetes.client.exceptions import ApiException

    from tracer.cluster.api import _get_json, api_error

    fn = stream.lister(conn)
    got: list[dict] = []
    cont = None
    while True:
        try:
            doc = _get_json(conn, what, fn, limit=page, _continue=cont, **stream.selectors())
        except ApiException as exc:
            if exc.status == 410 and cont and restarts > 0:
                restarts -= 1
                got, cont = [], None
                continue
            raise api_error(exc, conn, what) from None
        for it in doc.get("items") or []:
            it.setdefault("kind", stream.kind)
            got.append(it)
        cont = (doc.get("metadata") or {}).get("continue")
        if not cont:
            yield from got
            return


def _names(conn: Connection, stream: Stream, what: str) -> list[str]:
    out = []
    for it in _items(conn, stream, what):
        md = it.get("metadata") or {}
        out.append(f"{md.get('namespace')}/{md.get('name')}" if md.get("namespace") else md.get("name"))
    return out


def _hint(conn: Connection, name: names.Name) -> str:
    """names.hint() over what the API lists: the pods and Services of the name's namespace
    and the nodes (only on this error path; a list refused is left out)."""
    from kubernetes.client.exceptions import ApiException

    ns = name.namespace or names.DEFAULT_NAMESPACE
    found = {}
    for kind, stream, what in (("pods", Stream("Pod", ns), f"list pods in {ns}"),
                               ("services", Stream("Service", ns), f"list services in {ns}"),
                               ("nodes", Stream("Node"), "list nodes")):
        try:
            found[kind] = _names(conn, stream, what)
        except (EnvironmentProblem, ApiException):
            found[kind] = []
    return names.hint(name, fallback="list them with kubectl get", **found)


def inventory_for(conn: Connection, specs: Iterable[str],
                  namespace: str | None = None) -> tuple[inventory.Inventory, list[Stream]]:
    """A small inventory holding what the specs name (a pod, a Service with its slices and
    backend pods, a node, or whatever owns an address) plus the nodes of those pods, and
    the Streams that keep exactly that current during a long capture. Names without a
    namespace are in `namespace` (default "default"). Unknown names raise BadInput with
    close matches from the same namespace, and the same name as another kind."""
    inv = inventory.Inventory(source=conn.source)
    streams: list[Stream] = []
    for spec in specs:
        try:
            name = names.parse(spec, namespace)
        except BadInput:
            continue    # endpoints.resolve() says what is wrong with it
        _fetch_spec(conn, name, inv, streams)
    for name in sorted({p.node for p in inv.pods.values() if p.node} - set(inv.nodes)):
        obj = _call(conn, f"get node {name}", conn.core.read_node, name, missing_ok=True)
        if obj:
            obj.setdefault("kind", "Node")
            inv.apply("ADDED", obj)
    inv.reindex()
    return inv, list(dict.fromkeys(streams))


def _add(inv: inventory.Inventory, kind: str, obj: dict | None) -> dict | None:
    if obj:
        obj.setdefault("kind", kind)
        inv.apply("ADDED", obj)
    return obj


def _fetch_service(conn: Connection, inv: inventory.Inventory, streams: list[Stream], ns: str, name: str,
                   obj: dict) -> None:
    _add(inv, "Service", obj)
    streams.append(Stream("Service", ns, field_selector=f"metadata.name={name}"))
    sl = Stream("EndpointSlice", ns, label_selector=f"{SERVICE_NAME_LABEL}={name}")
    streams.append(sl)
    for it in _items(conn, sl, f"list endpointslices of {ns}/{name}"):
        inv.apply("ADDED", it)
    selector = (obj.get("spec") or {}).get("selector") or {}
    if selector:
        ps = Stream("Pod", ns, label_selector=_selector(selector))
        streams.append(ps)
        for it in _items(conn, ps, f"list the pods of Service {ns}/{name}"):
            inv.apply("ADDED", it)
    else:   # a Service without selector: its EndpointSlices name the pods
        for key in inv.services[f"{ns}/{name}"].backends:
            pns, pname = key.split("/", 1)
            _add(inv, "Pod", _call(conn, f"get pod {key}", conn.core.read_namespaced_pod, pname, pns,
                                   missing_ok=True))
            streams.append(Stream("Pod", pns, field_selector=f"metadata.name={pname}"))


def _listed(items, key: str | None) -> list[str]:
    """The addresses of podIPs ([{ip: …}]) or clusterIPs ([…]), as podtrace prints them."""
    out = []
    for it in items or []:
        a = it.get(key) if key and isinstance(it, dict) else it
        try:
            out.append(str(ipaddress.ip_address(a)))
        except (TypeError, ValueError):
            continue
    return out


def _fetch_spec(conn: Connection, name: names.Name, inv: inventory.Inventory, streams: list[Stream]) -> None:
    if name.kind == "ip":
        ip = name.key
        pods = Stream("Pod", field_selector=f"status.podIP={ip}")
        streams.append(pods)
        found = [inv.apply("ADDED", it) for it in _items(conn, pods, f"find the pod with IP {ip}")]
        v6 = ":" in ip
        if not found and v6:
            # The field selector matches the first podIP only: a dual-stack pod's IPv6 address
            # (IPv4 first, as most dual-stack clusters order them) needs a scan of podIPs.
            hits = [it for it in _items(conn, Stream("Pod"), "list pods")
                    if ip in _listed((it.get("status") or {}).get("podIPs"), "ip")]
            for it in hits:
                md = it.get("metadata") or {}
                inv.apply("ADDED", it)
                streams.append(Stream("Pod", md.get("namespace", "default"),
                                      field_selector=f"metadata.name={md.get('name')}"))
            found = hits
        try:
            svcs = list(_items(conn, Stream("Service", field_selector=f"spec.clusterIP={ip}"),
                               f"find the Service with IP {ip}"))
        except EnvironmentProblem:
            # API servers before 1.31 refuse the spec.clusterIP field selector (400): scan.
            svcs = [it for it in _items(conn, Stream("Service"), "list services")
                    if (it.get("spec") or {}).get("clusterIP") == ip]
        if not svcs and not found and v6:   # a dual-stack Service's second clusterIP
            svcs = [it for it in _items(conn, Stream("Service"), "list services")
                    if ip in _listed((it.get("spec") or {}).get("clusterIPs"), None)]
        for it in svcs:
            md = it["metadata"]
            _fetch_service(conn, inv, streams, md.get("namespace", "default"), md["name"], it)
        if not found and not svcs:
            # A node's address, or an address in a node's pod CIDR (the node that owns it).
            nodes = {}
            for it in _items(conn, Stream("Node"), "list nodes"):
                node = inventory.node_from_obj(it)
                nodes[node.name] = node
            owner = inventory.cidr_owner(inventory.Inventory(nodes=nodes), ip)
            if owner is not None:
                inv.upsert_node(owner)
                streams.append(Stream("Node", field_selector=f"metadata.name={owner.name}"))
        return
    if name.kind == "service":
        ns, svc = name.namespace, name.name
        obj = _call(conn, f"get service {ns}/{svc}", conn.core.read_namespaced_service, svc, ns,
                    missing_ok=True)
        if obj is None:
            raise BadInput(f"no Service {ns}/{svc}", _hint(conn, name))
        _fetch_service(conn, inv, streams, ns, svc, obj)
        return
    if name.kind == "node":
        obj = _call(conn, f"get node {name.key}", conn.core.read_node, name.key, missing_ok=True)
        if obj is None:
            raise BadInput(f"no node {name.key}", _hint(conn, name))
        _add(inv, "Node", obj)
        streams.append(Stream("Node", field_selector=f"metadata.name={name.key}"))
        return
    ns, pod = name.namespace, name.name
    obj = _call(conn, f"get pod {ns}/{pod}", conn.core.read_namespaced_pod, pod, ns, missing_ok=True)
    if obj is None:
        raise BadInput(f"no pod {ns}/{pod}", _hint(conn, name))
    _add(inv, "Pod", obj)
    streams.append(Stream("Pod", ns, field_selector=f"metadata.name={pod}"))
