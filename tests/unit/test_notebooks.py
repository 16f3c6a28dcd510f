"""The notebooks and the pictures of tracer.analysis, headless under MPLBACKEND=Agg (as CI
runs them) on synthetic trace files: every plotting cell shows an image, the path diagram's
labels do not overlap, times read in the unit a person reads."""

from __future__ import annotations

import itertools

import matplotlib
import pytest

from bench.analysis import synth, synth_flow
from tests.notebook_run import execute_notebook
from tracer import analysis, tracefile
from tracer.kernel import record

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nb")
    arr, meta, _ = synth(3000, drop_rate=0.1)
    tracefile.save(d / "capture.parquet", record.to_frame(arr), meta)
    for drop in (False, True):
        arr, meta = synth_flow(probes=3, drop_requests=drop)
        tracefile.save(d / f"flow-{drop}.parquet", record.to_frame(arr), meta)
    return d


def test_trace_analysis_notebook_draws_every_plot(files, tmp_path):
    nb = execute_notebook("trace_analysis.ipynb", {"PODTRACE_TRACE": str(files / "capture.parquet")}, tmp_path)
    assert len([c for c in nb.cells if any("image/png" in (o.get("data") or {}) for o in c.get("outputs", []))]) >= 4


@pytest.mark.parametrize("drop", [False, True])
def test_incident_notebook_draws_the_path(files, tmp_path, drop):
    execute_notebook("incident_flow.ipynb", {"PODTRACE_FLOW_TRACE": str(files / f"flow-{drop}.parquet")}, tmp_path)


def test_human_times():
    assert analysis.human_ns(1_617_200) == "1.62 ms"
    assert analysis.human_ns(5_000) == "5 µs"
    assert analysis.human_ns(870) == "870 ns"
    assert analysis.human_ns(2_500_000_000) == "2.5 s"
    assert analysis.human_ns(None) == "-"


def test_path_diagram_labels_do_not_overlap(files):
    import matplotlib.pyplot as plt

    t = analysis.load(files / "capture.parquet")
    h = t.hops
    # a Service packet: its destination changes on the way (DNAT)
    nat = h.groupby("packet")["dst"].nunique(dropna=False)
    p = int(nat[nat > 1].index[0])
    ax = analysis.plot_path(t, p)
    fig = ax.figure
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        texts = [x for x in ax.texts if x.get_text()]
        assert any("dst → " in x.get_text() for x in texts), [x.get_text() for x in texts]
        assert any(x.get_text() == "5 µs" for x in texts)
        boxes = [(x.get_text(), x.get_window_extent(r)) for x in texts]
        clash = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
        assert not clash, clash
        # the Δt and NAT labels sit clear of every hop's box
        labels = [(a, ba) for a, ba in boxes if a.startswith(("dst →", "src →")) or a.endswith((" ns", " µs", " ms"))]
        assert len(labels) >= len(t.path(p)) - 1
        cover = [(a, i) for a, ba in labels for i, patch in enumerate(ax.patches) if ba.overlaps(patch.get_window_extent(r))]
        assert not cover, cover
    finally:
        plt.close(fig)
