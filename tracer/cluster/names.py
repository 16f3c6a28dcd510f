"""Reading a SRC/DST spec as kubectl reads a name: its kind, namespace, name.

`parse()` turns what the user typed into a `Name`; `hint()` says what to type instead when
that name is unknown, across kinds (a node typed as a pod suggests `node/NAME`, a Service
typed bare suggests `svc/NS/NAME`). The lab's inventory and the API server go through both.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass

from tracer.errors import BadInput

DEFAULT_NAMESPACE = "default"
FORMS = "pod, ns/pod, pod/NAME, svc/NAME, svc/ns/name, node/NAME or an IPv4/IPv6 address"

# kubectl's names of the kinds a spec may carry (singular, plural, short).
KINDS = {"pod": "pod", "pods": "pod", "po": "pod",
         "svc": "service", "service": "service", "services": "service",
         "node": "node", "nodes": "node", "no": "node"}

_CLOSE_MAX = 2000


@dataclass(frozen=True)
class Name:
    """What a spec names: kind "ip" (key: the address), "pod" or "service" (key: NS/NAME),
    or "node" (key: the node's name)."""

    kind: str
    key: str

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def namespace(self) -> str | None:
        return self.key.split("/", 1)[0] if self.kind in ("pod", "service") else None


def parse(spec: str, namespace: str | None = None) -> Name:
    """NAME or pod/NAME (a pod in `namespace`, default "default"), NS/NAME or pod/NS/NAME,
    svc/NAME (a Service in `namespace`), svc/NS/NAME, node/NAME, or an IPv4 or IPv6 address.
    Raises BadInput for anything else, with the forms it takes."""
    s = spec.strip()
    ns = namespace or DEFAULT_NAMESPACE
    if not s:
        raise BadInput("empty endpoint", f"give a {FORMS}")
    if re.fullmatch(r"[0-9.]+", s) or ":" in s:
        return Name("ip", address(s, spec))
    parts = s.split("/")
    if any(not p for p in parts):
        raise BadInput(f"cannot parse endpoint {spec!r}", f"use {FORMS}")
    kind = KINDS.get(parts[0].lower()) if len(parts) > 1 else None
    rest = parts[1:] if kind else parts
    kind = kind or "pod"
    if kind == "node" and len(rest) == 1:
        return Name("node", rest[0])
    if kind in ("pod", "service") and len(rest) in (1, 2):
        return Name(kind, "/".join(rest) if len(rest) == 2 else f"{ns}/{rest[0]}")
    raise BadInput(f"cannot parse endpoint {spec!r}", f"use {FORMS}")


def address(text: str, spec: str | None = None, notes: list[str] | None = None) -> str:
    """An address the user typed, as podtrace prints it: IPv4 dotted, IPv6 compressed.
    Refuses what cannot be a pod, node or Service address (BadInput, one line): malformed,
    scoped/link-local, multicast, unspecified. An IPv4-mapped IPv6 address (::ffff:a.b.c.d)
    is the IPv4 address it maps: that is what the packets carry (a note says so on stderr)."""
    spec = text if spec is None else spec
    s = text.strip()
    if "%" in s:
        raise BadInput(f"{spec!r} is a scoped (link-local) IPv6 address, not a pod, node or Service address",
                       "give the endpoint's global or unique-local address, or its name")
    if ":" not in s:
        try:
            a = ipaddress.IPv4Address(s)
        except ValueError:
            raise BadInput(f"{spec!r} is not a valid IPv4 address", "e.g. 10.244.1.2") from None
    else:
        try:
            a = ipaddress.IPv6Address(s)
        except ValueError:
            m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", s)
            if m:
                raise BadInput(f"{spec!r} is an address with a port",
                               f"give the address alone ({m[1] or m[3]}) and the port with --port") from None
            raise BadInput(f"{spec!r} is not a valid IPv6 address", "e.g. fd00:10:244:1::2") from None
        if a.ipv4_mapped is not None:
            v4 = a.ipv4_mapped
            _note(f"{spec} is an IPv4-mapped IPv6 address: tracing IPv4 {v4}", notes)
            a = v4
    if a.is_unspecified:
        raise BadInput(f"{spec!r} is the unspecified address, not an endpoint", "give the endpoint's address or name")
    if a.is_multicast:
        raise BadInput(f"{spec!r} is a multicast address; podtrace follows packets between two endpoints",
                       "give a unicast pod, node or Service address")
    if a.version == 6 and a.is_link_local:
        raise BadInput(f"{spec!r} is a link-local IPv6 address, not a pod, node or Service address",
                       "give the endpoint's global or unique-local address, or its name")
    return str(a)


_NOTED: set[str] = set()


def _note(msg: str, notes: list[str] | None) -> None:
    """A note for the user on stderr, once per process (a spec is parsed more than once)."""
    if notes is not None:
        notes.append(msg)
    elif msg not in _NOTED:
        import sys

        _NOTED.add(msg)
        print(f"podtrace: note: {msg}", file=sys.stderr)


def spelled(kind: str, key: str) -> str:
    """How a user types the endpoint: NS/POD, svc/NS/NAME, node/NAME."""
    return {"service": f"svc/{key}", "node": f"node/{key}"}.get(kind, key)


def close(word: str, choices: list[str], n: int = 3) -> list[str]:
    """The choices nearest to `word` (difflib), quick even among a large cluster's names."""
    if len(choices) > _CLOSE_MAX:
        # difflib over every name of a large cluster takes seconds: compare with the names
        # of the same namespace, or sharing the first letters, only.
        ns = word.split("/", 1)[0] + "/" if "/" in word else None
        narrowed = [c for c in choices if ns and c.startswith(ns)]
        if not narrowed or len(narrowed) > _CLOSE_MAX:
            stem = word[: max(3, len(word) * 2 // 3)]
            narrowed = [c for c in (narrowed or choices) if c.startswith(stem)][:_CLOSE_MAX]
        choices = narrowed
    return difflib.get_close_matches(word, choices, n=n, cutoff=0.5)


def hint(name: Name, pods: list[str] = (), services: list[str] = (), nodes: list[str] = (),
         fallback: str = "list them with `podtrace lab status` or kubectl") -> str:
    """What to type instead of an unknown name: the same name as another kind first (exact),
    then the nearest names of its own kind, then of the other kinds. `pods` and `services`
    are NS/NAME keys, `nodes` node names: whatever the caller could list."""
    bare = name.name
    exact: list[str] = []
    if name.kind != "node" and bare in nodes:
        exact.append(spelled("node", bare))
    if name.kind != "service":
        same_ns = f"{name.namespace or DEFAULT_NAMESPACE}/{bare}"
        exact += [spelled("service", k) for k in sorted(services, key=lambda k: k != same_ns)
                  if k.rsplit("/", 1)[-1] == bare]
    if name.kind != "pod":
        pod = f"{name.namespace or DEFAULT_NAMESPACE}/{bare}"
        exact += [pod] if pod in pods else []
    if name.kind in ("pod", "service"):   # the same name in another namespace
        own_keys = pods if name.kind == "pod" else services
        exact += [spelled(name.kind, k) for k in own_keys if k.rsplit("/", 1)[-1] == bare and k != name.key]
    if exact:
        return f"did you mean {', '.join(exact[:3])}?"
    own = {"pod": pods, "service": services, "node": nodes}[name.kind]
    near = [spelled(name.kind, k) for k in close(name.key, list(own))]
    if not near:
        near = [spelled("node", k) for k in close(bare, list(nodes))]
        near += [spelled(kind, k) for kind, keys in (("pod", pods), ("service", services)) if kind != name.kind
                 for k in close(name.key, list(keys), n=2)]
    return f"did you mean {', '.join(near[:3])}?" if near else fallback
