"""A trace file is never written over an existing one unless --force: `flow --save` and
`capture -w` refuse before tracing starts (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tracer.errors import BadInput
from tracer.outfile import refuse_existing

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.mark.parametrize("argv", [["flow", "pod-1-1", "pod-2-1", "--save"], ["capture", "-d", "1", "-w"],
                                  ["capture", "--write"]])
def test_an_existing_file_is_refused_before_tracing(tmp_path, argv):
    f = tmp_path / "trace.parquet"
    f.write_bytes(b"kept")
    res = _cli(*argv, str(f))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"podtrace: {f} exists; use --force to overwrite"]
    assert f.read_bytes() == b"kept"


def test_force_lets_it_through(tmp_path):
    f = tmp_path / "trace.parquet"
    f.write_bytes(b"kept")
    refuse_existing(str(tmp_path / "new.parquet"), False)
    refuse_existing(str(f), True)
    with pytest.raises(BadInput):
        refuse_existing(str(f), False)
    # with --force the command goes on (here to reading its cluster file, which is missing)
    res = _cli("flow", "pod-1-1", "pod-2-1", "--save", str(f), "--force", "--cluster", str(tmp_path / "no.json"))
    assert res.returncode == 2 and "exists;" not in res.stderr and "no.json does not exist" in res.stderr, res.stderr
