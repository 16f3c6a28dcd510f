"""RBAC for the fake API server: authorizes requests as a user bound by manifests/rbac.yaml.

`FakeApi.authorize = Rbac.for_group("podtrace-users")` makes the server authorize every
request as a user of that group holding the roles manifests/rbac.yaml binds to it — verbs
get/list/watch/patch/create from the request, `resourceNames`, namespaces of Roles — and
answer 403 (a JSON Status, like every error of the server) otherwise; `kubectl auth can-i`
(SelfSubjectAccessReview) answers from the same rules. A websocket upgrade to pods/exec or
pods/portforward needs `create` besides `get`, as API servers since 1.31 check it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
GROUPS = {("api", "v1"): "", ("apis", "discovery.k8s.io", "v1"): "discovery.k8s.io"}


class Rbac:
    """The rules a user holds: (namespace or None for cluster-wide, rule) pairs."""

    def __init__(self, rules: list[tuple[str | None, dict]], user: str = "fake"):
        self.rules = rules
        self.user = user

    @classmethod
    def for_group(cls, group: str, path: Path = MANIFESTS / "rbac.yaml") -> "Rbac":
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs
                 if d["kind"] in ("Role", "ClusterRole")}
        rules = []
        for b in docs:
            if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(s.get("kind") == "Group" and s.get("name") == group for s in b.get("subjects") or []):
                continue
            ref = b["roleRef"]
            where = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
            role = roles.get((ref["kind"], where if ref["kind"] == "Role" else None, ref["name"]))
            rules += [(where, r) for r in (role or {}).get("rules") or []]
        return cls(rules, user=f"{group}-member")

    def allows(self, verb: str, group: str, resource: str, namespace: str | None, name: str | None) -> bool:
        for where, r in self.rules:
            if where is not None and where != namespace:
                continue
            if not ({group, "*"} & set(r.get("apiGroups") or [])):
                continue
            if not ({resource, "*"} & set(r.get("resources") or [])):
                continue
            if not ({verb, "*"} & set(r.get("verbs") or [])):
                continue
            names = r.get("resourceNames")
            if names and name not in names:
                continue
            return True
        return False

    def __call__(self, handler, path: str, q: dict) -> str | None:
        """None when allowed; else the API server's 403 message."""
        parts = [p for p in urlparse(path).path.split("/") if p]
        if parts == ["version"] or parts[:1] not in (["api"], ["apis"]):
            return None
        n = 2 if parts[0] == "api" else 3
        group = GROUPS.get(tuple(parts[:n]))
        rest = parts[n:]
        if group is None or not rest:
            return None        # discovery documents are public
        ns = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
            if not rest:
                return None
        resource = rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")
        name = rest[1] if len(rest) >= 2 else None
        method = getattr(handler, "command", "GET")
        if len(rest) >= 3 and handler.headers.get("Upgrade", "").lower() == "websocket":
            verbs = ["get", "create"]    # a websocket upgrade to exec/attach/portforward
        elif method in ("POST", "PATCH", "PUT", "DELETE"):
            verbs = [{"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]]
        elif name is not None:
            verbs = ["get"]
        else:
            verbs = ["watch" if q.get("watch") in ("1", "true", "True") else "list"]
        for verb in verbs:
            if not self.allows(verb, group, resource, ns, name):
                what = f'{rest[0]} "{name}"' if name else rest[0]
                where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
                return (f'{what} is forbidden: User "{self.user}" cannot {verb} resource "{resource}" in API group '
                        f'"{group}"{where}')
        return None
