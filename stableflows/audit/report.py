"""The audit report: ``.verdict``, ``.to_json()``, ``.to_html(path)``, ``.summary()``.

JSON: strict JSON (no NaN tokens): non-finite floats are written as the strings ``"nan"``,
``"inf"``, ``"-inf"``. Per-example arrays are included (errors, float64 errors, repeated passes),
and per point the spectra, per layer the localisation.

HTML: one self-contained file; every plot is a PNG (matplotlib, Agg backend) embedded as base64.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .verdict import NOT_INVERTIBLE, OUTSIDE_DOMAIN, Verdict

__all__ = ["AuditReport", "jsonable", "new_report_dir", "write_text", "earlier_report"]

NONFINITE_COLOR = "tab:orange"  # paper 000 Fig. 2/5 mark inf / nan in orange


def jsonable(obj: Any) -> Any:
    """Plain JSON value of tensors, dataclasses, dicts and floats (non-finite floats as strings)."""
    if torch.is_tensor(obj):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    return str(obj)


def _spectra_dict(s) -> dict | None:
    if s is None:
        return None
    return {"method": s.method, "dtype": s.dtype, "steps": s.steps, "errors": s.errors, "index": s.index,
            "fwd_smin": s.fwd_smin, "fwd_smax": s.fwd_smax,
            "fwd_cond": s.fwd_cond, "inv_smin": s.inv_smin, "inv_smax": s.inv_smax, "inv_cond": s.inv_cond,
            "logdet_analytic": s.logdet_analytic, "logdet_numeric": s.logdet_numeric,
            "logdet_mismatch": s.logdet_mismatch}


def _quantiles(t: Tensor | None) -> dict | None:
    if t is None:
        return None
    t = t.double().reshape(-1)
    t = t[~torch.isnan(t)]
    if not t.numel():
        return None
    fin = t[torch.isfinite(t)]
    out = {"n": int(t.numel()), "nonfinite": int((~torch.isfinite(t)).sum()), "max": float(t.max()),
           "min": float(t.min())}
    if fin.numel():
        out.update(median=float(fin.median()), finite_max=float(fin.max()))
    return out


@dataclass
class AuditReport:
    meta: dict
    families: dict  # name -> FamilyResult
    attacks: dict  # "pgd:<constraint>" -> AttackOutcome
    verdict: Verdict
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    # ------------------------------------------------------------------ data
    def family_dict(self, name: str) -> dict:
        r = self.families[name]
        d: dict[str, Any] = {"kind": r.kind, "description": r.description, "verdict": r.verdict.to_dict(),
                             "counts": r.recon.counts(), "messages": r.recon.messages,
                             "temperature": r.temperature, "clip": r.clip, "generation": r.generation,
                             "errors": r.errors, "shadow_errors": r.shadow_errors,
                             "error_summary": {k: _quantiles(v) for k, v in r.errors.items()},
                             "shadow_summary": None if r.shadow_errors is None else
                             {k: _quantiles(v) for k, v in r.shadow_errors.items()}}
        if r.repeated is not None:
            d["repeated"] = {"per_example": r.repeated, "median": _col(r.repeated, "median"),
                             "max": _col(r.repeated, "max")}
        d["spectra"] = _spectra_dict(r.spectra)
        if r.spectra is not None:
            d["spectra_summary"] = {k: _quantiles(getattr(r.spectra, k)) for k in
                                    ("fwd_smin", "fwd_smax", "fwd_cond", "inv_smin", "inv_smax", "inv_cond")}
        if r.localization is not None:
            loc = r.localization
            d["localization"] = {"mode": loc.mode, "n_examples": loc.n_examples, "culprit": loc.culprit,
                                 "reason": loc.reason, "max_gain_layer": loc.max_gain_layer, "path": loc.path,
                                 "note": loc.note, "layers": [asdict(x) for x in loc.layers]}
        return d

    def to_dict(self) -> dict:
        attacks = {}
        for k, a in self.attacks.items():
            attacks[k] = {"constraint": a.constraint, "status": a.pgd.status, "message": a.pgd.message,
                          "settings": a.pgd.settings, "verdict": a.verdict.to_dict(),
                          "pct_nonfinite": a.pgd.pct_nonfinite, "best_err": a.pgd.best_err,
                          "start_err": a.pgd.start_err, "history": a.pgd.history, "errors": a.errors,
                          "n_from_random": None if a.from_random is None else int(a.from_random.sum()),
                          "random": None if a.random is None else {
                              "best_err": a.random.best_err, "pct_nonfinite": a.random.pct_nonfinite,
                              "history": a.random.history, "status": a.random.status}}
        return jsonable({"verdict": self.verdict.to_dict(), "meta": self.meta, "timings": self.timings,
                         "notes": self.notes, "families": {k: self.family_dict(k) for k in self.families},
                         "attacks": attacks})

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        """The report as strict JSON (written to ``path`` too when given)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            write_text(path, text)
        return text

    def summary(self) -> str:
        """The headline when the audit could not run a family, the verdict table, what the time
        budget cut, the notes and the timings."""
        lines = []
        if self.verdict.could_not_run:
            lines.append(f"could not run: {self.verdict.first_error}")
        lines.append(self.verdict.table())
        cuts = (self.meta.get("budget") or {}).get("cuts") or []
        if cuts:
            lines.append(f"time budget {self.meta['budget']['seconds']:g} s; cut to keep it:")
            lines += [f"  - {c}" for c in cuts]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page (plots embedded as base64 PNG); returns the path."""
        from .plots import render_html

        p = Path(path)
        write_text(p, render_html(self))
        return p


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (a temporary file in the same directory, then a rename), with the
    mode the user's umask gives a new file."""
    import os

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def new_report_dir(parent: str | Path, label: str) -> Path:
    """A directory ``parent/<label>-<YYYYmmdd-HHMMSS>`` that does not exist yet (``-2``, ``-3`` ...
    appended if needed), created: every invocation gets its own, nothing is overwritten."""
    import time

    parent = Path(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{label}-{stamp}" if label else stamp
    for k in range(1, 10000):
        d = parent / (base if k == 1 else f"{base}-{k}")
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"no free report directory under {parent}")


def earlier_report(out: Path, names: tuple[str, ...]) -> list[str]:
    """The report files of an earlier run already in ``out`` (they are about to be replaced)."""
    return [n for n in names if (Path(out) / n).exists()]


def _col(t: Tensor, how: str) -> list:
    out = []
    for j in range(t.shape[1]):
        c = t[:, j]
        c = c[~torch.isnan(c)]
        if not c.numel():
            out.append(math.nan)
        elif how == "max":
            out.append(float(c.max()))
        else:
            out.append(float(c.median()))
    return out


def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def esc(s: Any) -> str:
    return html.escape(str(s))


STATUS_COLORS = {NOT_INVERTIBLE: "#f8d0d0", OUTSIDE_DOMAIN: "#eeeeee"}
