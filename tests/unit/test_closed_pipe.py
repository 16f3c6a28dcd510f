"""A command whose reader went away (`podtrace lab scenarios | head -1`) exits quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tracer.errors import ExitStatus


@pytest.mark.parametrize("args", [["lab", "scenarios"], ["lab", "scenarios", "-o", "json"], ["flow", "--help"]])
def test_closed_stdout_exits_quietly(args):
    r, w = os.pipe()
    os.close(r)            # the reader is gone before the first byte: every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "tracer.cli", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=60, env={**os.environ, "PODTRACE_LAB_PREFIX": "ptpipe"})
    finally:
        os.close(w)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == ExitStatus.BROKEN_PIPE


def test_lab_status_into_head_prints_one_line_and_no_error():
    """The shell's way: the reader takes one line and leaves; no traceback, no 'internal error'."""
    proc = subprocess.run(f"{sys.executable} -m tracer.cli lab scenarios | head -1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert len(proc.stdout.splitlines()) == 1
    assert "Error" not in proc.stderr and "internal error" not in proc.stderr


def test_rich_output_into_a_closed_pipe_exits_the_same_way():
    """Tables (rich) into a closed pipe: the same quiet exit as plain lines."""
    code = ("import click, sys\nfrom rich.console import Console\nfrom tracer.cli.main import PodtraceGroup\n"
            "g = PodtraceGroup('podtrace')\n"
            "g.add_command(click.Command('x', callback=lambda: [Console().print(f'row {i}') for i in range(20000)]))\n"
            "g(['x'])\n")
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-c", code], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == ExitStatus.BROKEN_PIPE
