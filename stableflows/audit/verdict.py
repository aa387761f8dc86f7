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

An exception that is not a numerical failure (a wrong shape or dtype, a bug in an adapter or in
the model; see :func:`~stableflows.audit.reconstruction.classify`) is never a verdict: the
examples it hits are *could not run*, the family's status is ``"could not run"`` with the
exception's text, and the overall verdict is neither invertible nor not (``invertible`` is None)
unless another family fails.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["FamilyVerdict", "Verdict", "family_verdict", "CRITERIA", "INVERTIBLE", "NOT_INVERTIBLE",
           "OUTSIDE_DOMAIN", "COULD_NOT_RUN", "fmt_error"]

CRITERIA = ("l2", "linf", "rel")
INVERTIBLE, NOT_INVERTIBLE, OUTSIDE_DOMAIN = "invertible", "not invertible", "outside domain"
COULD_NOT_RUN = "could not run"


@dataclass
class FamilyVerdict:
    name: str
    status: str  # INVERTIBLE / NOT_INVERTIBLE / OUTSIDE_DOMAIN / COULD_NOT_RUN
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
    n_error: int = 0  # examples the audit could not run (an exception that is not a verdict)
    error: str = ""  # the first such exception, full text
    n_shadow: int | None = None  # examples the float64 shadow ran on (None: all of them)
    shadow: bool = False  # a float64 shadow was run
    n_total: int | None = None  # examples of the family before the time budget cut it to n

    @property
    def invertible(self) -> bool | None:
        if self.status in (OUTSIDE_DOMAIN, COULD_NOT_RUN):
            return None
        return self.status == INVERTIBLE

    @property
    def cause(self) -> str:
        """Why the failures fail: ``"floating point"`` (float64 reconstructs them within the
        tolerance), ``"model"`` (float64 does not), both, or unknown."""
        if not self.n_fail:
            return ""
        known = self.n_float_cause + self.n_model_cause
        if not self.shadow:
            return "unknown (no float64 shadow)"
        if not known:
            return "unknown (float64 shadow not run on the failing examples)"
        if self.n_float_cause and not self.n_model_cause:
            c = "floating point"
        elif self.n_model_cause and not self.n_float_cause:
            c = "model"
        else:
            c = "floating point and model"
        return c if known == self.n_fail else f"{c} ({known} of {self.n_fail} failures replayed in float64)"

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
                   shadow_errors: dict[str, Tensor] | None = None, shadow_ran: Tensor | None = None,
                   error: Tensor | None = None, error_text: str | None = None) -> FamilyVerdict:
    """Verdict of one family from per-example errors (``{"l2", "linf", "rel"} -> (n,)``; ``inf`` =
    failure). ``raised`` marks the examples whose computation raised a numerical failure (counted
    apart from the non-finite ones); ``outside_domain`` the examples the forward refused (not
    failures); ``error`` the examples the audit could not run (``error_text``: why), which make the
    status ``"could not run"``. ``shadow_errors`` are the float64 errors (``inf`` where the float64
    computation failed too) on the examples ``shadow_ran`` (default: all); the cause of a failure
    outside them stays unknown."""
    e = _err(errors, criterion).double()
    n = int(e.shape[0])
    err = torch.zeros(n, dtype=torch.bool) if error is None else error.clone()
    dom = torch.zeros(n, dtype=torch.bool) if outside_domain is None else outside_domain.clone()
    rai = torch.zeros(n, dtype=torch.bool) if raised is None else raised.clone()
    rai &= ~err
    dom &= ~rai & ~err
    checked = ~dom & ~err
    e = torch.where(rai, torch.full_like(e, math.inf), e)
    e = torch.where(checked & torch.isnan(e), torch.full_like(e, math.inf), e)
    nonfinite = checked & ~rai & ~torch.isfinite(e)
    fail = checked & (rai | ~torch.isfinite(e) | (e > tolerance))
    ec = e[checked]
    if bool(err.any()):
        status = COULD_NOT_RUN
    elif not bool(checked.any()):
        status = OUTSIDE_DOMAIN
    else:
        status = NOT_INVERTIBLE if bool(fail.any()) else INVERTIBLE
    v = FamilyVerdict(
        name=name, status=status,
        n=n, n_checked=int(checked.sum()), n_fail=int(fail.sum()), n_nonfinite=int(nonfinite.sum()),
        n_outside_domain=int(dom.sum()), n_raised=int((checked & rai).sum()),
        max_error=float(ec.max()) if ec.numel() else math.nan,
        median_error=float(ec.median()) if ec.numel() else math.nan,
        n_error=int(err.sum()), error=(error_text or "exception") if bool(err.any()) else "",
    )
    if shadow_errors is not None:
        s = _err(shadow_errors, criterion).double()
        ran_all = torch.ones(n, dtype=torch.bool) if shadow_ran is None else shadow_ran
        ran = checked & ran_all
        sc = s[ran]
        v.shadow_max_error = float(torch.where(torch.isnan(sc), torch.full_like(sc, math.inf), sc).max()) \
            if sc.numel() else math.nan
        if shadow_ran is not None:
            v.n_shadow = int(ran.sum())
        ok64 = torch.isfinite(s) & (s <= tolerance)
        known = fail & ran_all
        v.shadow = True
        v.n_float_cause = int((known & ok64).sum())
        v.n_model_cause = int((known & ~ok64).sum())
    return v


@dataclass
class Verdict:
    """Per-family verdicts (attacks appear as ``pgd:<constraint>``) and the overall one."""

    tolerance: float
    criterion: str
    families: dict[str, FamilyVerdict] = field(default_factory=dict)

    @property
    def invertible(self) -> bool | None:
        """False when a family is ``not invertible``; None when none is but the audit could not run
        a family (unknown); True otherwise (outside-domain families do not count)."""
        if self.failing:
            return False
        return None if self.could_not_run else True

    @property
    def failing(self) -> list[str]:
        return [k for k, v in self.families.items() if v.status == NOT_INVERTIBLE]

    @property
    def could_not_run(self) -> list[str]:
        return [k for k, v in self.families.items() if v.status == COULD_NOT_RUN]

    @property
    def first_error(self) -> str:
        return next((v.error for v in self.families.values() if v.status == COULD_NOT_RUN), "")

    def headline(self) -> str:
        """One line: ``INVERTIBLE``, ``NOT INVERTIBLE (k families)``, or ``COULD NOT RUN ...``
        with the first exception's text (an error of the audit is never shown as a verdict)."""
        bad, err = self.failing, self.could_not_run
        if err:
            s = f"COULD NOT RUN {len(err)} of {len(self.families)} families: {self.first_error}"
            return s + (f"; NOT INVERTIBLE on {len(bad)} other families ({', '.join(bad)})" if bad else "")
        if bad:
            return f"NOT INVERTIBLE ({len(bad)} families)"
        return "INVERTIBLE"

    def __bool__(self) -> bool:
        return bool(self.invertible)

    def __getitem__(self, name: str) -> FamilyVerdict:
        return self.families[name]

    def to_dict(self) -> dict:
        return {"invertible": self.invertible, "headline": self.headline(), "tolerance": self.tolerance,
                "criterion": self.criterion, "failing": self.failing, "could_not_run": self.could_not_run,
                "families": {k: v.to_dict() for k, v in self.families.items()}}

    def table(self) -> str:
        """A plain-text table, one row per family, and the overall line."""
        head = ("family", "status", "fail", "nonfin", "raised", "outside", "max err", "max err f64", "cause",
                "culprit")
        rows = [head]
        for v in self.families.values():
            if v.status == COULD_NOT_RUN:
                rows.append((v.name, v.status, f"{v.n_error}/{v.n} errors", "-", "-", "-", "-", "-", "-", "-"))
                continue
            checked = f"{v.n_fail}/{v.n_checked}" + (f" (of {v.n_total})" if v.n_total else "")
            rows.append((v.name, v.status, checked, str(v.n_nonfinite), str(v.n_raised),
                         str(v.n_outside_domain), fmt_error(v.max_error), fmt_error(v.shadow_max_error),
                         v.cause or "-", v.culprit or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        errs = {}
        for v in self.families.values():
            if v.status == COULD_NOT_RUN:
                errs.setdefault(v.error, []).append(v.name)
        for text, names in errs.items():
            lines.append(f"could not run {', '.join(names)}: {text}")
        if errs:
            bad = self.failing
            lines.append(f"overall: COULD NOT RUN {len(self.could_not_run)} of {len(self.families)} families"
                         + (f"; NOT INVERTIBLE on {len(bad)} others" if bad else "")
                         + f" (within {self.criterion} tolerance {self.tolerance:g})")
        else:
            lines.append(f"overall: {self.headline()} within {self.criterion} tolerance {self.tolerance:g}")
        return "\n".join(lines)


def fmt_error(x: float | None) -> str:
    """An error for a table: 3 significant digits in any magnitude (``1.23e-17``, never
    ``0.000000``), ``inf``, ``-`` for none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


_fmt = fmt_error  # the name other modules import
