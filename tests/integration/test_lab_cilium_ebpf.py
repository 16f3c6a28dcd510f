"""`podtrace lab up --cni cilium --datapath ebpf` on a real kernel: tc programs forward pod
traffic (bpf_redirect_peer into pods, bpf_redirect_neigh into cilium_vxlan), do Service
DNAT and policy in BPF; `podtrace flow` sees every hop on both nodes (tc observers before
the lab's programs and on the pods' own eth0), the DNAT, and names the BPF program and
device of a policy drop. One lab for the module, removed at its end, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tests.integration.lab_fixture import (machine_snapshot, node, ping, pod, private_lab, run_cli,
                                           service, tcp_ask, udp_ask)
from tracer.lab import build, cilium_ebpf, scenarios
from tracer.lab import topology as T
from tracer.node import netns

pytestmark = pytest.mark.integration

PREFIX = "pttesteb"


@pytest.fixture(scope="module")
def eb():
    before = machine_snapshot()
    with private_lab(PREFIX, cni="cilium", datapath="ebpf") as doc:
        ids = {p["id"] for n in doc["bpf"].values() for p in n["programs"]}
        yield doc
    # Nothing left: namespaces, root links, responders, and the programs themselves (freed
    # with the devices whose tc filters held them; the kernel frees them after an RCU grace
    # period, so poll for it).
    assert machine_snapshot()[:2] == before[:2]
    deadline = time.monotonic() + 10
    while (left := ids & _prog_ids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"lab programs still loaded after lab down: {sorted(left)}"


def _prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout or "[]")}


def _filters(ns: str, dev: str, direction: str) -> list[dict]:
    return cilium_ebpf.tc_filters(ns, dev, direction)


def _flow_json(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    res = run_cli("flow", *args, "-o", "json", prefix=PREFIX, timeout=timeout)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {}
    return res.returncode, doc, res.stderr


def _path(packet: dict) -> list[tuple]:
    return [(h["node"], h["pod"], h["dev"], h["point"]) for h in packet["hops"]]


def test_programs_forward_and_netfilter_sees_no_pod_traffic(eb):
    assert eb["datapath"] == "ebpf"
    for n in eb["nodes"]:
        ns, progs = n["netns"], eb["bpf"][n["name"]]["programs"]
        want = {(p["host_veth"], "ingress", "cil_from_contai") for p in eb["pods"] if p["node"] == n["name"]}
        want |= {("cilium_vxlan", "ingress", "cil_from_overla"), ("cilium_host", "egress", "cil_from_host")}
        assert {(p["dev"], p["direction"], p["prog_name"]) for p in progs} == want
        for dev, direction, prog in want:
            assert [(f["pref"], f["prog_name"]) for f in _filters(ns, dev, direction)] == \
                [(cilium_ebpf.PREF, prog)]
        assert set(eb["bpf"][n["name"]]["maps"]) >= {"cil_policy", "cil_endpoints", "cil_services"}
        # kube-proxy replaced: no Service rules in iptables
        assert "KUBE-SERVICES" not in netns.run(ns, "iptables-save").stdout
    a, b, c = pod(eb, "pod-1-1"), pod(eb, "pod-2-1"), pod(eb, "pod-1-2")
    assert ping(a["netns"], b["ip"]) == b["ip"]          # across nodes
    assert ping(a["netns"], c["ip"]) == c["ip"]          # same node (bpf_redirect_peer)
    web = service(eb, "web")
    assert tcp_ask(a["netns"], web["cluster_ip"], 80) == "pod-2-2"    # BPF DNAT and reverse NAT
    assert udp_ask(a["netns"], web["cluster_ip"], 80) == "pod-2-2"
    for n in eb["nodes"]:
        ct = netns.run(n["netns"], "conntrack", "-L").stdout
        assert not [ln for ln in ct.splitlines() if "10.244." in ln or "10.96." in ln], ct


def test_flow_across_nodes_sees_every_hop(eb):
    src, dst = pod(eb, "pod-1-1"), pod(eb, "pod-2-1")
    rc, doc, err = _flow_json("pod-1-1", "pod-2-1", "--count", "2")
    assert rc == 0, err
    assert doc["verdict"]["status"] == "ok"
    for p in doc["packets"]:
        a, b = (src, dst) if p["direction"] == "request" else (dst, src)
        na, nb = a["node"], b["node"]
        want = [(na, f"default/{a['name']}", "eth0", "tx"), (na, None, a["host_veth"], "rx"),
                (na, None, "cilium_vxlan", "tx"), (na, None, "eth0", "tx"),
                (nb, None, "eth0", "rx"), (nb, None, "cilium_vxlan", "rx"),
                (nb, f"default/{b['name']}", "eth0", "rx")]
        assert p["verdict"]["status"] == "delivered"
        hops = [h for h in p["hops"] if h["node"] is not None]
        assert [(h["node"], h["pod"], h["dev"], h["point"]) for h in hops] == want
        seen = {(h["dev"], h["point"], h["pod"]): set(h["seen_by"]) for h in hops}
        # bpf_redirect_peer: no netif_receive_skb in the pod, only its tc ingress hook
        assert seen[("eth0", "rx", f"default/{b['name']}")] == {"tc"}
        # the observer before the lab's program sees what that program redirects
        assert "tc" in seen[(a["host_veth"], "rx", None)] and "tc" in seen[("cilium_vxlan", "rx", None)]
        # the lxc device of the destination never transmits: no hop there
        assert not [h for h in p["hops"] if h["dev"] == b["host_veth"]]
    # podtrace's observers are gone again: only the lab's filter on each hook
    for n in eb["nodes"]:
        assert [f["pref"] for f in _filters(n["netns"], "cilium_vxlan", "ingress")] == [cilium_ebpf.PREF]


def _ping_loop(ns: str, ip: str, stop: threading.Event) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        ping(ns, ip, timeout=0.5, seq=seq)
        stop.wait(0.1)


def test_watching_real_traffic_sees_every_hop(eb):
    """--no-probe over real pings: exit 0, and whole requests and replies crossed every hop
    (the pods' eth0 seen by tc alone after bpf_redirect_peer)."""
    src, dst = pod(eb, "pod-1-1"), pod(eb, "pod-2-1")
    stop = threading.Event()
    pinger = threading.Thread(target=_ping_loop, args=(src["netns"], dst["ip"], stop), daemon=True)
    pinger.start()
    try:
        rc, doc, err = _flow_json("pod-1-1", "pod-2-1", "--no-probe", "--duration", "3")
    finally:
        stop.set()
        pinger.join()
    assert rc == 0, (err, doc.get("verdict"))
    assert doc["verdict"]["status"] == "ok"
    assert {p["verdict"]["status"] for p in doc["packets"]} <= {"delivered", "partial"}
    for direction, (a, b) in (("request", (src, dst)), ("reply", (dst, src))):
        na, nb = a["node"], b["node"]
        want = [(na, f"default/{a['name']}", "eth0", "tx"), (na, None, a["host_veth"], "rx"),
                (na, None, "cilium_vxlan", "tx"), (na, None, "eth0", "tx"),
                (nb, None, "eth0", "rx"), (nb, None, "cilium_vxlan", "rx"),
                (nb, f"default/{b['name']}", "eth0", "rx")]
        whole = [p for p in doc["packets"] if p["direction"] == direction
                 and [(h["node"], h["pod"], h["dev"], h["point"]) for h in p["hops"] if h["node"]] == want]
        assert whole, (direction, [_path(p) for p in doc["packets"][:6]])
        assert all(p["verdict"]["status"] == "delivered" for p in whole)


def test_flow_to_a_service_shows_the_bpf_dnat(eb):
    web = service(eb, "web")
    backend = pod(eb, "pod-2-2")
    rc, doc, err = _flow_json("pod-1-1", "svc/default/web", "--count", "1")
    assert rc == 0, err
    req = next(p for p in doc["packets"] if p["direction"] == "request")
    rep = next(p for p in doc["packets"] if p["direction"] == "reply")
    nat = req["nat"][0]
    assert (nat["type"], nat["node"], nat["backend"]) == ("dnat", "node-1", backend["ip"])
    assert nat["before"]["dst"] == web["cluster_ip"] and nat["after"]["dport"] == T.APP_PORT
    # DNAT in BPF leaves no conntrack entry on any hop
    assert all(h["ct"] is None for h in req["hops"] + rep["hops"])
    assert rep["nat"][0]["type"] == "reverse-dnat" and rep["hops"][-1]["src"] == web["cluster_ip"]
    assert _path(req)[-1] == ("node-2", "default/pod-2-2", "eth0", "rx")


def test_policy_drop_names_program_and_device(eb):
    assert "bpf-policy-drop" in [r["name"] for r in scenarios.listing(scenarios.Lab(eb))
                                 if "cilium-ebpf" in r["applies_to"]]
    out = scenarios.break_scenario("bpf-policy-drop", prefix=PREFIX)
    try:
        assert out.show == "podtrace flow pod-1-1 pod-2-1 --prefix pttesteb"
        rc, doc, err = _flow_json("pod-1-1", "pod-2-1", "--count", "1")
        assert rc == 3, err
        req = next(p for p in doc["packets"] if p["direction"] == "request")
        v = req["verdict"]
        assert (v["status"], v["node"], v["dev"], v["reason"], v["cause"]) == \
            ("dropped", "node-2", "cilium_vxlan", "TC_INGRESS", "bpf-drop")
        prog = next(p for p in eb["bpf"]["node-2"]["programs"] if p["dev"] == "cilium_vxlan")
        assert f"cil_from_overla (id {prog['id']}" in v["hint"] and "cilium_vxlan" in v["hint"]
        assert v["runbook"].endswith("docs/runbooks/tc-drop.md")
        assert "netfilter" not in json.dumps(v["evidence"])
    finally:
        scenarios.fix_scenario("bpf-policy-drop", prefix=PREFIX)
    assert ping(pod(eb, "pod-1-1")["netns"], pod(eb, "pod-2-1")["ip"]) == pod(eb, "pod-2-1")["ip"]


def test_scenarios_of_other_flavours_are_refused(eb):
    res = run_cli("lab", "break", "netpol-drop", prefix=PREFIX)
    assert res.returncode != 0 and "cilium-ebpf" in res.stderr
    assert build.status(PREFIX)["datapath"] == "ebpf"
    assert node(eb, "node-1")["overlay"] == "cilium_vxlan"
