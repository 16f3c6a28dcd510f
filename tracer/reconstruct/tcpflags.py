"""TCP flags in tcpdump's notation: the header's flag byte as `S`, `S.`, `P.`, `F.`, `R.`.

The letters come in tcpdump's order: F (FIN), S (SYN), R (RST), P (PSH), `.` (ACK), U (URG),
E (ECE), W (CWR); no flag set is `none`. `text()` gives the bare letters (JSON, tables),
`bracketed()` the form a person knows from tcpdump (`[S.]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # imported where frames are made: `flow` starts its agents first
    import pandas as pd

PROTO_TCP = 6
# (bit, letter) in tcpdump's order (print-tcp.c, tcp_flag_values)
LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"),
           (0x40, "E"), (0x80, "W"))
PATTERN = r"^(none|F?S?R?P?\.?U?E?W?)$"   # what text() can give (JSON schema)


def text(flags: int | None) -> str | None:
    """The flag byte as tcpdump's letters (`S.` for SYN+ACK); None for None."""
    if flags is None:
        return None
    out = "".join(letter for bit, letter in LETTERS if int(flags) & bit)
    return out or "none"


def bracketed(flags: str | None) -> str:
    """`[S.]` from `S.`; empty for a packet without TCP flags (not TCP)."""
    return f"[{flags}]" if flags else ""


def column(flags: np.ndarray, proto: np.ndarray) -> pd.Categorical:
    """A column of flag bytes as a categorical of letters; missing where the packet is not TCP.
    Each distinct byte is spelled once, whatever the column's length."""
    import pandas as pd
    key = np.where(np.asarray(proto).astype(np.int64) == PROTO_TCP, np.asarray(flags).astype(np.int64), -1)
    codes, uniq = pd.factorize(key)
    names = [text(int(u)) if u >= 0 else None for u in uniq]
    cats = sorted({n for n in names if n is not None})
    remap = np.array([cats.index(n) if n is not None else -1 for n in names] + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], categories=cats)
