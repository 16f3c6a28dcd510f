"""What `flow` prints for people: widths, the compact view, times, on flows recorded on the lab."""

from __future__ import annotations

import io
import json
import pathlib
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st
from rich.console import Console

from tracer import render
from tracer.node.prober import ProbeResult
from tracer.reconstruct.model import FlowVerdict, Packet
from tracer.render_compact import human_time, middle

DATA = pathlib.Path(__file__).parent / "data"


def _result(name: str):
    """A FlowResult's rendered parts, read back from a recorded `flow -o json`."""
    d = json.loads((DATA / f"{name}.json").read_text())
    ep = lambda e: SimpleNamespace(as_json=lambda: e)   # noqa: E731
    return SimpleNamespace(src=ep(d["src"]), dst=ep(d["dst"]), proto=d["probe"]["proto"], port=d["probe"]["port"],
                           notes=d["notes"], packets=[Packet.from_json(p) for p in d["packets"]],
                           verdict=FlowVerdict(d["verdict"]["status"], d["verdict"]["summary"],
                                               tuple(d["verdict"]["problems"])),
                           summary=d["summary"], probes=[ProbeResult(**p) for p in d["probes"]],
                           timings=d["timings"])


def _render(fn, result, width: int, *args) -> list[str]:
    con = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    fn(result, con, *args)
    return con.export_text().splitlines()


@pytest.mark.parametrize("name", ["flow-healthy", "flow-svc-tcp", "flow-ip-forward-off"])
def test_wide_tables_fit_120_columns_with_direction_and_latency(name):
    lines = _render(render.flow_table, _result(name), 120)
    assert max(len(x) for x in lines) <= 120
    headers = [x for x in lines if x.lstrip().startswith("#")]
    assert headers
    for h in headers:
        cols = [c.strip() for c in h.split("┃")]
        assert cols[0] == "#" and "pt" in cols and "Δt" in cols and "dev" in cols
    # no cell of the fixed columns is squeezed: every Δt is a whole time with its unit
    rows = [x for x in lines if "│" in x]
    for r in rows:
        cells = [c.strip() for c in r.split("│")]
        assert cells[0].isdigit()
        assert "…" not in cells[0]
        assert any(c in ("rx", "tx") or c.isalpha() for c in cells)


def test_healthy_header_at_120_columns():
    lines = _render(render.flow_table, _result("flow-healthy"), 120)
    header = next(x for x in lines if x.lstrip().startswith("#"))
    assert [c.strip() for c in header.split("┃")] == ["#", "node", "pod", "dev", "pt", "Δt", "conntrack", "encap"]
    row2 = next(x for x in lines if x.strip().startswith("2 │"))
    assert "veth" in row2 and " rx " in row2 and " µs" in row2


def test_service_dnat_shows_the_new_addresses_only_where_they_change():
    lines = _render(render.flow_table, _result("flow-svc-tcp"), 120)
    header = next(x for x in lines if x.lstrip().startswith("#"))
    assert "nat" in [c.strip() for c in header.split("┃")]
    assert not any("″" in x and "→" in x and "10.96." in x for x in lines)


def test_80_columns_still_readable():
    lines = _render(render.flow_table, _result("flow-healthy"), 80)
    assert max(len(x) for x in lines) <= 80
    header = next(x for x in lines if x.lstrip().startswith("#"))
    cols = [c.strip() for c in header.split("┃")]
    assert cols[:2] == ["#", "node"] and {"dev", "pt", "Δt"} <= set(cols)
    row = next(x for x in lines if x.strip().startswith("2 │"))
    cells = [c.strip() for c in row.split("│")]
    assert cells[cols.index("pt")] == "rx" and cells[cols.index("Δt")].endswith("µs")
    assert cells[cols.index("dev")].startswith("veth")


def test_compact_healthy_flow_is_a_few_lines():
    lines = [x for x in _render(render.flow_compact, _result("flow-healthy"), 120) if x.strip()]
    assert len(lines) <= 12, "\n".join(lines)
    text = "\n".join(lines)
    assert "3 requests, 3 replys" not in text
    assert "3 requests, 3 replies: same 12-hop path, delivered" in text
    assert "┃" not in text           # no table when all is well
    assert "OK: 3/3 delivered, 3/3 answered" in text


def test_compact_failing_flow_gets_the_failing_tables():
    lines = _render(render.flow_compact, _result("flow-ip-forward-off"), 120)
    text = "\n".join(lines)
    assert text.count("┃ node") == 1          # one full table for the 3 identical drops
    assert "the same path and verdict for 2 requests (probes 2, 3)" in text
    assert "DROPPED" in text and "IP_INADDRERRORS" in text
    assert max(len(x) for x in lines) <= 120


def test_table_output_is_the_compact_view_wide_is_every_table():
    r = _result("flow-healthy")
    assert _render(render.flow_human, r, 120, "table") == _render(render.flow_compact, r, 120)
    assert _render(render.flow_human, r, 120, "wide") == _render(render.flow_table, r, 120)


@pytest.mark.parametrize("ns,text", [(None, "-"), (850, "850 ns"), (37_400, "37.4 µs"), (5_300, "5.30 µs"),
                                     (1_617_200, "1.62 ms"), (123_456_789, "123 ms"), (2_100_000_000, "2.1 s"),
                                     (float("nan"), "-")])
def test_human_time(ns, text):
    assert human_time(ns) == text


def test_middle_keeps_the_tail():
    assert middle("veth27272fab", 10) == "vet…272fab"
    assert middle("eth0", 10) == "eth0"


def test_probe_counter():
    from tracer.runs.flow import probe_counter
    assert probe_counter(3, []) == "probes 0/3 sent, 0 answered"
    assert probe_counter(3, ["answered", "answered"]) == "probes 2/3 sent, 2 answered"
    assert probe_counter(3, ["answered", "timeout", "timeout"]) == "probes 3/3 sent, 1 answered, 2 timeout"


def test_screens_in_docs_fit_120_columns():
    """The captures of a 120×40 terminal the README links to exist and fit it."""
    screens = pathlib.Path(__file__).parents[2] / "docs" / "screens"
    for name in ("healthy-flow.txt", "failing-flow.txt", "service-flow.txt"):
        lines = (screens / name).read_text().splitlines()
        assert 3 < len(lines) <= 40 and max(len(x) for x in lines) <= 120, name
    assert "3 requests, 3 replies: same 12-hop path, delivered" in (screens / "healthy-flow.txt").read_text()
    assert "DROPPED" in (screens / "failing-flow.txt").read_text()


def test_compact_watch_of_many_packets_stays_short():
    """A --no-probe watch sees many packets on the same paths: one line per path, with counts."""
    import dataclasses
    r = _result("flow-healthy")
    r.packets = [dataclasses.replace(p, seq=None) for p in r.packets * 40]
    lines = [x for x in _render(render.flow_compact, r, 120) if x.strip()]
    assert len(lines) <= 12, "\n".join(lines)
    text = "\n".join(lines)
    assert "120 requests, 120 replies: same 12-hop path, delivered" in text
    assert "(probe" not in text


def test_compact_says_all_is_well_only_when_the_flow_is_ok():
    """Delivered packets of a failed flow (a reply missing) do not get the all-well line."""
    r = _result("flow-healthy")
    r.packets = [p for p in r.packets if not (p.direction == "reply" and p.seq == 3)]
    r.verdict = FlowVerdict("failed", "3/3 delivered, 2/3 answered", ("probe 3: no reply",))
    text = "\n".join(_render(render.flow_compact, r, 120))
    assert "same 12-hop path, delivered" not in text
    assert "2 replies (probes 1, 2): 12 hops, DELIVERED" in text and "FAILED" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in DATA.glob("*.json")))
def test_json_is_written_as_the_standard_library_indents_it(name):
    """`-o json` is the document indented by two spaces, byte for byte what json.dumps gives,
    for recorded flows; an integer beyond 64 bits still goes through."""
    doc = json.loads((DATA / f"{name}.json").read_text())
    assert render.to_json(doc) == json.dumps(doc, indent=2)
    big = {"packets": [{"skb": 2**70, "t": 1.5}], 7: "key"}
    assert render.to_json(big) == json.dumps(big, indent=2)


_cell = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-./:→″ µΔ", max_size=24)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["node", "pod", "dev", "nat", "conntrack", "encap"]), min_size=1, max_size=6,
                unique=True),
       st.lists(st.lists(_cell, min_size=9, max_size=9), max_size=6),
       st.text(alphabet="abcdefghij :→[]=0123456789", min_size=1, max_size=90),
       st.integers(30, 200), st.booleans())
def test_the_hop_table_is_drawn_as_riches_table_draws_it(middle_cols, cells, title, width, color):
    """`-o wide` draws each packet's hops line by line, about ten times faster than rich's
    Table: the same characters (and, on a terminal, the same styles) at every width, rich's
    own drawing where the columns do not fit."""
    cols = ["#", *middle_cols, "pt", "Δt"]
    rows = [[str(i + 1), *r[:len(middle_cols)], "rx", r[-1][:8]] for i, r in enumerate(cells)]
    t = render.HopTable(title, cols, rows)

    def drawn(renderable) -> str:
        con = Console(width=width, record=False, file=io.StringIO(), force_terminal=color,
                      color_system="truecolor" if color else None)
        con.print(renderable)
        return con.file.getvalue()

    assert drawn(t) == drawn(t.table())
