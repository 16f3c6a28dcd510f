"""Options spelled once across commands: the lab's --prefix on every command that uses the lab
(the option wins over PODTRACE_LAB_PREFIX; --help shows the default in effect), -w/--write
for the trace file of `flow` and `capture` (`flow --save` kept), -n/--namespace on `flow`."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tracer.cli.main import main

NO_LAB = "ptnolab"


def _params(*path: str) -> dict[str, click.Parameter]:
    ctx = click.Context(main, info_name="podtrace")
    cmd = main
    for name in path:
        cmd = cmd.get_command(ctx, name)
        ctx = click.Context(cmd, parent=ctx, info_name=name)
    return {p.name: p for p in cmd.params}, cmd


def _lab_commands():
    _, lab = _params("lab")
    return sorted(lab.commands)


@pytest.mark.parametrize("path", [("flow",), ("capture",), ("doctor",), ("lab",),
                                  *[("lab", c) for c in ("up", "status", "down", "break", "fix", "scenarios")]])
def test_every_command_of_the_lab_takes_prefix(path):
    params, _ = _params(*path)
    assert "--prefix" in params["prefix"].opts, path


def test_every_lab_command_takes_prefix():
    assert {"up", "status", "down", "break", "fix", "scenarios"} <= set(_lab_commands())
    for name in _lab_commands():
        params, _ = _params("lab", name)
        assert "prefix" in params, name


@pytest.mark.parametrize("args", [["lab", "--help"], ["lab", "status", "--help"], ["flow", "--help"],
                                  ["capture", "--help"], ["doctor", "--help"]])
def test_help_shows_the_prefix_in_effect(monkeypatch, args):
    runner = CliRunner()
    monkeypatch.delenv("PODTRACE_LAB_PREFIX", raising=False)
    out = " ".join(runner.invoke(main, args, terminal_width=200).output.split())
    assert "[default: ptlab]" in out, out
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "mylab")
    out = " ".join(runner.invoke(main, args, terminal_width=200).output.split())
    assert "[default: mylab, from PODTRACE_LAB_PREFIX]" in out, out


@pytest.mark.parametrize("args", [["lab", "--prefix", NO_LAB, "status"], ["lab", "status", "--prefix", NO_LAB]])
def test_lab_prefix_before_or_after_the_command(monkeypatch, args):
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "ptother")    # the option wins
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output == f"podtrace: no lab is up; run: podtrace lab --prefix {NO_LAB} up\n"


def test_lab_prefix_after_the_command_is_checked():
    res = CliRunner().invoke(main, ["lab", "status", "--prefix", "Bad Prefix!"])
    assert res.exit_code == 2 and res.output.startswith("podtrace: bad lab prefix 'Bad Prefix!'")


def test_flow_prefix_reaches_the_run(monkeypatch):
    """`flow --prefix` names the lab the run looks for (the environment's otherwise)."""
    from tracer.runs import plan

    seen = []
    monkeypatch.setattr(plan.os, "geteuid", lambda: 0)

    def load(cluster, kubeconfig, context, lab_prefix, specs, namespace):
        seen.append((lab_prefix, tuple(specs), namespace))
        raise SystemExit(7)
    monkeypatch.setattr(plan.sources, "load", load)
    monkeypatch.setenv("PODTRACE_LAB_PREFIX", "ptother")
    runner = CliRunner()
    runner.invoke(main, ["flow", "web-0", "svc/cart", "-n", "shop", "--prefix", "mylab", "-o", "json"])
    runner.invoke(main, ["flow", "a", "b", "-o", "json"])
    assert seen == [("mylab", ("web-0", "svc/cart"), "shop"), ("ptother", ("a", "b"), None)]


@pytest.mark.parametrize("path,opts", [(("flow",), {"-w", "--write", "--save"}), (("capture",), {"-w", "--write"})])
def test_one_spelling_for_the_trace_file(path, opts):
    params, _ = _params(*path)
    dest = "save" if path == ("flow",) else "output"
    assert opts <= set(params[dest].opts)


@pytest.mark.parametrize("spelling", ["-w", "--write", "--save"])
def test_flow_write_spellings_fill_the_same_parameter(spelling):
    _, cmd = _params("flow")
    ctx = cmd.make_context("flow", ["a", "b", spelling, "t.parquet"])
    assert ctx.params["save"] == "t.parquet"
