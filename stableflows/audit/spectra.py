"""Jacobian spectra of the forward ``J_F(x)`` and of the inverse ``J_{F^-1}(z)``, ``z = F(x)``.

Reported per point: ``sigma_min``, ``sigma_max`` and the condition number ``sigma_max / sigma_min``
(paper 000 Fig. 2/5; the supervised table of paper 001 lists min/max singular values).

* **exact**: the full Jacobian as ``D`` vector-Jacobian products of ``x -> sum_b F(x)_b`` over one
  forward graph (:mod:`.autodiff`; valid because a flow acts on each example independently), then
  ``torch.linalg.svdvals`` in float64. Also the numerical ``log|det J| = sum_i log sigma_i`` to
  compare with the model's analytic log-det.
* **iterative**: Lanczos on ``J^T J`` with full re-orthogonalisation, using only Jacobian-vector
  products and vector-Jacobian products (:mod:`.autodiff`), never
  the full Jacobian. Ritz values bound the spectrum from inside: ``lambda_max`` converges from below
  in a few steps, ``lambda_min`` from above but slowly (and ``J^T J`` squares the condition number).
  So ``sigma_min(J_F)`` is also estimated as ``1 / sigma_max(J_{F^-1})`` (exact when the inverse is
  exact); the smaller of the two upper bounds is reported, and symmetrically for the inverse.
  ``J^T J v`` carries an error of ~``eps * lambda_max`` in the model's dtype, so a smallest Ritz value
  below ``RITZ_FLOOR_ULPS * eps * lambda_max`` (float32: ``sigma_max / sigma_min`` above ~700) is
  rounding and gives no bound, nor does an overflowed ``sigma_max``; where neither estimate is
  left, ``sigma_min`` is NaN ("unresolved"), never 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import autodiff as _ad

__all__ = ["Spectra", "jacobians", "exact_singular_values", "lanczos_gram_extremes", "spectra",
           "probe_vjp_seconds", "EXACT_MAX_DIM", "LANCZOS_STEPS", "MIN_LANCZOS", "JACOBIAN_CHUNK_BYTES",
           "RITZ_FLOOR_ULPS"]

EXACT_MAX_DIM = 4096  # above this dimension "auto" switches to the iterative estimate
LANCZOS_STEPS = 48  # Lanczos iterations (capped at the dimension)
MIN_LANCZOS = 8  # fewest Lanczos steps a time budget may choose (sigma_max converges in a few)
JACOBIAN_CHUNK_BYTES = 2 ** 28  # memory of one chunk of Jacobians (B_chunk * D_out * D_in entries)
BREAKDOWN = 1e-10  # relative Lanczos residual below which the Krylov space is exhausted
RITZ_FLOOR_ULPS = 16  # lambda_min(J^T J) below this many eps(dtype) * lambda_max is unresolved (NaN)


def _flat(fn: Callable[[Tensor], Tensor], in_shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """``(B, D) -> (B, D_out)`` view of ``fn`` on ``(B, *in_shape)``."""
    def f(v: Tensor) -> Tensor:
        out = fn(v.reshape(v.shape[0], *in_shape))
        return out.reshape(out.shape[0], -1)
    return f


def jacobians(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-example Jacobians ``(B, D_out, D_in)`` of a batch-independent ``fn`` at ``x (B, *shape)``."""
    f = _flat(fn, tuple(x.shape[1:]))
    xf = x.reshape(x.shape[0], -1).detach()
    d = xf.shape[1]
    chunk = max(1, JACOBIAN_CHUNK_BYTES // max(d * d * xf.element_size(), 1))
    return _ad.jacobians(f, xf, chunk=chunk)


def exact_singular_values(jac: Tensor) -> Tensor:
    """Singular values ``(B, min(D_out, D_in))`` in descending order; rows of NaN where ``jac`` is not finite."""
    ok = torch.isfinite(jac.reshape(jac.shape[0], -1)).all(dim=1)
    sv = torch.full((jac.shape[0], min(jac.shape[1:])), float("nan"), dtype=jac.dtype)
    if ok.any():
        sv[ok] = torch.linalg.svdvals(jac[ok])
    return sv


def lanczos_gram_extremes(fn: Callable[[Tensor], Tensor], x: Tensor, steps: int = LANCZOS_STEPS, *,
                          generator: torch.Generator | None = None, deadline: float | None = None,
                          info: dict | None = None) -> tuple[Tensor, Tensor]:
    """Largest and smallest Ritz values ``(B,), (B,)`` of ``J^T J`` after ``steps`` Lanczos steps.

    Batched over examples. With ``steps >= D`` (and exact arithmetic) they are the extreme
    eigenvalues; a Krylov breakdown restarts with a fresh orthogonal vector. ``deadline`` (a
    ``time.perf_counter()`` value) stops after the step during which it passes (at least two
    steps); ``info["steps"]`` gets the steps done.
    """
    f = _flat(fn, tuple(x.shape[1:]))
    xf = x.reshape(x.shape[0], -1).detach()
    b, d = xf.shape
    m = max(1, min(int(steps), d))
    _, vjp = _ad.vjp_fn(f, xf)
    jvp = _ad.jvp_fn(f, xf)

    def gram(v: Tensor) -> Tensor:
        """``J^T J v`` in float64, scaled so that no intermediate overflows the model dtype."""
        u = jvp(v.to(xf.dtype)).double()  # J v
        s = u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return vjp((u / s).to(xf.dtype)).double() * s

    def rand_unit(q_basis: Tensor | None) -> Tensor:
        v = torch.randn((b, d), generator=generator, dtype=torch.float64).to(xf.device)
        if q_basis is not None:
            for _ in range(2):
                v = v - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", q_basis, v), q_basis)
        return v / v.norm(dim=1, keepdim=True)

    # the Lanczos recurrence itself runs in float64 whatever the model's dtype
    f64 = dict(dtype=torch.float64, device=xf.device)
    Q = torch.zeros((b, m, d), **f64)
    alpha = torch.zeros((b, m), **f64)
    beta = torch.zeros((b, m), **f64)
    q, q_prev, beta_prev = rand_unit(None), torch.zeros((b, d), **f64), torch.zeros(b, **f64)
    scale = torch.ones(b, **f64)
    for j in range(m):
        Q[:, j] = q
        w = gram(q)
        a = (q * w).sum(1)
        w = w - a[:, None] * q - beta_prev[:, None] * q_prev
        basis = Q[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation
            w = w - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", basis, w), basis)
        nb = w.norm(dim=1)
        alpha[:, j] = a
        scale = torch.maximum(scale, a.abs())
        if j == m - 1:
            break
        if deadline is not None and j >= 1 and time.perf_counter() > deadline:
            m = j + 1
            alpha, beta = alpha[:, :m], beta[:, :m]
            break
        dead = ~(nb > BREAKDOWN * scale)  # also catches NaN
        fresh = rand_unit(basis) if bool(dead.any()) else None
        q_new = torch.where(dead[:, None], fresh if fresh is not None else w, w / nb.clamp_min(1e-300)[:, None])
        nb = torch.where(dead, torch.zeros_like(nb), nb)
        beta[:, j] = nb
        q_prev, q, beta_prev = q, q_new, nb
    if info is not None:
        info["steps"] = m
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
    ok = torch.isfinite(T.reshape(b, -1)).all(dim=1)
    lam_max = torch.full((b,), float("nan"), dtype=torch.float64)
    lam_min = torch.full((b,), float("nan"), dtype=torch.float64)
    if ok.any():
        ev = torch.linalg.eigvalsh(T[ok])  # ascending
        lo, hi = ev[:, 0], ev[:, -1]
        # J^T J v is computed in the model's dtype: its error is ~eps * lambda_max, so a smallest Ritz
        # value below RITZ_FLOOR_ULPS * eps * lambda_max (or <= 0) is rounding, not an upper bound
        floor = RITZ_FLOOR_ULPS * torch.finfo(xf.dtype).eps * hi
        lam_max[ok] = hi.cpu()
        lam_min[ok] = torch.where(lo > floor, lo, torch.full_like(lo, float("nan"))).cpu()
    return lam_max, lam_min


@dataclass
class Spectra:
    """Singular values of ``J_F`` at ``x`` and of ``J_{F^-1}`` at ``z = F(x)`` for ``P`` points."""

    method: str  # "exact" or "iterative"
    dtype: str  # the dtype they were computed in (the float64 shadow when there is one)
    index: Tensor  # (P,) positions of the points in their family
    fwd_smin: Tensor
    fwd_smax: Tensor
    inv_smin: Tensor
    inv_smax: Tensor
    logdet_analytic: Tensor | None = None  # (P,) the model's log|det J_F|
    logdet_numeric: Tensor | None = None  # (P,) sum of log singular values of the exact Jacobian
    steps: int | None = None  # Lanczos steps (iterative)
    errors: list = field(default_factory=list)  # what could not be computed, and why
    steps_used: tuple | None = None  # Lanczos steps done (forward, inverse) when a deadline stopped them

    @property
    def fwd_cond(self) -> Tensor:
        return self.fwd_smax / self.fwd_smin

    @property
    def inv_cond(self) -> Tensor:
        return self.inv_smax / self.inv_smin

    @property
    def logdet_mismatch(self) -> Tensor | None:
        if self.logdet_analytic is None or self.logdet_numeric is None:
            return None
        return (self.logdet_analytic - self.logdet_numeric).abs()


def _reciprocal(s: Tensor) -> Tensor:
    """``1 / s`` where ``s`` is finite and positive, NaN (unresolved) elsewhere."""
    ok = torch.isfinite(s) & (s > 0)
    return torch.where(ok, 1.0 / torch.where(ok, s, torch.ones_like(s)), torch.full_like(s, float("nan")))


def _safe(fn, x, errors: list | None = None, what: str = ""):
    try:
        return fn(x)
    except Exception as e:  # noqa: BLE001 - reported as NaN spectra, with the reason
        if errors is not None:
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def probe_vjp_seconds(model, x: Tensor) -> tuple[float, float] | None:
    """``(t_graph, t_vjp)``: seconds to build the autograd graphs of forward and inverse at the
    points ``x`` and of one vector-Jacobian product through each (None if they fail)."""
    from . import autodiff as _ad

    f = _flat(model.forward, tuple(x.shape[1:]))
    xf = x.reshape(x.shape[0], -1).detach()
    try:
        with torch.no_grad():
            z = model.forward(x)
        g = _flat(model.inverse, tuple(z.shape[1:]))
        zf = z.reshape(z.shape[0], -1).detach()
        t_graph = t_vjp = 0.0
        for fn, inp in ((f, xf), (g, zf)):
            t0 = time.perf_counter()
            y, back = _ad.vjp_fn(fn, inp)
            t1 = time.perf_counter()
            back(torch.ones_like(y))
            t2 = time.perf_counter()
            t_graph += t1 - t0
            t_vjp += t2 - t1
        return t_graph, t_vjp
    except Exception:  # noqa: BLE001 - the spectra themselves will report it
        return None


def spectra(model, x: Tensor, index: Tensor, *, method: str = "auto", steps: int = LANCZOS_STEPS,
            exact_max_dim: int = EXACT_MAX_DIM, seed: int = 0, deadline: float | None = None) -> Spectra:
    """Spectra of ``model`` (an :class:`~stableflows.audit.adapters.Invertible`, already in the
    wanted dtype) at the points ``x (P, *shape)``; ``index`` names them in their family.
    ``deadline`` stops the Lanczos iterations early (the forward gets half the time left).
    Computed in ``model.eval_mode()``: eval mode and stored activations (memory-saving gradients
    recompute through the inverse under test and are once differentiable)."""
    if method not in ("auto", "exact", "iterative"):
        raise ValueError(f"spectra method must be auto, exact or iterative, got {method!r}")
    with model.eval_mode():
        return _spectra(model, x, index, method=method, steps=steps, exact_max_dim=exact_max_dim, seed=seed,
                        deadline=deadline)


def _spectra(model, x: Tensor, index: Tensor, *, method: str, steps: int, exact_max_dim: int, seed: int,
             deadline: float | None) -> Spectra:
    d = math.prod(x.shape[1:])
    if method == "auto":
        method = "exact" if d <= exact_max_dim else "iterative"
    x = x.detach().to(model.dtype)
    p = x.shape[0]
    nan = torch.full((p,), float("nan"), dtype=torch.float64)
    res = Spectra(method, str(model.dtype).replace("torch.", ""), index.clone(), nan.clone(), nan.clone(),
                  nan.clone(), nan.clone())
    err = res.errors
    with torch.no_grad():
        z = _safe(model.forward, x, err, "forward")
    if z is None:
        return res
    if method == "exact":
        jf = _safe(lambda t: jacobians(model.forward, t), x, err, "forward Jacobian")
        ji = _safe(lambda t: jacobians(model.inverse, t), z, err, "inverse Jacobian")
        if jf is not None:
            sv = exact_singular_values(jf.double()).cpu()
            res.fwd_smax, res.fwd_smin = sv[:, 0], sv[:, -1]
            # log|det J| = sum log sigma_i from the SVD already computed (NaN rows stay NaN). Not
            # slogdet: MKL's batched LU printed "Parameter 6 was incorrect on entry to DLASWP" and
            # never returned on 16 Jacobians (784 x 784) of a trained 28x28 affine classifier
            res.logdet_numeric = sv.log().sum(dim=1) if jf.shape[1] == jf.shape[2] else \
                torch.full((p,), float("nan"), dtype=torch.float64)
        if ji is not None:
            sv = exact_singular_values(ji.double()).cpu()
            res.inv_smax, res.inv_smin = sv[:, 0], sv[:, -1]
    else:
        g = torch.Generator().manual_seed(seed)
        half = None if deadline is None else time.perf_counter() + (deadline - time.perf_counter()) / 2
        info_f: dict = {}
        info_i: dict = {}
        lf = _safe(lambda t: lanczos_gram_extremes(model.forward, t, steps, generator=g, deadline=half, info=info_f),
                   x, err, "forward Lanczos")
        li = _safe(lambda t: lanczos_gram_extremes(model.inverse, t, steps, generator=g, deadline=deadline,
                                                   info=info_i), z, err, "inverse Lanczos")
        res.steps = max(info_f.get("steps", 0), info_i.get("steps", 0)) or steps
        res.steps_used = (info_f.get("steps"), info_i.get("steps"))
        if lf is not None:
            res.fwd_smax, res.fwd_smin = lf[0].double().sqrt(), lf[1].double().sqrt()
        if li is not None:
            res.inv_smax, res.inv_smin = li[0].double().sqrt(), li[1].double().sqrt()
        # sigma_min(J_F) = 1 / sigma_max(J_F^-1): both estimates are upper bounds, keep the smaller
        # (fmin skips NaN; an infinite sigma_max overflowed and bounds nothing, so it reads NaN, not 0)
        res.fwd_smin = torch.fmin(res.fwd_smin, _reciprocal(res.inv_smax))
        res.inv_smin = torch.fmin(res.inv_smin, _reciprocal(res.fwd_smax))
    if model.has_logdet:
        with torch.no_grad():
            ld = _safe(model.logdet, x, err, "analytic log-det")
        if ld is not None:
            res.logdet_analytic = ld.detach().double().cpu().reshape(p)
    return res
