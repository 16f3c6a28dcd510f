"""Pictures of a trace (matplotlib, imported only when drawing)."""

from __future__ import annotations

import pandas as pd

from tracer.analysis.trace import Trace
from tracer.render_compact import endpoint

STATUS_COLOR = {"delivered": "tab:green", "dropped": "tab:red", "lost": "tab:orange", "left": "tab:gray",
                "partial": "tab:cyan"}


def hop_label(hops: pd.DataFrame) -> pd.Series:
    """"node/dev pt" per hop (pods by name), the key for per-hop statistics."""
    where = hops["pod"].astype(object).where(hops["pod"].notna(), hops["node"].astype(object)).fillna("(fabric)")
    return where.astype(str) + "/" + hops["dev"].astype(str) + " " + hops["point"].astype(str)


def human_ns(ns) -> str:
    """A duration in the unit a person reads: "870 ns", "5 µs", "1.62 ms", "2.5 s"."""
    if ns is None or pd.isna(ns):
        return "-"
    ns = float(ns)
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(ns) >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.0f} ns"


def ms_formatter():
    """Axis ticks of a milliseconds axis as plain numbers (0.005, 0.1, 2), also on a log scale."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def path_width(t: Trace, packet: int) -> float:
    """The figure width (inches) at which plot_path's labels of this packet do not overlap."""
    return max(8.0, 1.25 * int((t.hops["packet"] == packet).sum()) + 2)


def _nat_label(h, prev) -> str:
    """What an address translation between two hops changed: "dst → 10.244.2.2:8080"."""
    def ep(ip, port):
        return endpoint(str(ip), int(port) if pd.notna(port) else None)
    out = []
    if (h["dst"], h["dport"]) != (prev["dst"], prev["dport"]):
        out.append("dst → " + ep(h["dst"], h["dport"]))
    if (h["src"], h["sport"]) != (prev["src"], prev["sport"]):
        out.append("src → " + ep(h["src"], h["sport"]))
    return "\n".join(out)


def plot_path(t: Trace, packet: int, ax=None):
    """The hop path of one packet as a diagram: one lane per pod/node/fabric namespace, hops
    left to right with Δt on the arrows, address changes (NAT) marked, the verdict at the end."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    hops = t.path(packet).reset_index(drop=True)
    pk = t.packets.loc[t.packets["packet"] == packet].iloc[0]
    lanes_of = hops["pod"].astype(object).where(hops["pod"].notna(), hops["node"].astype(object)).fillna("(fabric)")
    lanes = list(dict.fromkeys(lanes_of))
    if ax is None:
        _, ax = plt.subplots(figsize=(path_width(t, packet), 1.0 + 0.9 * max(len(lanes), 1)))
    y = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    prev = None
    for i, h in hops.iterrows():
        yy = y[lanes_of[i]]
        enc = isinstance(h["encap"], str) and h["encap"]
        ax.add_patch(FancyBboxPatch((i - 0.42, yy - 0.28), 0.84, 0.56, boxstyle="round,pad=0.02",
                                    fc="#eef3fb" if not enc else "#fdf3e1", ec="#4a6fa5",
                                    ls="--" if enc else "-"))
        ax.text(i, yy + 0.06, str(h["dev"]), ha="center", va="center", fontsize=8 if len(str(h["dev"])) <= 10 else 7)
        ax.text(i, yy - 0.14, str(h["point"]) + (f" {enc}" if enc else ""), ha="center", va="center",
                fontsize=7, color="#555")
        if prev is not None:
            py = y[lanes_of[i - 1]]
            ax.annotate("", xy=(i - 0.42, yy), xytext=(i - 0.58, py),
                        arrowprops=dict(arrowstyle="->", color="#333", lw=1))
            if yy == py:      # above the arrow between two boxes
                ax.text(i - 0.5, yy + 0.34, human_ns(h["dt_ns"]), ha="center", fontsize=7)
            else:             # beside the arrow that changes lanes, clear of both boxes
                ax.text(i - 0.45, (yy + py) / 2, human_ns(h["dt_ns"]), ha="left", va="center", fontsize=7)
            nat = _nat_label(h, prev)
            if nat:   # under the box: the Δt labels are above, between the boxes
                ax.text(i, yy - 0.33, nat, ha="center", va="top", fontsize=6.5, color="m")
        prev = h
    status = str(pk["status"])
    end = len(hops)
    ly = y[lanes_of.iloc[-1]] if len(hops) else 0
    mark = {"delivered": "✓", "dropped": "✗", "lost": "?", "left": "→"}.get(status, "?")
    why = f" {pk['reason']}" if status == "dropped" and pk["reason"] else ""
    ax.text(end - 0.35, ly, f"{mark} {status}{why}", color=STATUS_COLOR.get(status, "k"), fontsize=10,
            va="center", fontweight="bold")
    ax.set_yticks([y[lane] for lane in lanes], lanes)
    ax.set_xticks([])
    ax.set_xlim(-0.6, end + 1.6)
    ax.set_ylim(-0.85, len(lanes) - 0.3)
    src = endpoint(str(pk["src"]), int(pk["sport"]) if pd.notna(pk["sport"]) else None)
    dst = endpoint(str(pk["dst"]), int(pk["dport"]) if pd.notna(pk["dport"]) else None)
    ax.set_title(f"packet {packet} ({pk['direction']}) {pk['proto']} {src} → {dst}", fontsize=10)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return ax
