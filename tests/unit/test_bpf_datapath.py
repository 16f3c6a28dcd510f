"""The eBPF datapath pieces that need no kernel: naming a tc program that dropped a packet,
where observers go before someone else's filters, the lab's flavour keys and map keys."""

from __future__ import annotations

from tests.unit.test_diagnose import cause, ev, facts, hop, judged, packet
from tracer.kernel import tc
from tracer.lab import cilium_ebpf
from tracer.lab import topology as T
from tracer.lab import scenarios as S

PROG = {"pref": 10, "name": "cil_from_overlay-cilium_vxlan", "prog_name": "cil_from_overla", "id": 4242}


def _drop(reason="TC_INGRESS"):
    hops = [hop("node-1", "eth0", "tx", pod="default/a"), hop("node-2", "eth0", "rx"),
            hop("node-2", "cilium_vxlan", "rx")]
    return packet(status="dropped", node="node-2", dev="cilium_vxlan", reason=reason, hops=hops)


def test_a_tc_drop_names_the_program_and_device_and_no_netfilter_rule():
    hit = {"table": "filter", "chain": "FORWARD", "base_chain": "FORWARD", "index": 1,
           "rule": "-A FORWARD -j DROP", "target": "DROP", "packets": 3, "comment": None}
    f = facts(tc={"cilium_vxlan": {"ingress": [PROG]}})
    assert cause(_drop(), ev(f, rule_hits={"node-2": [hit]})) == "bpf-drop"
    v = judged()
    assert "Dropped in BPF on node-2's cilium_vxlan (tc ingress)" in v.hint
    assert "cil_from_overla (id 4242, tc pref 10" in v.hint and "FORWARD" not in v.hint
    assert v.runbook == "docs/runbooks/tc-drop.md"
    assert v.evidence["tc"] == {"dev": "cilium_vxlan", "direction": "ingress", "programs": [PROG]}


def test_several_programs_on_the_hook_are_all_named_and_egress_is_egress():
    other = dict(PROG, pref=20, prog_name="cil_policy", id=7)
    f = facts(tc={"cilium_vxlan": {"egress": [PROG, other]}})
    assert cause(_drop("TC_EGRESS"), ev(f)) == "bpf-drop"
    assert "one of the BPF programs cil_from_overla (id 4242" in judged().hint
    assert "cil_policy (id 7" in judged().hint and "(tc egress)" in judged().hint


def test_a_tc_drop_with_no_program_left_says_so():
    assert cause(_drop(), ev(facts(tc={}))) is None
    assert "none is attached there now" in judged().hint


class _F(dict):
    def __init__(self, prio, name):
        super().__init__(info=prio << 16)
        self.name = name

    def get_attr(self, key):
        return _Opts(self.name) if key == "TCA_OPTIONS" else None


class _Opts:
    def __init__(self, name):
        self.name = name

    def get_attr(self, key):
        return self.name


def test_observers_go_before_someone_elses_filters_when_there_is_room():
    assert tc.before_prio([]) is None
    assert tc.before_prio([_F(49152, "podtrace:ingress:1:2")]) is None      # only ours
    assert tc.before_prio([_F(10, "cil_from_container-lxc1")]) == 8
    assert tc.before_prio([_F(10, "x"), _F(8, "y")]) == 6                     # before the first
    assert tc.before_prio([_F(10, "x"), _F(9, "y"), _F(7, "z")]) == 5
    assert tc.before_prio([_F(1, "cil_from_container")]) is None             # no room before pref 1
    assert tc.before_prio([_F(2, "x")]) is None
    # our usual pair already runs first (a tunnel filter at 65000): no second pair
    assert tc.before_prio([_F(65000, "calico-ipip-encap")], 49152) is None
    assert tc.before_prio([_F(10, "x")], 49152) == 8


def test_the_ebpf_flavour_and_its_scenarios():
    assert S.flavour_key({"cni": "cilium", "datapath": "ebpf"}) == "cilium-ebpf"
    assert S.flavour_key({"cni": "cilium"}) == "cilium" and S.flavour_key({}) == "flannel"
    assert S.applies_to(S.get("bpf-policy-drop")) == ["cilium-ebpf"]
    assert "cilium-ebpf" not in S.applies_to(S.get("netpol-drop"))
    assert S.unsupported("cilium-ebpf", "netpol-drop")


def test_datapath_option_is_checked():
    import pytest

    from tracer.errors import BadInput

    assert T.LabConfig(cni="cilium", datapath="ebpf").datapath == "ebpf"
    for kw in ({"cni": "flannel", "datapath": "ebpf"}, {"cni": "cilium", "datapath": "xdp"},
               {"cni": "cilium", "datapath": "ebpf", "ip_family": "dual"}):
        with pytest.raises(BadInput):
            T.LabConfig(**kw)
    doc = T.status_document(T.plan(T.LabConfig(cni="cilium", datapath="ebpf"), created_at="x"))
    assert doc["datapath"] == "ebpf"
    assert "datapath" not in T.status_document(T.plan(T.LabConfig(), created_at="x"))


def test_policy_map_keys_are_the_packets_bytes():
    assert cilium_ebpf.policy_key_hex("10.244.1.2", "10.244.2.2") == \
        ["0a", "f4", "01", "02", "0a", "f4", "02", "02"]
    assert cilium_ebpf._u32("10.0.0.1") == 0x0100000A and cilium_ebpf._u16(80) == 0x5000
