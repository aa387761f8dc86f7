"""Subcommands of the ``stableflows`` command line, one module each.

A module of this package that defines ``add_arguments(parser)`` and ``run(args) -> int`` is a
subcommand, named by its ``NAME`` (default: the module name) and described by ``HELP`` (one line)
and its docstring. Adding a command means adding a module here; :mod:`stableflows.cli` finds it.
Modules should import heavy dependencies inside ``run`` so ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["ORDER", "available"]

ORDER = ("train", "eval", "sample", "audit", "ood", "reproduce", "bench")  # listing order in --help


def available() -> dict[str, ModuleType]:
    """``{command name: module}`` of every subcommand module, in :data:`ORDER` then by name."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None)):
            found[getattr(mod, "NAME", info.name.replace("_", "-"))] = mod
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))
