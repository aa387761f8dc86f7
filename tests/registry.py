"""The registry behind ``test_conformance.py``: every layer and model, built tiny.

Each module ``tests/registry_*.py`` defines ``ENTRIES = {name: Entry(...)}`` (and optionally
``ABSTRACT_BASES = {"module.Class": "why it has no entry"}`` for abstract base classes only).
They are collected here by glob, so a new family adds one file and a new layer one line::

    "actnorm_img": Entry(build=lambda: ActNorm((2, 4, 4)), shape=(2, 4, 4)),
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

DOMAINS = ("real", "unit")


@dataclass
class Entry:
    """How to build one module and what inputs it takes.

    build: returns a fresh module with ``forward(x) -> (z, logdet)`` and ``inverse(z) -> (x, logdet)``.
    shape: event shape of the input. domain: ``"real"`` (inputs ~ N(0, 1)) or ``"unit"`` (uniform
    in (0.05, 0.95)). gradcheck: run ``torch.autograd.gradcheck`` on it (off for slow entries).
    roundtrip_atol / logdet_atol: float64 tolerances of the conformance checks.
    context_shape: event shape of the context of a conditional module (None: unconditional); the
    conformance test then draws a context ~ N(0, 1) per example and passes it to every call.
    """

    build: Callable[[], nn.Module]
    shape: tuple
    domain: str = "real"
    gradcheck: bool = True
    roundtrip_atol: float = 1e-10
    logdet_atol: float = 1e-8
    context_shape: tuple | None = None

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"Entry domain must be one of {DOMAINS}, got {self.domain!r}")
        self.shape = tuple(self.shape)
        if self.context_shape is not None:
            self.context_shape = tuple(self.context_shape)


# the contract itself; every registry_*.py may add its own abstract bases
ABSTRACT_BASES: dict[str, str] = {
    "stableflows.transforms.base.Transform": "the layer contract; every concrete layer derives from it",
}
ENTRIES: dict[str, Entry] = {}


def _collect() -> None:
    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    for path in sorted(here.glob("registry_*.py")):
        module = importlib.import_module(path.stem)
        entries = getattr(module, "ENTRIES", None)
        if not isinstance(entries, dict):
            raise TypeError(f"{path.name} must define ENTRIES = {{name: Entry(...)}}")
        for name, entry in entries.items():
            if name in ENTRIES:
                raise ValueError(f"registry entry {name!r} of {path.name} is defined twice")
            if not isinstance(entry, Entry):
                raise TypeError(f"registry entry {name!r} of {path.name} is not an Entry")
            ENTRIES[name] = entry
        ABSTRACT_BASES.update(getattr(module, "ABSTRACT_BASES", {}))


_collect()
