"""Healthy-path soak: on a healthy lab every flow is `ok` — no false alarm.

One flannel lab for the module. Every ordered pair of pods (ICMP, TCP and UDP to the
responder's port) and every pod to each Service port, traced in-process in the single-process
mode (a third of them each day, in turn); a rotated subset of them through one agent per node; a few through the command line,
with and without `--single-process`; and `--no-probe` over background traffic in both modes.
Every flow must exit 0 / verdict ok, every packet delivered, every probe answered, and the
summary must agree with the verdict.

The flows come from the lab's plan (the same for the same config), checked against the built
lab's inventory when the lab is up. PODTRACE_SOAK_OFFSET picks the agents subset's rotation
(default: the day of the year, so successive days cover every flow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import todays_share
from tests.integration.lab_fixture import LAB_PREFIX, private_lab, run_cli
from tracer.config import FlowConfig
from tracer.lab import topology as T
from tracer.node import netns
from tracer.runs.flow import run_flow

pytestmark = pytest.mark.integration

PREFIX = LAB_PREFIX + "sk"
COUNT = 3
PLAN = T.plan(T.LabConfig(prefix=PREFIX))
AGENTS_STRIDE = 13  # coprime to the 3 protocols and 2 Service ports: the subset mixes them all
OFFSET = int(os.environ.get("PODTRACE_SOAK_OFFSET", time.gmtime().tm_yday)) % AGENTS_STRIDE


def _flows(plan: T.LabPlan) -> list[tuple[str, str, str, int | None]]:
    """(src, dst, proto, port): every ordered pair of pods with ICMP and the responder's TCP
    and UDP port, then every pod to every port of every Service."""
    out = []
    pods = [f"{p.namespace}/{p.name}" for p in plan.pods]
    for a in pods:
        for b in pods:
            if a != b:
                out += [(a, b, "icmp", None), (a, b, "tcp", T.APP_PORT), (a, b, "udp", T.APP_PORT)]
    for a in pods:
        for s in plan.services:
            out += [(a, f"svc/{s.namespace}/{s.name}", port.protocol.lower(), port.port) for port in s.ports]
    return out


FLOWS = _flows(PLAN)
AGENT_FLOWS = FLOWS[OFFSET::AGENTS_STRIDE]
# In-process: a sixth of the flows, the others on the next five days (the suite's time is
# bounded; tests/conftest.py todays_share).
SINGLE_FLOWS = todays_share(FLOWS, 6)


def _id(flow) -> str:
    src, dst, proto, port = flow
    return f"{src.split('/')[-1]}>{dst.replace('svc/default/', 'svc-').replace('default/', '')}/{proto}" + (f":{port}" if port else "")


@pytest.fixture(scope="module")
def sklab():
    with private_lab(PREFIX) as doc:
        # The flows were planned before the lab was up: the lab must be that plan.
        assert {(p["namespace"], p["name"], p["ip"]) for p in doc["pods"]} == \
            {(p.namespace, p.name, p.ip) for p in PLAN.pods}
        assert {(s["name"], s["cluster_ip"], tuple((q["protocol"], q["port"]) for q in s["ports"]))
                for s in doc["services"]} == \
            {(s.name, s.cluster_ip, tuple((q.protocol, q.port) for q in s.ports)) for s in PLAN.services}
        assert doc["cni"] == "flannel"
        yield doc


# ---------------------------------------------------------------------------------------
# What a healthy answer is

def _packet_line(p) -> str:
    v = p.verdict
    return (f"  {p.direction} seq={p.seq}: {v.status} at {v.node}/{v.dev} reason={v.reason} cause={v.cause}"
            f" hint={v.hint!r}")


def _probed_problems(r, count: int = COUNT) -> list[str]:
    """Everything that is not a healthy probed flow, said plainly (empty: healthy)."""
    bad = []
    if r.verdict.status != "ok":
        bad.append(f"verdict {r.verdict.status}: {r.verdict.summary}; {list(r.verdict.problems)}")
    want = f"{count}/{count} delivered, {count}/{count} answered"
    if r.verdict.summary != want:
        bad.append(f"verdict summary {r.verdict.summary!r}, not {want!r}")
    s = r.summary
    if (s["probes"], s["delivered"], s["answered"]) != (count, count, count):
        bad.append(f"summary probes/delivered/answered {s['probes']}/{s['delivered']}/{s['answered']}, "
                   f"not {count}/{count}/{count}; verdict {r.verdict.summary!r}")
    if [pr.outcome for pr in r.probes] != ["answered"] * count:
        bad.append(f"probe outcomes {[(pr.seq, pr.outcome, pr.detail) for pr in r.probes]}")
    for direction in ("request", "reply"):
        seqs = {p.seq for p in r.packets if p.direction == direction}
        if seqs != set(range(1, count + 1)):
            bad.append(f"{direction} packets seen for probes {sorted(seqs)}, not 1..{count}")
    bad += [_packet_line(p) for p in r.packets if p.verdict.status != "delivered"]
    if s["events_lost"]:
        bad.append(f"{s['events_lost']} events lost")
    return bad


class PartialView(AssertionError):
    """A watched (--no-probe) flow that blames a gap in the view: a packet seen before every
    agent on its path was ready reported lost, or `summary` figures other than the verdict's."""


def _hairpin(r) -> set[int]:
    """The probes a Service sent back to the client itself: the request ends in the client."""
    return {p.seq for p in r.packets if p.direction == "request" and r.dst.service is not None
            and p.hops and p.hops[-1].pod == r.src.pod.key}


def _passive_problems(r, mode: str, counted: set = frozenset()) -> tuple[list[str], list[str]]:
    """A --no-probe run over healthy traffic: (problems, partial-view problems). Every packet
    seen is delivered (or `partial`: seen while an observer on its path was not tracing),
    the verdict is ok and its figures are the summary's. A drop at a (node, device) in
    `counted` is one the kernel's link counters also counted: real, so no false alarm."""
    bad: list[str] = []
    partial: list[str] = []
    real = [p for p in r.packets if p.verdict.status == "dropped" and (p.verdict.node, p.verdict.dev) in counted]
    real_ids = {id(p) for p in real}
    if real:
        print("drops the kernel's link counters confirm:\n" + "\n".join(_packet_line(p) for p in real))
    n = len(r.packets)
    delivered = sum(p.verdict.status == "delivered" for p in r.packets)
    if n == 0 or not delivered:
        bad.append(f"no packet delivered of {n} seen: the background traffic was not traced")
    if not r.verdict.summary.startswith(f"{delivered}/{n} packets delivered"):
        bad.append(f"verdict summary {r.verdict.summary!r} disagrees with its {delivered}/{n} delivered packets")
    if r.summary["delivered"] != delivered:
        partial.append(f"summary delivered {r.summary['delivered']}, the verdict {r.verdict.summary!r}")
    for p in r.packets:
        if p.verdict.status in ("delivered", "partial") or id(p) in real_ids:
            continue
        # agents start one after the other: LOST there is the partial view; in one process
        # every hook is attached before the trace starts, so LOST is a false alarm
        (partial if mode == "agents" and p.verdict.status == "lost" else bad).append(_packet_line(p))
    if r.verdict.status != "ok" and not (partial and mode == "agents") and not real:
        bad.append(f"verdict {r.verdict.status}: {r.verdict.summary}; {list(r.verdict.problems)}")
    return bad, partial[:12]


def _check_passive(run: tuple, label: str, mode: str) -> None:
    r, counted = run
    bad, partial = _passive_problems(r, mode, counted)
    assert not bad, f"{label} --no-probe {mode}:\n" + "\n".join(bad + partial)
    if partial:
        raise PartialView(f"{label} --no-probe {mode} (verdict {r.verdict.status}: {r.verdict.summary}):\n"
                          + "\n".join(partial))


def _flow(src, dst, proto, port, mode, **kw):
    return run_flow(FlowConfig(src=src, dst=dst, proto=proto, port=port, count=COUNT, lab_prefix=PREFIX,
                               mode=mode, **kw))


# ---------------------------------------------------------------------------------------
# Probed flows, in-process

@pytest.mark.parametrize("flow", SINGLE_FLOWS, ids=[_id(f) for f in SINGLE_FLOWS])
def test_single_process(sklab, flow):
    r = _flow(*flow, mode="single")
    bad = _probed_problems(r)
    assert not bad, f"{_id(flow)} single-process:\n" + "\n".join(bad)


@pytest.mark.parametrize("flow", AGENT_FLOWS, ids=[_id(f) for f in AGENT_FLOWS])
def test_agents(sklab, flow):
    r = _flow(*flow, mode="agents")
    bad = _probed_problems(r)
    assert not bad, f"{_id(flow)} agents (rotation {OFFSET}):\n" + "\n".join(bad)


def test_hairpin_reply_is_traced(sklab):
    """Every pod backs svc/default/echo: a probe the Service sends back to the client itself
    (hairpin: the request is masqueraded to the node's bridge address) has its reply traced
    and delivered too. Runs until a dozen probes include one (4 runs: 1 in 10^6 has none)."""
    for _ in range(4):
        r = run_flow(FlowConfig(src="default/pod-2-1", dst="svc/default/echo", proto="udp", port=80, count=12,
                                lab_prefix=PREFIX, mode="single"))
        assert r.ok, r.verdict
        hairpin = _hairpin(r)
        if hairpin:
            break
    assert hairpin, "no probe of 48 was sent back to the client"
    replies = {p.seq: p.verdict.status for p in r.packets if p.direction == "reply"}
    assert all(replies.get(seq) == "delivered" for seq in hairpin), \
        f"hairpin probes {sorted(hairpin)}: replies {replies}"


# ---------------------------------------------------------------------------------------
# The command line, as a user runs it

CLI_FLOWS = [
    ("default/pod-1-1", "default/pod-2-2", "tcp", T.APP_PORT, []),
    ("default/pod-1-2", "svc/default/web", "udp", 80, ["--single-process"]),
]


@pytest.mark.parametrize("src,dst,proto,port,extra", CLI_FLOWS,
                         ids=[_id(f[:4]) + ("-single" if f[4] else "-agents") for f in CLI_FLOWS])
def test_cli(sklab, src, dst, proto, port, extra):
    res = run_cli("flow", src, dst, "--proto", proto, "--port", str(port), *extra, "-o", "json",
                  prefix=PREFIX, timeout=60, PODTRACE_FLOW_MODE="agents")
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
    doc = json.loads(res.stdout)
    assert doc["verdict"]["status"] == "ok", doc["verdict"]
    assert doc["verdict"]["summary"] == f"{COUNT}/{COUNT} delivered, {COUNT}/{COUNT} answered"
    s = doc["summary"]
    assert (s["probes"], s["delivered"], s["answered"]) == (COUNT, COUNT, COUNT), s
    assert all(p["verdict"]["status"] == "delivered" for p in doc["packets"]), \
        [(p["direction"], p["seq"], p["verdict"]) for p in doc["packets"] if p["verdict"]["status"] != "delivered"]
    # the mode that ran: agents report their start times, the single process does not
    assert ("agent_start_s" in doc["timings"]) == (not extra), doc["timings"]


# ---------------------------------------------------------------------------------------
# --no-probe over background traffic

class Background:
    """UDP requests from a pod's namespace to an address, one every `every` seconds, each
    answered by the responder, until stopped. One socket: one conntrack flow, like an app."""

    def __init__(self, ns: str, ip: str, port: int, every: float = 0.02):
        self.sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.5)
        self.addr, self.every = (ip, port), every
        self.sent = self.answered = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                self.sock.sendto(b"soak", self.addr)
                self.sent += 1
                self.sock.recvfrom(256)
                self.answered += 1
            except OSError:
                pass
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        assert _wait(lambda: self.answered > 0, 5), "the background traffic gets no answer"
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _wait(pred, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _passive(sklab, src: str, dst: str, mode: str):
    pod = next(p for p in sklab["pods"] if p["name"] == src)
    if dst.startswith("svc/"):
        ip, port = next(s["cluster_ip"] for s in sklab["services"] if s["name"] == dst.split("/")[-1]), 80
    else:
        ip, port = next(p["ip"] for p in sklab["pods"] if p["name"] == dst), T.APP_PORT
    before = _link_drops(sklab)
    with Background(pod["netns"], ip, port) as bg:
        r = run_flow(FlowConfig(src=src, dst=dst, proto="udp", port=port, probe=False, duration=1.5,
                                lab_prefix=PREFIX, mode=mode))
    after = _link_drops(sklab)
    # A late answer (a loaded machine) counts for the next request: the traffic flowed.
    assert bg.answered >= 0.9 * bg.sent, f"background traffic: {bg.answered}/{bg.sent} answered"
    return r, {where for where, n in after.items() if n != before.get(where)}


def _link_drops(doc: dict) -> dict[tuple, tuple]:
    """(node or None for the fabric, device) -> its rx and tx dropped counters, over the
    node's namespace and its pods' (a device name may repeat: the counters are summed)."""
    spaces = [(None, doc["fabric_netns"])] + [(n["name"], n["netns"]) for n in doc["nodes"]] + \
        [(p["node"], p["netns"]) for p in doc["pods"]]
    out: dict[tuple, tuple] = {}
    for node, ns in spaces:
        links = json.loads(subprocess.run(["ip", "-n", ns, "-s", "-j", "link"], capture_output=True, text=True,
                                          check=True).stdout)
        for link in links:
            st = link.get("stats64", {})
            rx, tx = st.get("rx", {}).get("dropped", 0), st.get("tx", {}).get("dropped", 0)
            prev = out.get((node, link["ifname"]), (0, 0))
            out[(node, link["ifname"])] = (prev[0] + rx, prev[1] + tx)
    return out


PASSIVE = [("pod-1-1", "pod-2-1"), ("pod-1-2", "svc/default/web")]
PASSIVE_IDS = [f"{a}>{b.replace('svc/default/', 'svc-')}" for a, b in PASSIVE]


@pytest.mark.parametrize("src,dst", PASSIVE, ids=PASSIVE_IDS)
def test_no_probe_single_process(sklab, src, dst):
    _check_passive(_passive(sklab, src, dst, "single"), f"{src} -> {dst}", "single")


@pytest.mark.parametrize("src,dst", PASSIVE, ids=PASSIVE_IDS)
def test_no_probe_agents(sklab, src, dst):
    _check_passive(_passive(sklab, src, dst, "agents"), f"{src} -> {dst}", "agents")
