"""Options of a `flow` run, in one typed object (the CLI fills it; tests build it directly)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer import settings

# A watch keeps at most this many seconds of its event budget in all: a longer watch of a busy
# flow samples more as it runs, so its memory and the work after it stay what a watch of this
# length needs, whatever --duration says.
WATCH_BUDGET_SECONDS = 4.0


@dataclass
class FlowConfig:
    src: str
    dst: str
    proto: str | None = None         # None: icmp, or tcp to a Service's first port
    port: int | None = None
    count: int = 3
    probe: bool = True
    duration: float = 2.0            # --no-probe: how long to watch
    timeout: float = 1.0             # per probe
    interval: float = 0.05           # between probes
    cluster: str | None = None       # --cluster FILE
    kubeconfig: str | None = None    # --kubeconfig FILE (else KUBECONFIG, ~/.kube/config, in-cluster)
    context: str | None = None       # --context NAME
    namespace: str | None = None     # -n NS: of SRC/DST named without one (None: "default")
    lab_prefix: str = field(default_factory=settings.lab_prefix)
    save: str | None = None
    settle: float = 0.05
    size: int | None = None          # IP packet size of ICMP/UDP probes (DF set)
    sport: int | None = None         # fixed source port of TCP/UDP probes
    tc: bool = True                  # also attach tc observers (tcx or clsact) on the path's devices
    sample: int = 1                  # keep 1 packet in N, the same packets on every node
    budget: int = 50_000             # events per second per node before sampling kicks in (0: none)
    ip_family: int | None = None     # --ip-family 4|6 (None: SRC's first family DST has too)
    # how a cluster's agents are reached: "portforward" (their loopback server, through the API
    # server's pods/portforward) or "exec" (`podtrace agent` run through pods/exec)
    transport: str = "portforward"
    # "agents": one agent per node (lab/cluster); "single": in-process. PODTRACE_FLOW_MODE
    # changes the default (the test suite uses "single" where agents are not the subject).
    mode: str = field(default_factory=settings.flow_mode)
    # when the command began (time.monotonic()): `timings.startup_s` counts from here (None:
    # from the start of the run itself, as when a test builds the config)
    t_start: float | None = None

    def watch_budget(self) -> int:
        """Events a second a watch keeps of all nodes together: the budget, and less for a
        watch longer than WATCH_BUDGET_SECONDS, which keeps that many seconds of it in all
        (0: no limit)."""
        if not self.budget:
            return 0
        return max(1, min(self.budget, int(self.budget * WATCH_BUDGET_SECONDS / self.duration)))
