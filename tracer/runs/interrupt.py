"""A flow stopped by Ctrl-C (or SIGTERM) while it traced: how far it got.

Like `ping`, an interrupted `flow` still shows the packets traced so far and their verdicts,
saves them with --save (marked incomplete) and exits 130.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interrupted:
    probing: bool
    probes_sent: int = 0          # probes with a result (sent, answered or timed out)
    probes_asked: int = 0         # --count
    traced_s: float = 0.0         # how long it traced before the interrupt
    duration_s: float | None = None   # --duration of a watch

    @classmethod
    def of(cls, cfg, sent: int, traced_s: float) -> "Interrupted":
        if cfg.probe:
            return cls(True, sent, cfg.count, round(traced_s, 3))
        return cls(False, traced_s=round(traced_s, 3), duration_s=cfg.duration)

    @property
    def after(self) -> str:
        """"after 3 of 20 probes", "after 1.2 of 10 s"."""
        if self.probing:
            return f"after {self.probes_sent} of {self.probes_asked} probes"
        return f"after {self.traced_s:.1f} of {self.duration_s:g} s"

    def note(self) -> str:
        return f"interrupted {self.after}: what was traced until then"

    def as_json(self) -> dict:
        d = {"after": self.after, "traced_s": self.traced_s}
        if self.probing:
            d.update(probes_sent=self.probes_sent, probes_asked=self.probes_asked)
        else:
            d["duration_s"] = self.duration_s
        return d
