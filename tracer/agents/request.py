"""The trace request a coordinator sends an agent, typed; dicts only on the wire."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REQUEST_VERSION = 1


@dataclass(frozen=True)
class ProbeRequest:
    """Probe packets the agent sends from a pod on its node."""

    netns: str | None        # the pod's namespace path; None: the agent finds it by `src`
    src: str                 # the pod's address
    dst: str                 # the resolved destination address (nothing else is ever probed)
    proto: str               # icmp | tcp | udp
    port: int | None
    count: int
    timeout: float
    interval: float
    size: int | None = None
    sport: int | None = None
    settle: float = 0.05     # wait after the last answer for late events


@dataclass(frozen=True)
class Discovery:
    """On a real node: what the agent looks for itself (the pods' namespaces and devices)."""

    pod_ips: list[str] = field(default_factory=list)
    node_ips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AgentRequest:
    """What one agent traces: its node, the addresses, the devices, and for how long."""

    node: str
    addrs: list[str]
    node_netns: str | None = None          # the lab node's namespace name; None: this host
    netns_filter: list[int] | None = None  # namespace inodes to keep events from; None: all
    tc_devices: list[tuple[str | None, str]] | str = field(default_factory=list)   # or "auto"
    discover: Discovery | None = None
    probe: ProbeRequest | None = None
    # "all": observers on every tc device; None: only when another tc program runs on one
    # (PODTRACE_TC_OBSERVERS; left out of the request then, as agents before it expect)
    tc_observers: str | None = None
    sample: int = 1
    budget: int = 0
    max_seconds: float = 3600.0
    version: int = REQUEST_VERSION

    def to_wire(self) -> dict:
        d = asdict(self)
        if isinstance(self.tc_devices, list):
            d["tc_devices"] = [list(t) for t in self.tc_devices]
        return {k: v for k, v in d.items() if v is not None or k in ("node_netns", "netns_filter")}

    @classmethod
    def from_wire(cls, d: dict) -> "AgentRequest":
        """Raises ValueError/TypeError/KeyError on a malformed request."""
        if not isinstance(d, dict) or d.get("version") != REQUEST_VERSION:
            raise ValueError(f"unsupported request (want version {REQUEST_VERSION})")
        tc = d.get("tc_devices", [])
        probe = d.get("probe")
        disc = d.get("discover")
        return cls(node=str(d["node"]), addrs=[str(a) for a in d["addrs"]], node_netns=d.get("node_netns"),
                   netns_filter=None if d.get("netns_filter") is None else [int(i) for i in d["netns_filter"]],
                   tc_devices=tc if tc == "auto" else [(ns, str(dev)) for ns, dev in tc],
                   discover=Discovery(**disc) if disc else None,
                   probe=ProbeRequest(**probe) if probe else None, tc_observers=d.get("tc_observers"),
                   sample=int(d.get("sample", 1)), budget=int(d.get("budget", 0)),
                   max_seconds=float(d.get("max_seconds", 3600)))
