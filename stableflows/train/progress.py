"""What a person watching a training sees: a bar in a terminal, one line every N seconds in a log.

- stderr is a terminal: a tqdm bar whose total is the step at which the run will actually stop.
  With a time budget that is ``min(steps, step + rate * (budget - time))`` at the current rate of
  training steps (evaluation time is not training time), so the ETA is the budget's, not that of
  ``--steps``.
- stdout is not a terminal (a batch job writing a log file): one line every ``train.log_every``
  seconds of wall time, ``step 1200/~1500 | loss 2.0312 | train bpd 2.034 | val bpd 2.051 @1000 |
  10.1 steps/s | ETA 29 s``.

Both are off with ``train.progress = false`` and on ranks other than 0.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "format_seconds"]

BAR_REFRESH_STEPS = 10  # steps between refreshes of the bar's postfix and total


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Bar and/or log lines of one training session.

    Args:
        steps, time_budget: the two stopping rules of the run (steps done so far: ``start_step``).
        enabled: ``train.progress`` on this rank.
        log_every: seconds of wall time between log lines.
        clock: wall clock (tests pass a fake one).
    """

    def __init__(self, *, steps: int, time_budget: float | None, start_step: int, enabled: bool,
                 log_every: float, metric: str, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.steps, self.budget, self.metric = steps, time_budget, metric
        self.start_step = start_step
        self.out = stdout or sys.stdout
        err = stderr or sys.stderr
        self.bar_on = enabled and _isatty(err) and not os.environ.get("CI")
        self.log_on = enabled and not _isatty(self.out)
        self.log_every, self.clock = log_every, clock
        self.last_line = clock()
        self.val: tuple[int, float] | None = None
        self.bar = None
        if self.bar_on:
            from tqdm.auto import tqdm

            total = steps if time_budget is None else None  # set once the rate of steps is known
            self.bar = tqdm(total=total, initial=start_step, desc="train",
                            dynamic_ncols=True, leave=True, file=err)

    # ------------------------------------------------------------------ numbers
    def target(self, step: int, train_time: float, rate: float) -> int:
        """The step at which the run will stop, at the current rate (``steps`` without a budget)."""
        if self.budget is None or rate <= 0:
            return self.steps
        left = max(0.0, self.budget - train_time)
        return int(min(self.steps, step + math.ceil(rate * left)))

    def eta(self, step: int, train_time: float, rate: float) -> float:
        """Seconds of training left: whichever rule stops the run first."""
        by_steps = (self.steps - step) / rate if rate > 0 else math.inf
        by_time = max(0.0, self.budget - train_time) if self.budget is not None else math.inf
        return min(by_steps, by_time)

    # ------------------------------------------------------------------ events
    def step(self, step: int, train_time: float, rate: float, running: tuple[str, float] | None,
             loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % BAR_REFRESH_STEPS == 0:
                total = self.target(step, train_time, rate)
                if total != self.bar.total:
                    self.bar.total = total
                if running is not None:
                    self.bar.set_postfix_str(f"train {running[0]} {running[1]:.3f}" + self._val_text(), refresh=False)
                self.bar.refresh()
        if self.log_on and self.clock() - self.last_line >= self.log_every:
            self.line(step, train_time, rate, running, loss)

    def evaluated(self, step: int, value: float) -> None:
        self.val = (step, value)
        if self.bar is not None:
            self.bar.set_postfix_str(f"val {self.metric} {value:.3f}")

    def _val_text(self) -> str:
        return f", val {self.metric} {self.val[1]:.3f} @{self.val[0]}" if self.val else ""

    def line(self, step: int, train_time: float, rate: float, running: tuple[str, float] | None,
             loss: float | None) -> None:
        """One log line (also written when the bar is on, if stdout is not a terminal)."""
        target = self.target(step, train_time, rate)
        approx = "~" if self.budget is not None and target < self.steps else ""
        parts = [f"step {step}/{approx}{target}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if running is not None and running[0] != "loss":
            parts.append(f"train {running[0]} {running[1]:.3f}")
        if self.val is not None:
            parts.append(f"val {self.metric} {self.val[1]:.3f} @{self.val[0]}")
        parts.append(f"{rate:.1f} steps/s")
        parts.append(f"ETA {format_seconds(self.eta(step, train_time, rate))}")
        try:
            print(" | ".join(parts), file=self.out, flush=True)
        except (OSError, ValueError):  # the reader went away (a closed pipe): training goes on, silently
            self.log_on = False
        self.last_line = self.clock()

    def close(self, finished: bool = False) -> None:
        if self.bar is not None:
            if finished and self.budget is not None and self.bar.n != self.bar.total:  # the budget stopped it
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()
            self.bar = None
