"""tracer/settings.py: every PODTRACE_* variable read there and nowhere else in the product,
each read when asked (not at import), and listed for users."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tracer import settings
from tracer.config import FlowConfig

ROOT = Path(__file__).resolve().parents[2]
# Test switches and pause points belong to tracer/testhooks.py; the lab reads its own.
NOT_SETTINGS = re.compile(r"PODTRACE_(TEST_\w+|AGENT_CLOCK_SKEW_NS|AGENT_DIE_AFTER_READY)$")


def _environment_reads(path: Path) -> list[tuple[int, str]]:
    """(line, variable) of every os.environ.get / os.getenv / os.environ[...] of a literal."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        arg = None
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            if isinstance(f, ast.Attribute) and (
                    (f.attr == "get" and isinstance(f.value, ast.Attribute) and f.value.attr == "environ")
                    or f.attr == "getenv"):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            arg = node.slice
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append((node.lineno, arg.value))
    return out


def test_no_product_module_reads_a_podtrace_variable_itself():
    bad = []
    for p in sorted((ROOT / "tracer").rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[:2] == ("tracer", "lab") or p.name in ("settings.py", "testhooks.py"):
            continue
        bad += [f"{rel}:{line}: {name}" for line, name in _environment_reads(p)
                if name.startswith("PODTRACE_") and not NOT_SETTINGS.match(name)]
    assert not bad, "PODTRACE_* read outside tracer/settings.py:\n" + "\n".join(bad)


def test_the_table_the_readers_and_the_readme_agree():
    read = {name for _, name in _environment_reads(ROOT / "tracer" / "settings.py")}
    assert read == set(settings.VARIABLES)
    table = set(re.findall(r"^(PODTRACE_\w+)\s", settings.__doc__, re.M))
    assert table == set(settings.VARIABLES)
    readme = (ROOT / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in settings.VARIABLES)


def test_read_when_asked_not_at_import(monkeypatch, tmp_path):
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "ptsettings")
    monkeypatch.setenv("PODTRACE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PODTRACE_FLOW_MODE", "single")
    monkeypatch.setenv("PODTRACE_HOST_PROC", "/host/proc")
    monkeypatch.setenv("PODTRACE_DEBUG", "1")
    assert settings.lab_prefix() == "ptsettings" and settings.state_dir() == tmp_path
    assert settings.host_proc() == Path("/host/proc") and settings.debug()
    cfg = FlowConfig(src="a", dst="b")
    assert cfg.lab_prefix == "ptsettings" and cfg.mode == "single"
    for name in ("PODTRACE_LAB_PREFIX", "PODTRACE_STATE_DIR", "PODTRACE_FLOW_MODE", "PODTRACE_HOST_PROC",
                 "PODTRACE_DEBUG"):
        monkeypatch.delenv(name)
    assert settings.lab_prefix() == "ptlab" and settings.state_dir() == Path("/run/podtrace")
    assert settings.flow_mode() == "agents" and settings.host_proc() == Path("/proc") and not settings.debug()
    assert FlowConfig(src="a", dst="b").lab_prefix == "ptlab"


def test_an_empty_variable_means_the_default(monkeypatch):
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "")
    monkeypatch.setenv("PODTRACE_STATE_DIR", "")
    monkeypatch.setenv("PODTRACE_DEBUG_BPF", "")
    assert settings.lab_prefix() == "ptlab" and settings.state_dir() == Path("/run/podtrace")
    assert not settings.debug_bpf()


def test_a_watch_keeps_four_seconds_of_its_budget_in_all():
    from tracer.config import WATCH_BUDGET_SECONDS

    def watch(duration, budget=50_000):
        return FlowConfig("a", "b", probe=False, duration=duration, budget=budget).watch_budget()
    assert WATCH_BUDGET_SECONDS == 4
    assert watch(2) == watch(4) == 50_000            # short watches: the budget as it is
    assert watch(8) == 25_000 and watch(20) == 10_000 and watch(3600) == 55
    assert watch(20) * 20 == 50_000 * 4
    assert watch(20, budget=0) == 0                   # no limit stays no limit
    assert FlowConfig("a", "b", probe=False, duration=3600, budget=1).watch_budget() == 1
