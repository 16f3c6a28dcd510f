"""Running the notebooks headless as a user's Jupyter would, under MPLBACKEND=Agg (what CI
sets): a failing cell fails, and every cell that draws must show its picture."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DRAWS = ("plt.", "plot_path(", ".plot(")


def plotting_cells(nb) -> list[int]:
    """Indexes of the code cells that draw a figure."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(d in c.source for d in DRAWS)]


def images(cell) -> int:
    return sum(1 for o in cell.get("outputs", []) if "image/png" in (o.get("data") or {}))


def execute_notebook(name: str, env: dict, tmp_path):
    """Run notebooks/NAME with `env` set; the executed copy is left in tmp_path for a look
    after a failure. Fails when a cell fails or a plotting cell shows no image."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored with outputs"
    old = {k: os.environ.get(k) for k in [*env, "MPLBACKEND"]}
    os.environ.update(env, MPLBACKEND="Agg")
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        nbformat.write(nb, tmp_path / name)
    drawn = plotting_cells(nb)
    assert drawn, f"{name}: no plotting cell found"
    blank = [i for i in drawn if not images(nb.cells[i])]
    assert not blank, f"{name}: plotting cells {blank} produced no image/png (see {tmp_path / name})"
    return nb
