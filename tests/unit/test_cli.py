"""The command line (tracer/cli/): every command found by its module path, loaded only when
used, every example of every help text parsed by the real commands, errors as one line with
the contract's exit code."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tracer.cli.main import COMMANDS, main
from tracer.errors import ExitStatus

ROOT = Path(__file__).resolve().parents[2]


def _commands(group: click.Group, ctx: click.Context, path: str = "podtrace"):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield f"{path} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, click.Context(cmd, parent=ctx, info_name=name), f"{path} {name}")


def _examples(text: str) -> list[str]:
    """The `podtrace …` command lines of a help text's Examples, without sudo, environment
    assignments, comments or what a pipe hands the output to."""
    out = []
    for line in text.splitlines():
        if "podtrace " not in line.split("#", 1)[0]:
            continue            # prose, not a command line
        words = shlex.split(line, comments=True)
        words = words[:words.index("|")] if "|" in words else words
        while words and (words[0] == "sudo" or "=" in words[0]):
            words.pop(0)
        if words[:1] == ["podtrace"]:
            out.append(words)
    return out


def test_every_command_comes_from_its_module():
    ctx = click.Context(main, info_name="podtrace")
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        assert isinstance(cmd, click.Command) and cmd.name == name


def test_every_example_in_the_help_parses():
    """Each example is parsed by the command it names, options and values validated as a
    user typing it would see them (nothing runs)."""
    ctx = click.Context(main, info_name="podtrace")
    seen = 0
    for path, cmd in [("podtrace", main), *_commands(main, ctx)]:
        for words in _examples(cmd.help or ""):
            group, parent, args = main, click.Context(main, info_name="podtrace"), words[1:]
            while isinstance(group, click.Group) and args and not args[0].startswith("-"):
                name, sub, args = group.resolve_command(parent, args)
                parent = click.Context(sub, parent=parent, info_name=name)
                group = sub
            try:
                group.make_context(parent.info_name, list(args), parent=parent.parent)
            except click.UsageError as exc:
                pytest.fail(f"`{' '.join(words)}` in the help of `{path}`: {exc.format_message()}")
            seen += 1
    assert seen >= 20


def test_help_loads_no_tracing_code():
    """`podtrace lab --help` and a usage error answer without importing what tracing needs."""
    code = ("import sys; from tracer.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    loaded = [m for m in ('tracer.runs.flow', 'tracer.kernel.program', 'tracer.runs.capture', 'pandas')"
            " if m in sys.modules]\n"
            "    print(loaded, e.code)\n")
    for args in (["lab", "--help"], ["flow", "--bogus"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert out.stdout.strip().splitlines()[-1] in ("[] 0", "[] 2"), (args, out.stdout, out.stderr)


def test_the_flow_machinery_leaves_pandas_to_after_the_start():
    """`flow` imports pandas in a thread once its programs load and its agents start: the
    modules it needs before then import none of it (nor pyarrow)."""
    code = ("import sys, tracer.runs.flow, tracer.runs.plan, tracer.agents.agent\n"
            "print([m for m in ('pandas', 'pyarrow') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_errors_are_one_line_with_the_contracts_exit_code():
    runner = CliRunner()
    res = runner.invoke(main, ["flow", "a", "b", "--no-probe", "--count", "2"])
    assert res.exit_code == ExitStatus.BAD_INPUT == 2
    assert res.output == ("podtrace: --count applies to probes, and --no-probe sends none; "
                          "drop them, or drop --no-probe\n")
    res = runner.invoke(main, ["flow", "a"])
    assert res.exit_code == 2 and res.output.startswith("podtrace: Missing argument 'DST'")
    assert len(res.output.splitlines()) == 1
    res = runner.invoke(main, ["nope"])
    assert res.exit_code == 2 and "No such command 'nope'" in res.output


def test_the_entry_points_name_the_group():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"podtrace": "tracer.cli:main", "kubectl-hoptrace": "tracer.cli.main:kubectl_plugin"}
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "version" in out.stdout
