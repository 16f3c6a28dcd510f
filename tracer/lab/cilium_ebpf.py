"""The cilium lab's eBPF datapath (`lab up --cni cilium --datapath ebpf`): tc programs that
forward pod traffic as Cilium's do (bpf/lab_cilium.c says what each one does).

One copy of the programs per node (its maps hold that node's endpoints, tunnel routes and
Services), attached in the node's namespace with `direct-action` at tc pref `PREF`: before it
the priorities stay free for observers that want to see a packet before the datapath acts on
it. The programs live as long as their tc filters, that is as long as the node's devices:
`lab down` deletes the namespaces and with them every program and map; nothing is pinned.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from pathlib import Path

from tracer.errors import EnvironmentProblem
from tracer.lab.model import LabPlan, NodePlan, addr_family

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "lab_cilium.c"
PREF = 10               # tc priority of the lab's programs (podtrace's observers go before/after)
INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
STEP = ("loading Cilium-style BPF programs (lxc, cilium_vxlan, cilium_host) and their maps: "
        "endpoints, tunnel, Services, policy")
# program → (device kind, direction)
PROGRAMS = (("cil_from_container", "lxc", "ingress"),
            ("cil_from_overlay", "cilium_vxlan", "ingress"),
            ("cil_from_host", "cilium_host", "egress"))
POLICY_MAP = "cil_policy"


def _u32(ip: str) -> int:
    """An IPv4 address as the u32 the programs read from the packet (network byte order)."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def _u16(port: int) -> int:
    return int.from_bytes(int(port).to_bytes(2, "big"), "little")


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def policy_key_hex(src: str, dst: str) -> list[str]:
    """The bytes of a cil_policy key (source, destination), as `bpftool map update` takes them."""
    return [f"{b:02x}" for b in socket.inet_aton(src) + socket.inet_aton(dst)]


def load(topo: LabPlan) -> dict:
    """Load and attach the programs on every node. Returns, per node name, what was attached
    ({"programs": [{dev, direction, name, id, pref}], "maps": {name: id}}) for the status
    document."""
    from tracer.kernel.program import _bcc, _quiet_stderr

    _bcc()
    if any(addr_family(ip) != 4 for p in topo.pods for ip in (p.ips or (p.ip,))):
        raise EnvironmentProblem("the lab's eBPF datapath forwards IPv4 only",
                                 "use --ip-family ipv4 with --datapath ebpf")
    text = SOURCE.read_text()
    out = {}
    for n in topo.nodes:
        out[n.name] = _load_node(topo, n, text, _quiet_stderr)
    return out


def _links(ns: str) -> dict[str, int]:
    from tracer.kernel.tc import _ipr

    ipr = _ipr(ns)
    try:
        return {ln.get_attr("IFLA_IFNAME"): ln["index"] for ln in ipr.get_links()}
    finally:
        ipr.close()


def _load_node(topo: LabPlan, n: NodePlan, text: str, quiet) -> dict:
    from bcc import BPF

    from tracer.lab.cilium import CILIUM_HOST, CILIUM_OVERLAY

    links = _links(n.netns)
    try:
        with quiet():
            b = BPF(text=text.encode(), cflags=[f"-DVXLAN_IFINDEX={links[CILIUM_OVERLAY]}"])
    except Exception as exc:  # BCC raises bare Exception on compile/load failure
        raise EnvironmentProblem(f"the lab's BPF datapath did not compile or load: {exc}",
                                 "run `podtrace doctor`, or use --datapath legacy") from None
    try:
        _fill(b, topo, n, links)
        fds = {name: b.load_func(name.encode(), BPF.SCHED_CLS).fd for name, _, _ in PROGRAMS}
        targets = []
        for name, kind, direction in PROGRAMS:
            if kind == "lxc":
                targets += [(p.host_veth, name, direction) for p in topo.pods_on(n.index)]
            else:
                targets.append((CILIUM_HOST if kind == "cilium_host" else CILIUM_OVERLAY, name, direction))
        _attach(n.netns, links, targets, fds)
        return describe(n.netns, [(dev, direction) for dev, _, direction in targets])
    finally:
        # The tc filters hold the programs (and the programs their maps): closing our file
        # descriptors leaves the datapath running, owned by the node's devices.
        with contextlib.suppress(Exception):
            b.cleanup()


def _fill(b, topo: LabPlan, n: NodePlan, links: dict[str, int]) -> None:
    eps = b["cil_endpoints"]
    for p in topo.pods_on(n.index):
        v = eps.Leaf()
        v.ifindex = links[p.host_veth]
        v.mac = (type(v.mac))(*_mac(p.mac))
        v.lxc_mac = (type(v.lxc_mac))(*_mac(p.host_mac))
        eps[eps.Key(_u32(p.ip))] = v
    tun = b["cil_tunnel"]
    for k in topo.nodes:
        if k.index != n.index:
            net = k.pod_cidr.split("/")[0]
            tun[tun.Key(_u32(net))] = tun.Leaf(_u32(k.router_ip))
    svcs, bes = b["cil_services"], b["cil_backends"]
    for s in topo.services:
        for port in s.ports:
            proto = socket.IPPROTO_TCP if port.protocol == "TCP" else socket.IPPROTO_UDP
            k = svcs.Key()
            k.vip, k.port, k.proto = _u32(s.cluster_ip), _u16(port.port), proto
            svcs[k] = svcs.Leaf(len(s.backends))
            for i, be in enumerate(s.backends):
                bk = bes.Key()
                bk.vip, bk.port, bk.proto, bk.idx = _u32(s.cluster_ip), _u16(port.port), proto, i
                bv = bes.Leaf()
                bv.ip, bv.port = _u32(be.ip), _u16(port.target_port)
                bes[bk] = bv


def _attach(ns: str, links: dict[str, int], targets: list[tuple[str, str, str]], fds: dict) -> None:
    from tracer.kernel.tc import _ipr

    ipr = _ipr(ns)
    try:
        with_qdisc = set()
        for dev, name, direction in targets:
            idx = links[dev]
            if idx not in with_qdisc:
                ipr.tc("add", "clsact", idx)
                with_qdisc.add(idx)
            # Named as Cilium names its filters: program-device.
            ipr.tc("add-filter", "bpf", idx, ":1", fd=fds[name], name=f"{name}-{dev}",
                   parent=INGRESS if direction == "ingress" else EGRESS, classid=1,
                   direct_action=True, prio=PREF)
    except Exception as exc:  # pyroute2's NetlinkError
        raise EnvironmentProblem(f"attaching the lab's BPF programs in {ns} failed: {exc}",
                                 "run `podtrace doctor` (tc clsact and BPF classifiers are needed)") from None
    finally:
        ipr.close()


def _json(argv: list[str]):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"`{' '.join(argv)}` failed: {proc.stderr.strip()[:200]}")
    return json.loads(proc.stdout or "[]")


def tc_filters(ns: str | None, dev: str, direction: str) -> list[dict]:
    """The BPF filters on a device's tc hook: [{pref, name, prog_name, id}]."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["tc", "-j", "filter", "show", "dev", dev, direction]
    out = []
    for f in _json(argv):
        opts = f.get("options") or {}
        prog = opts.get("prog") or {}
        if f.get("kind") != "bpf" or not prog:
            continue
        out.append({"pref": f.get("pref"), "name": opts.get("bpf_name"),
                    "prog_name": prog.get("name"), "id": prog.get("id")})
    return out


def describe(ns: str, where: list[tuple[str, str]]) -> dict:
    """What the lab attached on these (device, direction) pairs of a node, and the ids of
    its maps (found from the programs, as `bpftool` shows them)."""
    programs, map_ids = [], set()
    for dev, direction in where:
        for f in tc_filters(ns, dev, direction):
            if f["pref"] != PREF:
                continue
            programs.append({"dev": dev, "direction": direction, **f})
    for pid in {p["id"] for p in programs}:
        info = _json(["bpftool", "-j", "prog", "show", "id", str(pid)]) if _bpftool() else {}
        map_ids.update(info.get("map_ids") or [])
    maps = {}
    for mid in sorted(map_ids):
        info = _json(["bpftool", "-j", "map", "show", "id", str(mid)])
        maps[info.get("name")] = mid
    return {"programs": programs, "maps": maps}


def _bpftool() -> bool:
    import shutil

    if shutil.which("bpftool") is None:
        raise EnvironmentProblem("`bpftool` is not installed (the eBPF lab needs it)",
                                 "install it: apt-get install bpftool")
    return True

