"""Reproductions of the papers' tables and figures, at the scale of this machine.

Each module of this package may define ``EXPERIMENTS = {"name": run}`` where
``run(out_dir: pathlib.Path, *, quick: bool = False, seed: int = 0) -> dict`` writes its tables
(JSON and Markdown) and plots under ``out_dir`` and returns the summary. ``quick`` is a reduced
setting for smoke tests; the default is the setting reported in the README. ``stableflows
reproduce NAME`` runs one (see :func:`registry`). A module may also define ``REPORTS = {"name":
Report(...)}`` (:class:`stableflows.experiments._common.Report`): the row keys, table columns and
claims ``reproduce --seeds`` aggregates over seeds (:func:`reports`).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

__all__ = ["registry", "reports"]


def registry() -> dict[str, Callable]:
    """``{name: run}`` collected from every module of this package, sorted by name."""
    found: dict[str, Callable] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name, fn in getattr(mod, "EXPERIMENTS", {}).items():
            if name in found:
                raise RuntimeError(f"experiment {name!r} is defined twice ({info.name})")
            found[name] = fn
    return dict(sorted(found.items()))


def reports() -> dict:
    """``{name: Report}`` of the experiments that define one (``REPORTS`` of their module)."""
    found: dict = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        found.update(getattr(mod, "REPORTS", {}))
    return found
