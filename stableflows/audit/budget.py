"""The time budget of an audit: how many seconds each part may take, and what was cut to keep it.

A flow whose inverse is slow (a fully autoregressive spline flow inverts one dimension per pass:
zuko's NSF at 64 dimensions takes 64 passes of its network per transform) cannot be audited with
every part at full size in a couple of minutes. ``audit(budget=SECONDS)`` spreads the time:

1. **round trips** (the verdict) get :data:`RECON_SHARE` of the budget. Every family gets at
   least :data:`MIN_EXAMPLES` examples (all of them when it has fewer); the rest of each family as
   the measured time per example allows, the number checked reported per family;
2. the **optional parts** share what is left, in this order and these proportions
   (:data:`WEIGHTS`): the float64 shadow (on the failing examples first: they need a cause), the
   per-layer localisation, the Jacobian spectra (Lanczos instead of exact Jacobians, fewer steps or
   fewer points when a probe of one Jacobian-vector product says the exact ones do not fit), the
   repeated passes, the attack (PGD stops early). Time a part does not use passes to the next.

Each part predicts its cost from times measured in the same audit (seconds per example of the
round trips, of the shadow, of one vector-Jacobian product), so a part may overrun its share by
the error of one prediction. Everything cut is listed in ``report.meta["budget"]["cuts"]`` and in
the report's notes. ``budget=None`` disables the budget (every part at full size).
"""
from __future__ import annotations

import math
import time

__all__ = ["Budget", "DEFAULT_BUDGET", "RECON_SHARE", "MIN_EXAMPLES", "WEIGHTS"]

DEFAULT_BUDGET = 90.0  # seconds; leaves room under two minutes for loading and writing the report
RECON_SHARE = 0.5  # of the budget for the round trips of every family
MIN_EXAMPLES = 32  # examples of every family checked whatever the budget
WEIGHTS = {"shadow": 3.0, "localization": 1.0, "spectra": 2.0, "repeated": 1.0, "attack": 4.0}


class Budget:
    """Deadlines of the parts of one audit (``seconds=None``: no limit)."""

    def __init__(self, seconds: float | None, parts: list[str]):
        self.seconds = None if seconds is None else float(seconds)
        self.t0 = time.perf_counter()
        self.todo = [p for p in WEIGHTS if p in parts]
        self.cuts: list[str] = []
        self.used: dict[str, float] = {}
        self.mandatory_s: float | None = None

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def recon_deadline(self) -> float:
        """Absolute ``perf_counter`` time by which the round trips should end."""
        return math.inf if self.seconds is None else self.t0 + RECON_SHARE * self.seconds

    def start_optional(self, elapsed: float | None = None) -> None:
        self.mandatory_s = self.elapsed() if elapsed is None else elapsed

    def deadline(self, part: str) -> float:
        """Absolute time by which ``part`` should end: its weight's share of what is left."""
        if self.seconds is None:
            return math.inf
        todo = [p for p in self.todo if p not in self.used]
        w = sum(WEIGHTS[p] for p in todo) or 1.0
        share = max(self.remaining(), 0.0) * WEIGHTS.get(part, 1.0) / w
        return time.perf_counter() + share

    def done(self, part: str, seconds: float) -> None:
        self.used[part] = seconds

    def cut(self, part: str, text: str) -> None:
        self.cuts.append(f"{part}: {text}")

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "round_trips_s": self.mandatory_s, "cuts": list(self.cuts),
                "parts_s": dict(self.used)}
