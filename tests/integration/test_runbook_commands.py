"""Every shell command of every runbook runs against the lab, with the fault it describes.

The runbooks' command blocks are the ```sh blocks of docs/runbooks/*.md. For each runbook the
lab is broken with its scenario (RUNBOOKS; none: the healthy lab), the placeholders are
substituted from `lab status -o json`, and every line runs where the runbook says: on the
node (its network namespace), or inside the pod a `# inside ... pod` comment names. A command
may fail because of the fault (exit non-zero); "command not found" or a usage error fails the
test. One lab for the module (its own prefix), each scenario fixed after its runbook.

Not run, only checked to exist on this machine (they act on the host, not on a namespace):
lines that write under /etc, load modules, mount tracefs or read trace_pipe. `kubectl` has no
API server in the lab: it is a no-op here. `podtrace SUBCOMMAND ...` is checked to be a
command of the CLI (`--help`), not traced (a flow per line would take minutes).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.lab_fixture import REPO_ROOT, node, pod, private_lab, service
from tracer.lab import scenarios
from tracer.lab.scenarios import faults_loop

pytestmark = pytest.mark.integration

PREFIX = "pttestrb"
RUNBOOK_DIR = REPO_ROOT / "docs" / "runbooks"
# runbook: (scenario it describes or None, node its commands run on, source pod, destination pod)
RUNBOOKS = {
    "bad-checksum": (None, "node-2", "pod-1-1", "pod-2-1"),
    "conntrack-full": ("conntrack-full", "node-1", "pod-1-1", "pod-2-1"),
    "conntrack-invalid": ("conntrack-invalid", "node-1", "pod-1-1", "pod-2-1"),
    "ip-forward": ("ip-forward-off", "node-1", "pod-1-1", "pod-2-1"),
    "kernel-drop": (None, "node-2", "pod-1-1", "pod-2-1"),
    "link-down": ("link-down", "node-2", "pod-1-1", "pod-2-1"),
    "mtu": ("mtu-blackhole", "node-1", "pod-1-1", "pod-2-1"),
    "neighbour": ("neigh-wrong", "node-1", "pod-1-1", "pod-2-1"),
    "netfilter-drop": ("netpol-drop", "node-2", "pod-1-1", "pod-2-1"),
    "no-reply": ("pod-input-drop", "node-2", "pod-1-1", "pod-2-1"),
    "no-route": ("no-route", "node-1", "pod-1-1", "pod-2-1"),
    "no-socket": (None, "node-2", "pod-1-1", "pod-2-2"),
    "overlay": ("fdb-missing", "node-1", "pod-1-1", "pod-2-1"),
    "packet-lost": (None, "node-1", "pod-1-1", "pod-2-1"),
    "routing-loop": ("routing-loop", "node-1", "pod-1-1", None),
    "rp-filter": ("rp-filter-strict", "node-2", "pod-1-1", "pod-2-1"),
    "service-no-endpoints": ("svc-no-endpoints", "node-1", "pod-1-1", "pod-2-2"),
    "stale-conntrack": ("stale-udp-conntrack", "node-1", "pod-1-1", "pod-2-2"),
    "tc-drop": (None, "node-2", "pod-1-1", "pod-2-1"),
    "wrong-mac": ("pod-mac-wrong", "node-2", "pod-1-1", "pod-2-1"),
    "wrong-reply": ("br-netfilter-off", "node-2", "pod-2-1", "pod-2-2"),
}
# Runbooks with no command block to run here: the explanations of a verdict, and the
# cilium walk-throughs (their commands are transcripts of the cilium labs).
NO_COMMANDS = {"README", "no-view", "partial-view", "cilium-path", "cilium-ebpf-path", "calico-path"}   # path runbooks: their own lab modules run them
NOT_RUN = re.compile(r"/etc/|modprobe|trace_pipe|tracefs|rmdir|mkdir \$")
USAGE = re.compile(r"command not found|[Uu]sage:|invalid option|unrecognized option|unknown option|"
                   r"Try `|try \"ip help\"|is unknown|Garbage instead|Error: argument|Bad argument|"
                   r"What is \"|invalid argument .* to|Unknown command")
PRELUDE = (
    "kubectl() { :; }\n"   # the lab has no API server
    f"podtrace() {{ PYTHONPATH={REPO_ROOT} {sys.executable} -m tracer.cli \"$1\" --help >/dev/null; }}\n"
)
LINE_TIMEOUT = 3   # then a line is stopped (tcpdump waits for packets): only a missing command or a usage error fails


@pytest.fixture(scope="module")
def rblab():
    with private_lab(PREFIX) as doc:
        yield doc


def blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```sh\n(.*?)```", text, re.S)]


def lines(block: str) -> list[str]:
    """Logical lines: backslash continuations joined, trailing comments kept (bash ignores them)."""
    out, cur = [], ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        out.append((cur + raw).strip())
        cur = ""
    return [line for line in out if line]


def placeholders(doc: dict, node_name: str, src: str, dst: str | None, tmp: Path) -> dict[str, str]:
    n = node(doc, node_name)
    peer = next(x for x in doc["nodes"] if x["name"] != node_name)
    s, d = pod(doc, src), pod(doc, dst) if dst else None
    web = service(doc, "web")
    dst_ip = d["ip"] if d else faults_loop.LOOP_DST
    return {
        "SRC_POD_IP": s["ip"], "SRC_IP": s["ip"], "DST_POD_IP": dst_ip, "DST_IP": dst_ip,
        "DST_POD": dst or dst_ip, "SRC": src, "DST": dst or dst_ip, "DST_CIDR": faults_loop.LOOP_CIDR,
        "DEV": "flannel.1", "POD_NETNS": (d or s)["netns"], "REMOTE_NODE_IP": peer["ip"],
        "PEER_NODE_IP": peer["ip"], "NODE_IP": n["ip"], "NODE": node_name, "NS": "default",
        "NAME": "web", "POD": dst or src, "PORT": "8080", "TARGETPORT": "8080",
        "CLUSTER_IP": web["cluster_ip"], "OLD_POD_IP": scenarios.conntrack.stale_backend(
            scenarios.Lab(doc)), "CHAIN": "FORWARD", "RULE_FROM_THE_HINT": "-j DROP",
        "WRONG_MAC": "0e:00:00:00:ee:03", "ID": "1", "KEY=VALUE": "app=web",
        "KUBE_PROXY_POD": "kube-proxy", "/tmp/": f"{tmp}/",
    }


def substitute(line: str, values: dict[str, str]) -> str:
    for key in sorted(values, key=len, reverse=True):
        if key.startswith("/"):
            line = line.replace(key, values[key])
        else:
            line = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", values[key], line)
    return line


def command_words(line: str) -> list[str]:
    """The command of each simple command in a line (split at |, ;, &&, || outside quotes)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, start = [], True
    for token in lexer:
        if token and set(token) <= set("|;&()<>"):
            start = token not in ("<", ">", ">>", "2>", "&>")
            continue
        if start and not re.match(r"^\w+=", token) and not token[0].isdigit():
            words.append(token)
            start = False
    return words


def exists(word: str) -> bool:
    return word in ("kubectl", "podtrace", "echo", "which", "type", "cd") or shutil.which(word) is not None


def run_runbook(doc: dict, name: str, tmp: Path, text: str | None = None) -> tuple[list[str], int]:
    """Run every command line of one runbook: (the problems found, how many lines ran)."""
    _, node_name, src, dst = RUNBOOKS[name]
    values = placeholders(doc, node_name, src, dst, tmp)
    node_ns = node(doc, node_name)["netns"]
    problems = []
    ran = 0
    if text is None:
        text = (RUNBOOK_DIR / f"{name}.md").read_text()
    for block in blocks(text):
        ns = node_ns
        for line in lines(block):
            if line.startswith("#"):
                low = line.lower()
                if "pod" in low and ("inside" in low or "in the" in low):
                    ns = pod(doc, src if "source" in low else (dst or src))["netns"]
                elif "node" in low:
                    ns = node_ns
                continue
            missing = [w for w in command_words(line) if not exists(w)]
            if missing:
                problems.append(f"{name}: {line!r}: not installed: {', '.join(missing)}")
                continue
            if NOT_RUN.search(line):
                continue
            cmd = substitute(line, values)
            ran += 1
            proc = subprocess.run(["ip", "netns", "exec", ns, "timeout", str(LINE_TIMEOUT),
                                   "bash", "-c", PRELUDE + cmd],
                                  capture_output=True, text=True, timeout=LINE_TIMEOUT + 10,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode == 127 or USAGE.search(proc.stderr):
                problems.append(f"{name}: {cmd!r} in {ns}: rc={proc.returncode}: "
                                f"{proc.stderr.strip()[:300]}")
    return problems, ran


def test_every_runbook_is_mapped():
    names = {p.stem for p in RUNBOOK_DIR.glob("*.md")}
    assert names == set(RUNBOOKS) | NO_COMMANDS
    for name in RUNBOOKS:
        assert blocks((RUNBOOK_DIR / f"{name}.md").read_text()), f"{name}: no ```sh block"
        sc = RUNBOOKS[name][0]
        assert sc is None or sc in scenarios.names()


@pytest.mark.parametrize("name", sorted(RUNBOOKS))
def test_runbook_commands_run(rblab, name, tmp_path):
    scenario = RUNBOOKS[name][0]
    if scenario:
        assert scenarios.break_scenario(scenario, prefix=PREFIX).changed
    try:
        problems, ran = run_runbook(rblab, name, tmp_path)
        assert ran >= 1, f"{name}: no command ran"
    finally:
        if scenario:
            # The runbook's own fix commands may have fixed it already: fix must still work.
            scenarios.fix_scenario(scenario, prefix=PREFIX)
    assert scenarios.broken(PREFIX) == {}
    assert not problems, "\n".join(problems)


def test_a_broken_command_is_caught(rblab, tmp_path):
    """The check itself: a missing command, a usage error and an unknown subcommand fail;
    a command that fails because of the state it finds does not."""
    text = ("```sh\nnosuchcommand --now\nip route gett DST_POD_IP\nconntrack --bogus\n"
            "ip route get 10.255.255.1 from SRC_POD_IP iif DEV   # fails: no such route\n```\n")
    problems, ran = run_runbook(rblab, "packet-lost", tmp_path, text)
    assert ran == 3 and len(problems) == 3, problems
    assert "not installed: nosuchcommand" in problems[0]


def test_plain_curl_gets_the_pod_name(rblab):
    """`curl http://POD_IP:8080/` from a pod (as the runbooks and users do) gets the pod's
    name; through the Service's http port too."""
    src = pod(rblab, "pod-1-1")["netns"]
    for url, name in ((f"http://{pod(rblab, 'pod-2-1')['ip']}:8080/", "pod-2-1"),
                      (f"http://{service(rblab, 'web')['cluster_ip']}/", "pod-2-2")):
        got = subprocess.run(["ip", "netns", "exec", src, "curl", "-sS", "--max-time", "5", url],
                             capture_output=True, text=True, timeout=20)
        assert (got.returncode, got.stdout, got.stderr) == (0, f"{name}\n", ""), (url, got)
