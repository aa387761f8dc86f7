"""Verdicts: is a flow invertible within the tolerance on a family of inputs? (docs/METRICS.md)

A family is **invertible** when every example in the model's domain reconstructs finitely with
error ``<= tolerance`` (``criterion``: ``"l2"`` (default), ``"linf"`` or ``"rel"``). Examples the
forward refuses with ``InputOutsideDomain`` are counted as *outside domain*, not as failures; a
family made only of them gets the status ``"outside domain"``. For latent families (samples) the
inputs are the model's own outputs, so a refusal there is a failure.

The float64 shadow separates the causes of a failure: an example that fails in the model dtype but
reconstructs within tolerance in float64 fails because of floating-point precision (an
ill-conditioned but mathematically invertible map); one that fails in float64 too fails because
the map itself is not inverted (a non-contractive residual block, a non-converged fixed point,
scales that underflow even in float64, ...).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["FamilyVerdict", "Verdict", "family_verdict", "CRITERIA", "INVERTIBLE", "NOT_INVERTIBLE",
           "OUTSIDE_DOMAIN"]

CRITERIA = ("l2", "linf", "rel")
INVERTIBLE, NOT_INVERTIBLE, OUTSIDE_DOMAIN = "invertible", "not invertible", "outside domain"


@dataclass
class FamilyVerdict:
    name: str
    status: str  # INVERTIBLE / NOT_INVERTIBLE / OUTSIDE_DOMAIN
    n: int
    n_checked: int  # examples in the model's domain
    n_fail: int  # non-finite, raising or above tolerance
    n_nonfinite: int  # non-finite reconstruction (or generation)
    n_outside_domain: int
    max_error: float  # largest error (inf if any non-finite), nan if none checked
    median_error: float
    n_raised: int = 0  # forward / inverse raised (for samples: the forward refused the model's own output)
    shadow_max_error: float = math.nan
    n_float_cause: int = 0  # failures that float64 reconstructs within tolerance
    n_model_cause: int = 0  # failures that float64 does not fix
    culprit: str | None = None
    culprit_reason: str = ""

    @property
    def invertible(self) -> bool | None:
        return None if self.status == OUTSIDE_DOMAIN else self.status == INVERTIBLE

    @property
    def cause(self) -> str:
        if not self.n_fail:
            return ""
        if self.n_float_cause and not self.n_model_cause:
            return "floating point"
        if self.n_model_cause and not self.n_float_cause:
            return "model"
        if self.n_model_cause and self.n_float_cause:
            return "floating point and model"
        return "unknown (no float64 shadow)"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["invertible"] = self.invertible
        d["cause"] = self.cause
        return d


def _err(errors: dict[str, Tensor], criterion: str) -> Tensor:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return errors[criterion]


def family_verdict(name: str, errors: dict[str, Tensor], *, tolerance: float, criterion: str = "l2",
                   outside_domain: Tensor | None = None, raised: Tensor | None = None,
                   shadow_errors: dict[str, Tensor] | None = None) -> FamilyVerdict:
    """Verdict of one family from per-example errors (``{"l2", "linf", "rel"} -> (n,)``; ``inf`` =
    failure). ``raised`` marks the examples whose computation raised (counted apart from the
    non-finite ones); ``outside_domain`` the examples the forward refused (not failures).
    ``shadow_errors`` are the float64 errors (``inf`` where the float64 computation failed too)."""
    e = _err(errors, criterion).double()
    n = int(e.shape[0])
    dom = torch.zeros(n, dtype=torch.bool) if outside_domain is None else outside_domain.clone()
    rai = torch.zeros(n, dtype=torch.bool) if raised is None else raised.clone()
    dom &= ~rai
    checked = ~dom
    e = torch.where(rai, torch.full_like(e, math.inf), e)
    e = torch.where(checked & torch.isnan(e), torch.full_like(e, math.inf), e)
    nonfinite = checked & ~rai & ~torch.isfinite(e)
    fail = checked & (rai | ~torch.isfinite(e) | (e > tolerance))
    ec = e[checked]
    v = FamilyVerdict(
        name=name,
        status=OUTSIDE_DOMAIN if not bool(checked.any()) else (NOT_INVERTIBLE if bool(fail.any()) else INVERTIBLE),
        n=n, n_checked=int(checked.sum()), n_fail=int(fail.sum()), n_nonfinite=int(nonfinite.sum()),
        n_outside_domain=int(dom.sum()), n_raised=int((checked & rai).sum()),
        max_error=float(ec.max()) if ec.numel() else math.nan,
        median_error=float(ec.median()) if ec.numel() else math.nan,
    )
    if shadow_errors is not None:
        s = _err(shadow_errors, criterion).double()
        sc = s[checked]
        v.shadow_max_error = float(torch.where(torch.isnan(sc), torch.full_like(sc, math.inf), sc).max()) \
            if sc.numel() else math.nan
        ok64 = torch.isfinite(s) & (s <= tolerance)
        v.n_float_cause = int((fail & ok64).sum())
        v.n_model_cause = int((fail & ~ok64).sum())
    return v


@dataclass
class Verdict:
    """Per-family verdicts (attacks appear as ``pgd:<constraint>``) and the overall one."""

    tolerance: float
    criterion: str
    families: dict[str, FamilyVerdict] = field(default_factory=dict)

    @property
    def invertible(self) -> bool:
        """True when no family is ``not invertible`` (outside-domain families do not count)."""
        return not self.failing

    @property
    def failing(self) -> list[str]:
        return [k for k, v in self.families.items() if v.status == NOT_INVERTIBLE]

    def __bool__(self) -> bool:
        return self.invertible

    def __getitem__(self, name: str) -> FamilyVerdict:
        return self.families[name]

    def to_dict(self) -> dict:
        return {"invertible": self.invertible, "tolerance": self.tolerance, "criterion": self.criterion,
                "failing": self.failing, "families": {k: v.to_dict() for k, v in self.families.items()}}

    def table(self) -> str:
        """A plain-text table, one row per family."""
        head = ("family", "status", "fail", "nonfin", "raised", "outside", "max err", "max err f64", "cause", "culprit")
        rows = [head]
        for v in self.families.values():
            rows.append((v.name, v.status, f"{v.n_fail}/{v.n_checked}", str(v.n_nonfinite), str(v.n_raised),
                         str(v.n_outside_domain),
                         _fmt(v.max_error), _fmt(v.shadow_max_error), v.cause or "-", v.culprit or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        overall = "INVERTIBLE" if self.invertible else f"NOT INVERTIBLE ({len(self.failing)} families)"
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"overall: {overall} within {self.criterion} tolerance {self.tolerance:g}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3g}"
