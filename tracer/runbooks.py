"""Where a runbook a verdict names is on this machine, so that the printed path opens anywhere.

Verdicts name runbooks relative to the repository (`docs/runbooks/mtu.md`: the JSON's stable
value). A person reads the table from any directory: `where()` gives the absolute path of
that file in the repository podtrace runs from (or in the installed package, when its docs
were copied there), and the relative name when neither holds it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
ROOTS = (_PACKAGE.parent, _PACKAGE)   # a checkout (tracer/ beside docs/), then the installed package


@lru_cache(maxsize=64)
def where(runbook: str) -> str:
    """The absolute path of `runbook` ("docs/runbooks/X.md") when it exists, else `runbook`."""
    rel = Path(runbook)
    if rel.is_absolute():
        return runbook
    for root in ROOTS:
        p = root / rel
        if p.is_file():
            return str(p)
    return runbook
