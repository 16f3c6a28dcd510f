"""The registry of lab fault scenarios, without privileges: names, descriptions, node
choice and validation, the flow commands that show each fault, the CLI listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracer.errors import BadInput
from tracer.lab import scenarios as S
from tracer.lab.scenarios import changes, conntrack
from tracer.lab import topology as T

NAMES = [
    "netpol-drop", "ip-forward-off", "br-netfilter-off", "conntrack-full", "conntrack-invalid",
    "rp-filter-strict", "mtu-blackhole", "no-route", "fdb-missing", "neigh-wrong",
    "svc-no-endpoints", "stale-udp-conntrack", "pod-input-drop", "pod-mac-wrong",
    "pod-no-route", "pod-pmtu", "pod-gw-neigh", "hostport-unreversed", "link-down", "nft-native-drop",
    "overlay-input-drop", "routing-loop", "icmp-prohibited", "pod-ip-gone",
    "felix-policy-drop", "proxy-arp-off", "bgp-route-withdrawn", "ipip-blocked", "bpf-policy-drop",
]


def _lab(**kw) -> S.Lab:
    kw.setdefault("prefix", "ptlab")
    kw.setdefault("state_dir", "/run/podtrace")
    return S.Lab.planned(T.LabConfig(**kw))


def test_names_are_fixed():
    assert S.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_scenario_has_one_line_and_a_flow_command(name):
    sc = S.get(name)
    assert sc.summary and "\n" not in sc.summary and len(sc.summary) < 200
    assert S.flow_command(sc, _lab()).startswith("podtrace flow ")


def test_defaults_on_the_default_lab():
    lab = _lab()
    expect = {
        "netpol-drop": ("node-2", "pod-1-1 pod-2-1"),
        "ip-forward-off": ("node-1", "pod-1-1 pod-2-1"),
        "br-netfilter-off": ("node-2", "pod-2-1 svc/default/web --proto udp --port 80"),
        "conntrack-full": ("node-1", "pod-1-1 pod-2-1"),
        "conntrack-invalid": ("node-1", "pod-1-1 pod-2-1 --proto tcp --port 8080"),
        "rp-filter-strict": ("node-2", "pod-1-1 pod-2-1"),
        "mtu-blackhole": ("node-1", "pod-1-1 pod-2-1 --size 1450"),
        "no-route": ("node-1", "pod-1-1 pod-2-1"),
        "fdb-missing": ("node-1", "pod-1-1 pod-2-1"),
        "neigh-wrong": ("node-1", "pod-1-1 pod-2-1"),
        "svc-no-endpoints": (None, "pod-1-1 svc/default/web --proto tcp --port 80"),
        "stale-udp-conntrack": ("node-1", "pod-1-1 svc/default/web --proto udp --port 80 --sport 40000 --count 1"),
        "pod-input-drop": ("node-2", "pod-1-1 pod-2-1"),
        "pod-mac-wrong": ("node-2", "pod-1-1 pod-2-1"),
        "link-down": ("node-2", "pod-1-1 pod-2-1"),
        "nft-native-drop": ("node-2", "pod-1-1 pod-2-1"),
        "overlay-input-drop": ("node-2", "pod-1-1 pod-2-1"),
        "pod-ip-gone": ("node-2", "pod-1-1 10.244.2.3"),
    }
    for name, (node, flow) in expect.items():
        sc = S.get(name)
        assert S.resolve_node(sc, lab, None) == node, name
        assert S.flow_command(sc, lab, node) == f"podtrace flow {flow}", name


def test_node_choice_moves_the_flow_command():
    lab = _lab()
    assert S.flow_command(S.get("ip-forward-off"), lab, "node-2") == "podtrace flow pod-2-1 pod-1-1"
    assert S.flow_command(S.get("netpol-drop"), lab, "node-1") == "podtrace flow pod-2-1 pod-1-1"
    lab3 = _lab(nodes=3)
    assert S.flow_command(S.get("no-route"), lab3, "node-3") == "podtrace flow pod-3-1 pod-1-1"
    assert S.resolve_node(S.get("br-netfilter-off"), lab3, None) == "node-3"


def test_unknown_scenario_suggests_close_names():
    with pytest.raises(BadInput) as err:
        S.get("netpol-dorp")
    assert err.value.exit_code == 2 and "netpol-drop" in err.value.line()
    with pytest.raises(BadInput) as err:
        S.get("zzz")
    assert "podtrace lab scenarios" in err.value.line()


def test_bad_node_lists_the_valid_ones():
    with pytest.raises(BadInput) as err:
        S.resolve_node(S.get("no-route"), _lab(), "node-5")
    assert err.value.exit_code == 2
    assert "unknown node 'node-5'" in err.value.message and "node-1, node-2" in err.value.fix


def test_br_netfilter_off_only_where_client_and_backend_share_a_node():
    sc = S.get("br-netfilter-off")
    assert sc.valid_nodes(_lab()) == ["node-2"]
    with pytest.raises(BadInput) as err:
        S.resolve_node(sc, _lab(), "node-1")
    assert "cannot run on node 'node-1'" in err.value.message and err.value.fix == "use one of: node-2"
    with pytest.raises(BadInput):  # the backend has no neighbour to be its client
        S.resolve_node(sc, _lab(pods_per_node=1), None)


def test_cluster_wide_scenario_takes_no_node():
    sc = S.get("svc-no-endpoints")
    assert sc.cluster_wide and S.resolve_node(sc, _lab(), None) is None
    with pytest.raises(BadInput) as err:
        S.resolve_node(sc, _lab(), "node-1")
    assert "without --node" in err.value.line()


def test_one_node_lab():
    lab = _lab(nodes=1)
    for name in ("ip-forward-off", "no-route", "fdb-missing", "neigh-wrong", "rp-filter-strict",
                 "mtu-blackhole", "conntrack-invalid"):
        with pytest.raises(BadInput) as err:
            S.resolve_node(S.get(name), lab, None)
        assert "at least 2 nodes" in err.value.message
    # Same-node scenarios still work: bridged traffic crosses FORWARD and conntrack.
    assert S.flow_command(S.get("netpol-drop"), lab, "node-1") == "podtrace flow pod-1-2 pod-1-1"
    assert S.flow_command(S.get("conntrack-full"), lab, "node-1") == "podtrace flow pod-1-1 pod-1-2"
    assert S.resolve_node(S.get("br-netfilter-off"), lab, None) == "node-1"


def test_stale_backend_is_no_pod():
    lab = _lab(pods_per_node=8)
    stale = conntrack.stale_backend(lab)
    assert stale == "10.244.2.99" and stale not in {p.ip for p in lab.pods}


def test_listing_without_a_lab():
    rows = S.listing()
    assert [r["name"] for r in rows] == NAMES
    wide = next(r for r in rows if r["name"] == "svc-no-endpoints")
    assert wide["cluster_wide"] and wide["default_node"] is None and wide["nodes"] == []


def test_change_records_never_leave_the_lab():
    lab = _lab()
    with pytest.raises(Exception, match="not a namespace of lab ptlab"):
        changes.check_ns(lab, "ptdev-node-1")
    with pytest.raises(Exception, match="not inside a lab namespace"):
        changes.check_argv(lab, ["iptables", "-F"])
    with pytest.raises(Exception, match="not a namespace of lab"):
        changes.check_argv(lab, ["ip", "-n", "default", "route", "flush", "all"])
    changes.check_argv(lab, ["ip", "netns", "exec", "ptlab-node-1", "iptables-save"])


def test_broken_is_empty_without_a_record(tmp_path):
    assert S.broken("ptlab", tmp_path) == {}


def test_cli_lists_scenarios_without_privileges(monkeypatch, tmp_path):
    from tracer.cli.main import main

    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    out = runner.invoke(main, ["lab", "scenarios"])
    assert out.exit_code == 0, out.output
    for name in NAMES:
        assert name in out.output
    assert "podtrace flow pod-1-1 svc/default/web --proto udp --port 80 --sport 40000 --count 1" in out.output
    same = runner.invoke(main, ["lab", "break", "--list"])
    assert same.exit_code == 0 and same.output == out.output
    data = json.loads(runner.invoke(main, ["lab", "scenarios", "-o", "json"]).output)
    assert [d["name"] for d in data] == NAMES
    bad = runner.invoke(main, ["lab", "break", "nope-route"])
    assert bad.exit_code == 2 and "no-route" in bad.output
    missing = runner.invoke(main, ["lab", "break"])
    assert missing.exit_code == 2 and "netpol-drop" in missing.output


def test_nothing_outside_the_lab_reads_what_was_broken():
    """The diagnosis must decide from evidence: no product module names the scenario record
    or imports the scenarios."""
    import tracer

    root = Path(tracer.__file__).parent
    lab = root / "lab"
    readers = []
    for path in root.rglob("*.py"):
        if lab in path.parents:
            continue
        text = path.read_text()
        if any(word in text for word in (S.BROKEN_FILE, "BROKEN_FILE", "lab.scenarios",
                                         "lab import scenarios", "break_scenario")):
            readers.append(str(path.relative_to(root)))
    assert readers == []


# ---------------------------------------------------------------------------------------
# The README's "Lab scenarios" table and the runbooks it points to

ROOT = Path(__file__).resolve().parents[2]


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after `heading`."""
    lines = text[text.index(heading):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]   # past the header and the |---| line


def _scenario_rows() -> dict[str, list[str]]:
    rows = _table_after((ROOT / "README.md").read_text(), "### Lab scenarios")
    assert rows and all(len(r) == 5 for r in rows), rows
    return {r[0].strip("`"): r for r in rows}


@pytest.mark.parametrize("sc", S.all_scenarios(), ids=lambda sc: sc.name)
def test_every_scenario_has_a_readme_row(sc):
    rows = _scenario_rows()
    assert sc.name in rows, f"README.md's Lab scenarios table has no row for {sc.name}"
    _, what, cause, runbook, flavours = rows[sc.name]
    assert what and cause.startswith("`") and cause.endswith("`")
    # the runbook exists and the runbook index has a line for it
    target = runbook[runbook.index("(") + 1:runbook.index(")")]
    assert target.startswith("docs/runbooks/") and (ROOT / target).is_file(), target
    book = Path(target).name
    index = (ROOT / "docs" / "runbooks" / "README.md").read_text()
    assert any(f"]({book})" in line for line in index.splitlines()), f"{book} not in docs/runbooks/README.md"
    # the flavours are the lab's CNIs minus the scenario's not_on
    assert [f.strip() for f in flavours.split(",")] == [c for c in S.FLAVOURS if c not in sc.not_on]
    assert S.applies_to(sc) == [c for c in S.FLAVOURS if c not in sc.not_on]


def test_readme_scenario_causes_are_diagnosis_causes():
    text = (ROOT / "README.md").read_text()
    known = {tok for r in _table_after(text, "## Diagnosis") for tok in r[0].replace("`", "").split(" / ")}
    for name, row in _scenario_rows().items():
        assert row[2].strip("`") in known, f"{name}: cause {row[2]} is not in the Diagnosis table"


def test_readme_lists_no_unknown_scenario():
    assert set(_scenario_rows()) <= set(S.names())


def test_listing_and_cli_say_where_each_scenario_applies(monkeypatch, tmp_path):
    from tracer.cli.main import main

    rows = {r["name"]: r for r in S.listing()}
    assert rows["br-netfilter-off"]["applies_to"] == ["flannel"]
    assert rows["netpol-drop"]["applies_to"] == ["flannel", "cilium", "calico"]
    for sc in S.all_scenarios():
        assert rows[sc.name]["applies_to"] == [c for c in S.FLAVOURS if c not in sc.not_on]
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    out = runner.invoke(main, ["lab", "scenarios"]).output
    assert out.count("applies to: ") == len(S.names())
    assert "applies to: flannel, cilium" in out and "applies to: flannel\n" in out
    data = json.loads(runner.invoke(main, ["lab", "scenarios", "-o", "json"]).output)
    assert {d["name"]: d["applies_to"] for d in data} == {n: r["applies_to"] for n, r in rows.items()}


def test_hints_name_a_lab_that_is_not_the_default():
    """Every command printed as a hint reaches the same lab: `--prefix` when it is not ptlab."""
    assert S.flow_command(S.get("ip-forward-off"), _lab(prefix="pto")) == "podtrace flow pod-1-1 pod-2-1 --prefix pto"
    assert S.flow_command(S.get("ip-forward-off"), _lab()) == "podtrace flow pod-1-1 pod-2-1"
    from tracer.lab.model import prefix_flag
    assert (prefix_flag("pto"), prefix_flag("ptlab"), prefix_flag(None)) == (" --prefix pto", "", "")
    from click.testing import CliRunner

    from tracer.cli.main import main
    out = CliRunner().invoke(main, ["lab", "--prefix", "pto", "scenarios"]).output
    shows = [x for x in out.splitlines() if "show: podtrace flow" in x]
    assert shows and all(x.endswith(" --prefix pto") for x in shows)


def test_listing_with_a_lab_up_shows_only_what_applies_to_its_cni(monkeypatch, tmp_path):
    """With a cilium lab up, `lab scenarios` lists only the scenarios that apply to cilium and
    names the others in one line; without a lab, every scenario with its flavours."""
    from tracer.cli.main import main
    from tracer.lab import build

    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    cfg = T.LabConfig(prefix="ptlab", cni="cilium", state_dir=tmp_path)
    doc = T.status_document(T.plan(cfg, created_at="1970-01-01T00:00:00Z"))
    monkeypatch.setattr(build, "status", lambda prefix, *rest: doc)
    runner = CliRunner()
    skipped = [sc.name for sc in S.all_scenarios() if "cilium" in sc.not_on]
    kept = [n for n in S.names() if n not in skipped]
    assert skipped and kept
    data = json.loads(runner.invoke(main, ["lab", "scenarios", "-o", "json"]).output)
    assert [d["name"] for d in data] == kept
    assert all("cilium" in d["applies_to"] for d in data)
    out = runner.invoke(main, ["lab", "scenarios"])
    assert out.exit_code == 0, out.output
    assert out.output.count("applies to: ") == len(kept)
    assert f"({len(skipped)} more do not apply to the cilium lab ptlab: {', '.join(skipped)})" in out.output
    for name in skipped:
        assert f"\n{name} " not in out.output
