"""`podtrace analyze` takes several files, a directory and globs (quoted: expanded by podtrace),
read as one trace; a glob that matches nothing is one line and exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.analysis import synth
from tests.unit.test_analysis import write
from tracer.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("an")
    a = write(d / "trace-a.parquet", *synth(1500, drop_rate=0.2)[:2])
    b = write(d / "trace-b.parquet", *synth(700, drop_rate=0.1)[:2])
    return d, a, b


def _json(args, cwd=None):
    res = CliRunner().invoke(main, ["analyze", *args, "-o", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_several_files_and_a_glob_are_one_trace(files, monkeypatch):
    d, a, b = files
    one = _json([str(a)])["summary"]
    both = _json([str(a), str(b)])
    assert both["file"] == f"{a}, {b}"
    assert both["summary"]["events"] > one["events"]
    monkeypatch.chdir(d)
    globbed = _json(["trace-*.parquet"])      # as the shell hands over a quoted glob
    assert globbed["file"] == "trace-a.parquet, trace-b.parquet"
    assert globbed["summary"] == _json(["trace-a.parquet", "trace-b.parquet"])["summary"]
    assert _json([str(d)])["summary"] == both["summary"]          # a directory


def test_a_glob_matching_nothing_is_bad_input(files, monkeypatch):
    monkeypatch.chdir(files[0])
    res = CliRunner().invoke(main, ["analyze", "nothing-*.parquet"])
    assert res.exit_code == 2
    assert res.output == ("podtrace: nothing-*.parquet: matches no file; give a file written by "
                          "`podtrace capture -w` or `podtrace flow -w`\n")


def test_analyze_shows_the_backend_with_its_port(tmp_path):
    """A Service flow: the destination is the backend pod on its own port (8080), the
    Service keeps its port (80)."""
    from bench.analysis import BACKEND, VIP

    p = write(tmp_path / "svc.parquet", *synth(800)[:2])
    flows = _json([str(p), "--top", "1000"])["flows"]
    svc = [f for f in flows if f["service"] == "default/web"]
    assert svc and all(f["dst"] == VIP and f["dport"] == 80 and f["dst_pod"] == BACKEND
                       and f["dst_pod_port"] == 8080 for f in svc)
    res = CliRunner().invoke(main, ["analyze", str(p), "--top", "1000"], terminal_width=200)
    rows = [r for r in res.output.splitlines() if "default/web" in r]
    assert rows and all(f"{BACKEND}:8080" in r and "default/web:80" in r for r in rows), res.output
    assert f"{BACKEND}:80 " not in res.output
