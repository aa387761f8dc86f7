"""Numbers, settings and colours as reports show them (the audit's and the OOD analysis').

* :func:`num`: 4 significant digits in any magnitude (``0.001471``, ``1.23e-17``, never
  ``0.0014705881476402283`` nor ``0.000000``), integers as integers, ``inf`` / ``nan`` / ``-``;
* :func:`settings_items` / :func:`settings_text`: a (nested) dict of settings as ``key value`` pairs,
  numbers formatted, lists joined, so that a report never prints a raw Python dict;
* :func:`family_colors`: one colour per family name, the same in every figure of both reports
  (orange is kept for non-finite values, red for tolerances and culprits, gray for float64).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["num", "settings_items", "settings_text", "family_colors", "FAMILY_PALETTE", "NONFINITE_COLOR"]

NONFINITE_COLOR = "tab:orange"
# tab20 without its oranges, reds and grays (kept for non-finite values, tolerances, float64), then a few more
FAMILY_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8",
                  "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#000080", "#b8860b",
                  "#008080", "#4b0082")
# names seen in the audit and the OOD analysis, in a fixed order: a family keeps its colour everywhere
KNOWN_FAMILIES = ("test", "train", "val", "samples_t1", "samples_t0.7", "samples_t0", "clipped_c1000", "clipped_c100",
                  "clipped_c10", "uniform", "gaussian", "constant", "grayed", "inverted", "out_of_range",
                  "natural_patches", "pgd:cell", "pgd:linf", "pgd:range")
FIXED = {"train": "black", "val": "#7f7f7f", "test": "#1f77b4"}


def num(v: Any, digits: int = 4) -> str:
    """A number for a report (see the module docstring); anything else as ``str``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(v)


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k} {_value(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "-"
    return num(v)


def settings_items(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``[(key, formatted value)]`` of a settings dict, nested dicts flattened to ``a.b``."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()) and len(v) > 6:
            out.append((key, _value(v)))
        elif isinstance(v, dict) and v:
            out += settings_items(v, key + ".")
        else:
            out.append((key, _value(v)))
    return out


def settings_text(d: dict, sep: str = ", ") -> str:
    """One line (that an HTML page may wrap): ``key value, key value, ...``."""
    return sep.join(f"{k} {v}" for k, v in settings_items(d))


def family_colors(names: Iterable[str]) -> dict[str, str]:
    """A colour for each name: known families always get the same one; others the next free ones."""
    names = list(names)
    out: dict[str, str] = {}
    palette = [c for c in FAMILY_PALETTE if c not in FIXED.values()]
    known = [n for n in KNOWN_FAMILIES if n not in FIXED]
    for n in names:
        if n in FIXED:
            out[n] = FIXED[n]
        elif n in known:
            out[n] = palette[known.index(n) % len(palette)]
    free = [c for c in palette if c not in out.values()] or palette
    i = 0
    for n in names:
        if n not in out:
            out[n] = free[i % len(free)]
            i += 1
    return out
