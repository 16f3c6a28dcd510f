"""Security properties of a real run on the lab:

- probes leave the source pod for the resolved DST address only (a packet sniffer in the
  source pod's namespace sees every IPv4 packet leaving it during the trace);
- neither the coordinator nor its agents open a network listener (`ss -ltnup` in the root
  namespace, while the trace runs); the DaemonSet's `agent --serve` listens on 127.0.0.1 only;
- names from the cluster are data: pod and Service names full of shell syntax go through a
  whole trace and nothing runs.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from tests.integration.test_safety_common import (
    SAFE_PREFIX, cli, cli_env, descendants, pod, popen, safe_lab, wait_until,  # noqa: F401  (fixture)
)
from tracer.node import netns
from tracer.config import FlowConfig

PACKET_OUTGOING = 4


class Sniffer:
    """Every IPv4 packet leaving a pod's eth0, from inside its namespace."""

    def __init__(self, ns: str):
        # ETH_P_ALL: only "all protocols" taps see outgoing frames
        self.sock = netns.socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.1)
        self.out: list[tuple[str, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if addr[2] != PACKET_OUTGOING or len(data) < 34 or data[12:14] != b"\x08\x00":
                continue        # incoming, or not IPv4 (ARP)
            ip = data[14:]
            self.out.append((socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ip[9]))

    def close(self) -> list[tuple[str, str, int]]:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()
        return self.out


def _listeners() -> list[str]:
    return subprocess.run(["ss", "-H", "-ltnup"], capture_output=True, text=True, check=True).stdout.splitlines()


def _owned_by(lines: list[str], pids: set[int]) -> list[str]:
    return [line for line in lines if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))]


def test_probes_reach_only_the_named_destination_and_nothing_listens(safe_lab, tmp_path):
    """Two traced flows at once, each watched by a sniffer in its source pod: TCP to a Service
    (pod-1-1 → svc/default/web) and ICMP to a pod (pod-1-2 → pod-2-2). Each source sends to
    its resolved destination only; while the first is paused mid-probing no process of
    podtrace has a listening socket."""
    a, b, b_dst = pod(safe_lab, "pod-1-1"), pod(safe_lab, "pod-1-2"), pod(safe_lab, "pod-2-2")
    vip = next(s for s in safe_lab["services"] if s["name"] == "web")["cluster_ip"]
    before = set(_listeners())
    marks = tmp_path / "marks"
    marks.mkdir()
    sniff_a, sniff_b = Sniffer(a["netns"]), Sniffer(b["netns"])
    icmp_run: dict = {}
    icmp = threading.Thread(target=lambda: icmp_run.update(
        res=cli("flow", "pod-1-2", "pod-2-2", "--count", "2", "-o", "json")))
    try:
        proc = popen("flow", "pod-1-1", "svc/default/web", "--proto", "tcp", "--port", "80", "--count", "2",
                     "-o", "json", PODTRACE_TEST_PAUSE="probing", PODTRACE_TEST_PAUSE_DIR=str(marks),
                     PODTRACE_TEST_PAUSE_S="1", PODTRACE_FLOW_MODE="agents")
        icmp.start()
        try:
            assert wait_until(lambda: any(marks.iterdir()) or proc.poll() is not None, 60)
            assert proc.poll() is None, proc.communicate()
            ours = descendants(proc.pid)
            assert len(ours) >= 3, f"coordinator and agents expected, got {ours}"
            now = _listeners()
            assert not _owned_by(now, ours), _owned_by(now, ours)
            assert not _owned_by([line for line in now if line not in before], ours)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            icmp.join(90)
    finally:
        sent_a, sent_b = sniff_a.close(), sniff_b.close()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["dst"]["ip"] == vip and all(p["dst"] == vip for p in doc["probes"])
    assert len([p for p in sent_a if p[0] == a["ip"]]) >= 2, sent_a     # the SYNs (and the RSTs closing them)
    assert set(sent_a) <= {(a["ip"], vip, 6)}, f"{a['name']} also sent {set(sent_a) - {(a['ip'], vip, 6)}}"
    res = icmp_run["res"]
    assert res.returncode == 0, res.stderr
    assert sent_b and set(sent_b) == {(b["ip"], b_dst["ip"], 1)}, sent_b


def test_agent_serve_listens_on_loopback_only(safe_lab, tmp_path):
    """The DaemonSet's `agent --serve` on a host network: one listener, on 127.0.0.1, nothing
    on the node's addresses (tests/integration/test_agent_server.py attacks it)."""
    token = tmp_path / "token"
    token.write_text("x" * 32)
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "agent", "--serve", "--listen", "127.0.0.1:0",
                             "--token-file", str(token)], env=cli_env(SAFE_PREFIX),
                            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on 127.0.0.1:" in proc.stderr.readline()
        mine = _owned_by(_listeners(), {proc.pid})
        assert len(mine) == 1 and mine[0].split()[1] == "LISTEN" and mine[0].split()[4].startswith("127.0.0.1:"), mine
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_names_from_the_cluster_are_never_executed(safe_lab, tmp_path):
    """Pod, namespace and Service names with shell syntax (a cluster file is input) travel
    through resolution, the agents, reconstruction and the output; nothing runs."""
    # relative: a name with "/" is not a name; a shell would run in the CLI's cwd, "/"
    name = f"pwned-{tmp_path.name}"
    marker = Path("/") / name
    payloads = [f"$(touch {name})", f"`touch {name}`", f"x;touch {name}", f"x|touch {name}",
                f"x&&touch {name}", f"'\"; touch {name}; #"]
    inv = json.loads(Path(safe_lab["inventory"]).read_text())
    items = inv["items"]
    extra = []
    a = next(i for i in items if i["kind"] == "Pod" and i["metadata"]["name"] == "pod-1-1")
    for n, payload in enumerate(payloads):
        evil = copy.deepcopy(a)
        evil["metadata"]["name"] = f"evil{n}{payload}"
        evil["metadata"]["namespace"] = f"ns{payload}" if n % 2 else "default"
        evil["status"]["podIP"] = f"10.250.{n}.1"
        extra.append(evil)
    svc = copy.deepcopy(next(i for i in items if i["kind"] == "Service"))
    svc["metadata"]["name"] = f"svc$(touch {name})"
    svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "10.96.0.77"
    extra.append(svc)
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(dict(inv, items=items + extra)))
    first = f"default/evil0$(touch {name})"
    save = tmp_path / "evil.parquet"
    res = cli("flow", first, f"svc/default/svc$(touch {name})", "--no-probe", "--duration", "0.5",
              "--cluster", str(cluster), "--save", str(save), "-o", "json")
    assert res.returncode in (0, 3), res.stderr
    assert json.loads(res.stdout)["src"]["pod"] == first and "$(touch" in res.stdout
    # every evil name is in the saved metadata; reading and rendering it runs nothing either
    shown = cli("analyze", str(save), "-o", "json")
    assert shown.returncode == 0, shown.stderr
    meta = Path(save).read_bytes()
    assert all(p.encode() in meta for p in payloads[:3])
    assert not marker.exists(), "a name from the cluster file was executed"


def test_flow_config_has_no_command_hooks():
    """Nothing in the flow's options is a command, a template or code to run."""
    for f in FlowConfig.__dataclass_fields__.values():
        assert f.name not in ("cmd", "command", "exec", "hook", "script"), f.name
    assert struct.calcsize("!H") == 2
