"""Is a likelihood meaningful? Check that the flow is numerically invertible on each input family.

A flow's ``log p(x)`` presumes that ``F`` is a bijection at ``x``. Where the round trip
``x_hat = F^-1(F(x))`` is non-finite or far from ``x`` the inverse has exploded (Behrmann et al.,
paper 000/001: Glow on out-of-distribution inputs), and the density there describes a map that
is no longer the model's: such a likelihood is flagged *meaningless*.

Per example (docs/METRICS.md): ``err = ||x - x_hat||_2``; the example is invertible within tolerance when
``x_hat`` is finite and ``err <= tol`` (default ``1e-3``, float32, data in [0, 1]). The round trip
and error definitions are those of :mod:`stableflows.audit.reconstruction`. :func:`invertibility`
flags every scored example; :func:`audit_verdicts` adds the audit's per-family verdicts (with the
float64 shadow and the layer where the inverse first fails) on the audit's own family inputs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["INVERTIBLE_TOL", "invertibility", "audit_verdicts", "VERDICTS", "AUDIT_EXTRA"]

INVERTIBLE_TOL = 1e-3  # docs/METRICS.md: invertible within tolerance
VERDICTS = ("invertible", "not invertible", "outside domain")


def _device_dtype(flow: nn.Module):
    p = next((t for t in list(flow.parameters()) + list(flow.buffers()) if torch.is_floating_point(t)), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def invertibility(flow: nn.Module, v: Tensor, *, tol: float = INVERTIBLE_TOL, batch_size: int = 512) -> dict:
    """Round-trip every model-space input of ``v`` through ``flow`` (its dtype and device).

    Returns per-example ``meaningless`` (bool numpy, non-finite or ``err > tol``; inputs outside the
    model's domain are not flagged here -- they have no likelihood at all -- nor are those whose
    computation raised an error) and a JSON-friendly summary: counts, error quantiles, ``verdict``
    (``invertible`` when every in-domain example is within tolerance, ``outside domain`` when no
    example is in the domain, ``could not run`` when an example raised an error that is not a
    verdict, with its text under ``error``).
    """
    from ..audit.adapters import as_invertible
    from ..audit.reconstruction import reconstruct

    device, dtype = _device_dtype(flow)
    model = as_invertible(flow)
    with model.eval_mode():
        rec = reconstruct(model, v.to(device=device, dtype=dtype), batch_size=batch_size, keep=False)
    err = rec.err_l2.double().cpu().numpy()
    dom = rec.outside_domain.cpu().numpy()
    could_not = rec.error.cpu().numpy()
    finite = rec.finite_inverse.cpu().numpy()
    meaningless = ~dom & ~could_not & (~finite | ~(err <= tol))
    ind = ~dom & ~could_not
    e_in = err[ind & np.isfinite(err)]
    counts = rec.counts()
    summary = {
        **counts,
        "tolerance": tol,
        "n_meaningless": int(meaningless.sum()),
        "frac_meaningless": float(meaningless.sum() / max(int(ind.sum()), 1)),
        "max_err": float(e_in.max()) if e_in.size else None,
        "median_err": float(np.median(e_in)) if e_in.size else None,
        "verdict": ("could not run" if could_not.any() else "outside domain" if not ind.any() else
                    "invertible" if not meaningless.any() else "not invertible"),
        "error": rec.first_error(),
        "messages": {k: int(c) for k, c in list(rec.messages.items())[:5]},
        "source": "stableflows.audit.reconstruction",
    }
    return {"meaningless": meaningless, "err": err, "summary": summary}


AUDIT_EXTRA = ("test", "samples")  # audit families added to the OOD ones: held-out data and model samples


def audit_verdicts(flow: nn.Module, splits, families, *, n: int | None = None, tol: float = INVERTIBLE_TOL,
                   seed: int = 0) -> dict:
    """Per-family verdicts of :func:`stableflows.audit.audit` (its own family inputs, float64 shadow to
    separate floating-point from model causes, per-layer culprit of failures; no spectra or repeated
    passes) for the generated OOD families in ``families`` plus held-out data and samples.
    Returns ``{family: verdict dict}`` (see :class:`stableflows.audit.verdict.FamilyVerdict`)."""
    from ..audit import audit
    from ..audit.families import OOD_NAMES

    names = list(AUDIT_EXTRA) + [f for f in families if f in OOD_NAMES]
    rep = audit(flow, splits, families=",".join(names), n=n, tolerance=tol, repeat=0, spectra_points=0,
                localize=True, localize_points=8, shadow=True, seed=seed)
    return {k: v.to_dict() for k, v in rep.verdict.families.items()}
