"""Real faults for the lab: `podtrace lab break|fix|scenarios`.

Each scenario injects one fault that happens on real clusters (a NetworkPolicy drop,
`ip_forward` off, a missing flannel route, a stale conntrack entry, ...) into the lab's
network namespaces, with the same kernel objects a real node would have: iptables rules,
sysctls, routes, neighbour and FDB entries, link MTUs, conntrack entries. `fix` undoes
exactly what `break` changed, from a record of the state *before* the change.

registry.py is the scenario table; faults.py and conntrack.py the break actions;
changes.py makes and records each change; undo.py replays the record; record.py keeps it in
broken.json; breakfix.py runs `break` and `fix`; labdoc.py is the lab as they see it.
"""

from tracer.lab.scenarios.breakfix import Outcome, break_scenario, fix_scenario
from tracer.lab.scenarios.conntrack import CT_FILL_MARK, STALE_SPORT
from tracer.lab.scenarios.faults import BLACKHOLE_MTU
from tracer.lab.scenarios.labdoc import Lab, Node, Pod
from tracer.lab.scenarios.record import BROKEN_FILE, broken
from tracer.lab.scenarios.registry import (FLAVOURS, Scenario, all_scenarios, applies_to, flavour_key, flow_command, get,
                                           listing, names, resolve_node, unsupported)

__all__ = ["BLACKHOLE_MTU", "BROKEN_FILE", "FLAVOURS", "CT_FILL_MARK", "STALE_SPORT", "Lab", "Node", "Outcome",
           "Pod", "Scenario", "all_scenarios", "applies_to", "flavour_key", "break_scenario", "broken", "fix_scenario",
           "flow_command", "get", "listing", "names", "resolve_node", "unsupported"]
