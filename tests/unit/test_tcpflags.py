"""TCP flags in tcpdump's notation: the text of each flag byte, the hops and packets of a flow,
its JSON, the packet title `flow` prints, the analysis frames and `analyze`'s tables."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from rich.console import Console

from bench.analysis import synth_flow
from tracer import analysis, render, tracefile
from tracer.cli.analyze import analyze
from tracer.kernel import record
from tracer.reconstruct import tcpflags
from tracer.reconstruct.model import Packet
from tracer.reconstruct.packets import build_packets

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


@pytest.mark.parametrize("byte,want", [
    (SYN, "S"), (SYN | ACK, "S."), (ACK, "."), (PSH | ACK, "P."), (FIN | ACK, "F."), (RST, "R"),
    (RST | ACK, "R."), (FIN | PSH | ACK, "FP."), (SYN | ECE | CWR, "SEW"), (URG | ACK, ".U"), (0, "none"),
])
def test_text_is_tcpdumps(byte, want):
    assert tcpflags.text(byte) == want
    assert tcpflags.bracketed(want) == f"[{want}]"


def test_no_flags_for_none():
    assert tcpflags.text(None) is None and tcpflags.bracketed(None) == ""


def test_column_spells_each_byte_once_and_leaves_other_protocols_missing():
    col = tcpflags.column(np.array([SYN, SYN | ACK, 8, ACK, SYN], dtype=np.uint8),
                          np.array([6, 6, 1, 6, 6], dtype=np.uint8))
    assert isinstance(col, pd.Categorical)
    assert [None if pd.isna(x) else x for x in col] == ["S", "S.", None, ".", "S"]


def _flow():
    arr, meta = synth_flow(probes=2)
    return arr, meta, build_packets(record.to_frame(arr), analysis._flow_input(meta))


def test_flow_packets_hops_and_json_carry_the_flags():
    _, _, packets = _flow()
    assert [(p.direction, p.tcp_flags) for p in packets] == [("request", "S"), ("reply", "S."),
                                                             ("request", "S"), ("reply", "S.")]
    for p in packets:
        assert {h.tcp_flags for h in p.hops} == {p.tcp_flags}
        doc = p.as_json()
        assert doc["tcp_flags"] == p.tcp_flags and all(h["tcp_flags"] == p.tcp_flags for h in doc["hops"])
        assert Packet.from_json(json.loads(json.dumps(doc))) == p


def test_non_tcp_has_no_flags():
    arr, meta = synth_flow(probes=1)
    arr["proto"], arr["icmp_type"] = 17, 0
    meta = dict(meta, proto="udp", probes=[dict(meta["probes"][0], proto="udp")])
    packets = build_packets(record.to_frame(arr), analysis._flow_input(meta))
    assert packets and all(p.tcp_flags is None and p.as_json()["tcp_flags"] is None for p in packets)
    assert all(h.tcp_flags is None for p in packets for h in p.hops)
    assert render.tcp_flags_text(packets[0]) == ""
    assert "[" not in _title(packets[0])


def _title(p: Packet) -> str:
    con = Console(width=200, record=True)
    con.print(render.packet_table(p))
    return con.export_text().splitlines()[0]


def test_packet_title_shows_the_flags_after_the_five_tuple():
    _, _, packets = _flow()
    req, rep = packets[0], packets[1]
    assert ":8080 [S]  ip_id=" in _title(req)
    assert ":40000 [S.]  ip_id=" in _title(rep)
    assert "[R.]" in _title(replace(rep, tcp_flags="R."))


@pytest.mark.parametrize("mode", ["flow", "capture"])
def test_analysis_frames_have_the_flags(tmp_path, mode):
    arr, meta = synth_flow(probes=2)
    p = tmp_path / "f.parquet"
    tracefile.save(p, record.to_frame(arr), meta)
    t = analysis.load(p, mode=mode)
    by_first = t.packets.sort_values("first_ts_ns")
    assert by_first["tcp_flags"].astype(str).tolist() == ["S", "S.", "S", "S."]
    hop_flags = t.hops.merge(t.packets[["packet", "tcp_flags"]], on="packet", suffixes=("", "_p"))
    assert (hop_flags["tcp_flags"].astype(str) == hop_flags["tcp_flags_p"].astype(str)).all()
    assert t.flows["tcp_flags"].tolist() == ["S S."] * len(t.flows)


def test_analyze_shows_the_flags(tmp_path):
    arr, meta = synth_flow(probes=2)
    p = tmp_path / "f.parquet"
    tracefile.save(p, record.to_frame(arr), meta)
    res = CliRunner().invoke(analyze, [str(p)])
    assert res.exit_code == 0, res.output
    assert "[S][S.]" in res.output and "flags" in res.output
    doc = json.loads(CliRunner().invoke(analyze, [str(p), "-o", "json"]).output)
    assert {f["tcp_flags"] for f in doc["flows"]} == {"S S."}


def test_schema_knows_every_text():
    """flow.schema.json's pattern is the module's, and every flag byte's text matches it."""
    import re
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[2] / "tracer/schema/flow.schema.json").read_text())
    d = schema["$defs"]
    pat = d["tcp_flags"]["anyOf"][1]["pattern"]
    assert pat == tcpflags.PATTERN
    assert all(re.match(pat, tcpflags.text(b)) for b in range(256))
    assert d["hop"]["properties"]["tcp_flags"] == d["packet"]["properties"]["tcp_flags"] == {"$ref": "#/$defs/tcp_flags"}


def _svc_tcp_with_flags():
    """The recorded Service flow, its SYNs and SYN-ACKs carrying their flags (as a run records now)."""
    from tests.unit.test_render import _result

    r = _result("flow-svc-tcp")
    r.packets = [replace(p, tcp_flags=f, hops=tuple(replace(h, tcp_flags=f) for h in p.hops))
                 for p in r.packets for f in ["S" if p.direction == "request" else "S."]]
    return r


def _lines(fn, r, width=120) -> list[str]:
    con = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    fn(r, con)
    return con.export_text().splitlines()


def test_compact_view_names_the_flags_of_each_group():
    lines = _lines(render.flow_compact, _svc_tcp_with_flags())
    assert any(x.lstrip().startswith("3 requests [S] (probes 1, 2, 3):") for x in lines), "\n".join(lines)
    assert any(x.lstrip().startswith("3 replies [S.] (probes 1, 2, 3):") for x in lines), "\n".join(lines)


@pytest.mark.parametrize("width", [120, 80])
def test_wide_titles_show_the_flags_and_fit(width):
    lines = _lines(render.flow_table, _svc_tcp_with_flags(), width)
    assert max(len(x) for x in lines) <= width
    titles = [x for x in lines if x.startswith(("request ", "reply "))]
    assert len(titles) == 6 and all(("[S]" if x.startswith("request") else "[S.]") in x for x in titles)
