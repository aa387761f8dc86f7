"""Rational-quadratic spline coupling (Durkan, Bekasov, Murray & Papamakarios 2019, "Neural Spline
Flows", sec. 3.1; Gregory & Delbourgo 1982).

On ``[-B, B]`` the map is a monotone rational-quadratic spline through ``K + 1`` knots
``(x_k, y_k)`` with derivatives ``d_k > 0``; outside it is the identity (linear tails, so
``d_0 = d_K = 1``). In bin ``k`` with ``w = x_{k+1} - x_k``, ``h = y_{k+1} - y_k``, ``s = h / w``
and ``xi = (x - x_k) / w``::

    y = y_k + h [s xi^2 + d_k xi (1 - xi)] / [s + (d_{k+1} + d_k - 2 s) xi (1 - xi)]
    dy/dx = s^2 [d_{k+1} xi^2 + 2 s xi (1 - xi) + d_k (1 - xi)^2] / [s + (d_{k+1} + d_k - 2 s) xi (1 - xi)]^2

The inverse solves the quadratic ``a xi^2 + b xi + c = 0`` of the bin of ``y`` with the root
``xi = 2c / (-b - sqrt(b^2 - 4ac))`` (no cancellation: ``b <= 0 <= -b`` and ``c <= 0``).

Stability: widths and heights are at least ``MIN_BIN`` of the interval and knot derivatives at
least ``MIN_DERIVATIVE``, so the map is strictly monotone, finite and its inverse is finite for any
conditioner output, and the identity tails keep inputs far outside the training range from being
stretched at all (unlike an affine coupling, whose scale acts on every input, :mod:`.scales`).
The bounds do not make it well conditioned: with extreme conditioner outputs the slope inside a bin
can fall to ~1e-8 (``tests/test_splines.py``), and the inverse then amplifies the rounding of ``y`` by
its reciprocal; ``stableflows audit`` measures that on a trained model. A zero conditioner output
gives equal bins and ``d_k = 1``: the identity.

:class:`SplineCoupling` is a :class:`~stableflows.transforms.coupling.Coupling`: the conditioner
gives ``3K - 1`` numbers per transformed entry (``K`` widths, ``K`` heights, ``K - 1`` inner derivatives).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import stats_wanted
from .coupling import Coupling

__all__ = ["rq_spline", "SplineCoupling", "DEFAULT_BINS", "DEFAULT_BOUND", "MIN_BIN", "MIN_DERIVATIVE"]

DEFAULT_BINS = 8  # K (zuko's and the paper's image experiments' value)
DEFAULT_BOUND = 5.0  # B: the spline acts on [-B, B] (ActNorm-normalised activations lie well inside)
MIN_BIN = 1e-3  # smallest bin width / height, as a fraction of 2B
MIN_DERIVATIVE = 1e-3  # smallest knot derivative
_SOFTPLUS_ONE = math.log(math.expm1(1.0 - MIN_DERIVATIVE))  # MIN_DERIVATIVE + softplus(0 + this) = 1: d_k = 1


def _knots(raw: Tensor, bound: float) -> Tensor:
    """Knot positions ``(..., K + 1)`` from unnormalised bin sizes ``raw (..., K)``: ``-B .. B``."""
    k = raw.shape[-1]
    size = MIN_BIN + (1.0 - MIN_BIN * k) * torch.softmax(raw, dim=-1)
    cum = F.pad(torch.cumsum(size, dim=-1), (1, 0))
    cum = 2 * bound * cum - bound
    end = torch.full_like(cum[..., :1], bound)  # exact end points (the cumulative sum may miss B by rounding)
    return torch.cat([-end, cum[..., 1:-1], end], dim=-1)


def rq_spline(x: Tensor, raw_w: Tensor, raw_h: Tensor, raw_d: Tensor, *, bound: float = DEFAULT_BOUND,
              inverse: bool = False) -> tuple[Tensor, Tensor]:
    """The spline (or its inverse) applied elementwise: ``x (...)`` with parameters ``raw_w, raw_h (..., K)``
    and ``raw_d (..., K - 1)``. Returns ``(y, log|dy/dx|)`` elementwise (for the inverse: ``(x, log|dx/dy|)``)."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"spline bound must be a positive number, got {bound}")
    k = raw_w.shape[-1]
    if raw_h.shape[-1] != k or raw_d.shape[-1] != k - 1:
        raise ValueError(f"need K widths, K heights and K - 1 derivatives, got {raw_w.shape[-1]}, "
                         f"{raw_h.shape[-1]}, {raw_d.shape[-1]}")
    xk, yk = _knots(raw_w, bound), _knots(raw_h, bound)  # (..., K + 1)
    one = raw_d.new_ones(raw_d.shape[:-1] + (1,))
    d = torch.cat([one, MIN_DERIVATIVE + F.softplus(raw_d + _SOFTPLUS_ONE), one], dim=-1)  # (..., K + 1)
    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)  # outside: computed on the boundary, then replaced by the identity
    knots = yk if inverse else xk
    # bin index: number of inner knots <= value (0 .. K - 1)
    idx = (xc[..., None] >= knots[..., 1:-1]).sum(dim=-1, keepdim=True)

    def at(t: Tensor, j: Tensor) -> Tensor:
        return t.gather(-1, j).squeeze(-1)

    x0, w = at(xk, idx), at(xk, idx + 1) - at(xk, idx)
    y0, h = at(yk, idx), at(yk, idx + 1) - at(yk, idx)
    d0, d1 = at(d, idx), at(d, idx + 1)
    s = h / w
    if not inverse:
        xi = (xc - x0) / w
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        out = y0 + h * (s * xi * xi + d0 * t) / den
    else:
        dy = xc - y0
        a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = h * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp(min=0.0)
        xi = (2 * c / (-b - disc.sqrt())).clamp(0.0, 1.0)
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        out = x0 + xi * w
    logd = 2 * torch.log(s) + torch.log(d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2) - 2 * torch.log(den)
    if inverse:
        logd = -logd
    return torch.where(inside, out, x), torch.where(inside, logd, torch.zeros_like(logd))


class SplineCoupling(Coupling):
    """``y_b = RQS(x_b; theta(x_a))`` on ``[-bound, bound]``, identity outside; ``bins`` = K.
    ``stats`` (when asked): ``outside_fraction`` (share of transformed entries in the identity tails) of the last call."""

    def __init__(self, shape, *, mask: str = "channel", parity: int = 0, hidden: int = 64, bins: int = DEFAULT_BINS,
                 bound: float = DEFAULT_BOUND):
        if bins < 2:
            raise ValueError(f"a spline needs at least 2 bins, got {bins}")
        if not (bound > 0 and math.isfinite(bound)):
            raise ValueError(f"spline bound must be a positive number, got {bound}")
        self.n_params = 3 * bins - 1  # read by Coupling.__init__ to size the conditioner
        self.bins, self.bound = int(bins), float(bound)
        super().__init__(shape, mask=mask, parity=parity, hidden=hidden)

    def _spline(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.bins
        p = params.transpose(1, 2)  # (B, N_b, 3K - 1)
        out, logd = rq_spline(v, p[..., :k], p[..., k:2 * k], p[..., 2 * k:], bound=self.bound, inverse=inverse)
        if stats_wanted():
            with torch.no_grad():
                self.stats = {"outside_fraction": (v.abs() > self.bound).double().mean()}
        return out, logd.sum(dim=1)

    def _couple(self, xb, params):
        return self._spline(xb, params, inverse=False)

    def _uncouple(self, yb, params):
        return self._spline(yb, params, inverse=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, bound={self.bound:g}"
