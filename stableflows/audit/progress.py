"""Progress lines of a long audit (or OOD analysis) a person can follow.

``Progress(True)`` prints every part as it starts, with the time elapsed (in a terminal the
default of the command line); ``Progress("periodic", every=30)`` prints at most one line every
``every`` seconds (the default when the output is not a terminal, e.g. a batch job's log) plus the
last one; ``Progress(False)`` is silent. Lines go to standard error, so that the verdict table on
standard output stays clean.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress", "progress_mode", "PERIODIC_SECONDS"]

PERIODIC_SECONDS = 30.0  # one line at most this often when the output is not a terminal


def progress_mode(flag: bool | None, stream=None) -> bool | str:
    """The mode of a command line's ``--progress`` / ``--no-progress`` (None: by the terminal)."""
    if flag is False:
        return False
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return True if tty else "periodic"


class Progress:
    def __init__(self, mode: bool | str | "Progress" | None = False, *, prefix: str = "audit", stream=None,
                 every: float = PERIODIC_SECONDS):
        self.mode = mode.mode if isinstance(mode, Progress) else (mode or False)
        self.prefix, self.every = prefix, float(every)
        self.stream = stream
        self.t0 = time.perf_counter()
        self._last = -float("inf")
        self._pending: str | None = None

    @property
    def on(self) -> bool:
        return bool(self.mode)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(f"{self.prefix} [{time.perf_counter() - self.t0:6.1f}s] {text}", file=stream, flush=True)
        self._last = time.perf_counter()
        self._pending = None

    def part(self, text: str) -> None:
        """A part of the work starts."""
        if not self.mode:
            return
        if self.mode == "periodic" and time.perf_counter() - self._last < self.every:
            self._pending = text
            return
        self._write(text)

    def done(self, text: str) -> None:
        """The work ended (always printed when on)."""
        if self.mode:
            self._write(text)
