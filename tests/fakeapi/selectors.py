"""Label and field selectors as the API server parses and matches them.

Label selectors take the equality forms (`k=v`, `k==v`, `k!=v`), the set forms (`k in (a,b)`,
`k notin (a,b)`), existence (`k`, `!k`) and `k>N` / `k<N`. Field selectors take `=`, `==`
and `!=` on the fields each kind supports; anything else is refused, as the real server does
with a 400 (`BadSelector`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The fields each kind may be selected by (the real server's field label conversion funcs).
FIELDS = {
    "Pod": {"metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
            "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
            "status.podIP", "status.nominatedNodeName"},
    "Node": {"metadata.name", "spec.unschedulable"},
    "Service": {"metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"},
    "EndpointSlice": {"metadata.name", "metadata.namespace"},
    "Namespace": {"metadata.name", "status.phase"},
    "Endpoints": {"metadata.name", "metadata.namespace"},
    "Event": {"metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.namespace",
              "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion",
              "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason", "reportingComponent",
              "source", "type"},
}
# A boolean field that is absent reads as "false" (spec.hostNetwork of most pods).
FIELD_DEFAULTS = {"spec.hostNetwork": "false", "spec.unschedulable": "false"}

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_SET = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s*(?P<op>!=|==|=|>|<)\s*(?P<value>[^\s!=<>(),]*)$")


class BadSelector(ValueError):
    """A selector the server cannot parse or does not support (answered with 400)."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str                 # "=", "!=", "in", "notin", "exists", "!", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict) -> bool:
        have = labels.get(self.key)
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return have is not None and have in self.values
        if self.op in ("!=", "notin"):
            return have is None or have not in self.values
        try:        # > and <: both sides integers, a missing or non-numeric label never matches
            a, b = int(have), int(self.values[0])
        except (TypeError, ValueError):
            return False
        return a > b if self.op == ">" else a < b


def _split_top(text: str) -> list[str]:
    """Split at the commas outside parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _key(key: str, term: str) -> str:
    if not _KEY.match(key) or len(key.rpartition("/")[2]) > 63:
        raise BadSelector(f'unable to parse requirement: invalid label key "{key}" in "{term}"')
    return key


def _value(value: str, term: str) -> str:
    if len(value) > 63 or not _VALUE.match(value):
        raise BadSelector(f'unable to parse requirement: invalid label value "{value}" in "{term}"')
    return value


def parse_labels(selector: str | None) -> list[Requirement]:
    """The requirements of a label selector (all must hold); BadSelector when malformed."""
    if not selector or not selector.strip():
        return []
    out = []
    for raw in _split_top(selector):
        term = raw.strip()
        if not term:
            raise BadSelector(f'unable to parse requirement: empty requirement in "{selector}"')
        m = _SET.match(term)
        if m:
            values = tuple(v.strip() for v in m["values"].split(","))
            if values == ("",):
                raise BadSelector(f"for 'in', 'notin' operators, values set can't be empty: \"{term}\"")
            out.append(Requirement(_key(m["key"], term), m["op"], tuple(_value(v, term) for v in values)))
            continue
        if term.startswith("!"):
            out.append(Requirement(_key(term[1:].strip(), term), "!"))
            continue
        m = _CMP.match(term)
        if m:
            op = "=" if m["op"] == "==" else m["op"]
            if op in (">", "<") and not re.fullmatch(r"-?[0-9]+", m["value"]):
                raise BadSelector(f'unable to parse requirement: for \'gt\', \'lt\' operators, the value '
                                  f'must be an integer: "{term}"')
            out.append(Requirement(_key(m["key"], term), op, (_value(m["value"], term),)))
            continue
        if re.search(r"[\s=!<>()]", term):
            raise BadSelector(f'unable to parse requirement: cannot understand "{term}"')
        out.append(Requirement(_key(term, term), "exists"))
    return out


def match_labels(obj: dict, requirements: list[Requirement]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in requirements)


def parse_fields(selector: str | None, kind: str) -> list[tuple[str, bool, str]]:
    """(field, negated, value) terms of a field selector for `kind`; BadSelector for a
    malformed term or a field the kind cannot be selected by."""
    if not selector or not selector.strip():
        return []
    allowed = FIELDS.get(kind)
    out = []
    for raw in selector.split(","):
        term = raw.strip()
        m = re.fullmatch(r"(?P<key>[^=!]+?)\s*(?P<op>!=|==|=)\s*(?P<value>.*)", term)
        if not m:
            raise BadSelector(f"invalid selector: '{selector}'; can't understand '{term}'")
        key = m["key"].strip()
        if allowed is not None and key not in allowed:
            raise BadSelector(f'field label not supported: {key}')
        out.append((key, m["op"] == "!=", m["value"]))
    return out


def field_value(obj: dict, path: str) -> str:
    cur = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return FIELD_DEFAULTS.get(path, "")
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def match_fields(obj: dict, terms: list[tuple[str, bool, str]]) -> bool:
    return all((field_value(obj, key) == want) != neg for key, neg, want in terms)
