"""Scale parameterisations of affine coupling: ``raw -> (scale, log_scale)``.

An affine coupling computes ``y = x * scale(s) + t`` and divides by ``scale(s)`` on the inverse, so a
scale near zero amplifies every error by ``1 / scale`` (Daniels, *Design Choices for Invertible
Neural Networks*, sec. 2: Glow's sigmoid scale collapses towards 0 on distribution-shifted inputs
such as latent codes near the origin). The parameterisations here differ only in how far the scale
is kept from 0 and infinity:

=================  =====================================  ==========================
name               scale(s)                               range
=================  =====================================  ==========================
``exp``            ``exp(s)``                             (0, inf)   unbounded
``sigmoid``        ``sigma(s + 2)``  (Glow)               (0, 1)
``biased_sigmoid`` ``sigma(s) + eps``  (Daniels)          (eps, 1 + eps)
``bounded``        ``a + (b - a) sigma(s)``  (Daniels)    (a, b), 0 < a < b
``tanh_clamp``     ``exp(c tanh(s / c))``                 (exp(-c), exp(c))
``atan_clamp``     ``exp(c 2/pi atan(s / c))``  (FrEIA)   (exp(-c), exp(c))
=================  =====================================  ==========================

Every ``log_scale`` is computed in log space (``logsigmoid``, ``logaddexp``), never as ``log`` of
a rounded scale, so it stays finite and exact where the scale itself underflows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Scale",
    "ExpScale",
    "SigmoidScale",
    "BiasedSigmoidScale",
    "BoundedScale",
    "TanhClampScale",
    "AtanClampScale",
    "SCALES",
    "make_scale",
    "GLOW_SIGMOID_SHIFT",
    "BIASED_SIGMOID_EPS",
    "BOUNDED_LOWER",
    "BOUNDED_UPPER",
    "SOFT_CLAMP",
]

GLOW_SIGMOID_SHIFT = 2.0
"""Glow's ``scale = sigmoid(s + 2)`` (openai/glow ``model.py``): ~0.88 at ``s = 0``."""

BIASED_SIGMOID_EPS = 0.5
"""``scale = sigmoid(s) + eps``. Daniels (paper 003, sec. 2.1) gives no value; 0.5 makes a
zero-initialised conditioner the exact identity (``sigmoid(0) + 0.5 = 1``), keeps the scale
symmetric around 1 in ``(0.5, 1.5)`` and bounds the inverse amplification by ``1 / eps = 2`` per layer."""

BOUNDED_LOWER = 0.5
BOUNDED_UPPER = 1.0
"""Default ``[a, b]`` of the bounded net (Daniels: ``[a, b]`` inside ``[0, 1]``; no value given)."""

SOFT_CLAMP = 2.0
"""Default soft-clamp ``c`` of ``tanh_clamp`` / ``atan_clamp`` (FrEIA's default ``clamp=2``):
``|log scale| < c``, i.e. scales in ``(exp(-2), exp(2)) = (0.135, 7.39)``."""


class Scale(nn.Module):
    """A scale parameterisation: ``forward(raw) -> (scale, log_scale)``, both of ``raw``'s shape.

    ``lower`` / ``upper`` are the bounds of the scale (``upper`` may be ``inf``); the scale lies in
    the closed interval ``[lower, upper]`` in floating point (open in exact arithmetic).
    """

    lower: float = 0.0
    upper: float = math.inf

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class ExpScale(Scale):
    """``scale = exp(s)`` (RealNVP). Unbounded: overflows for ``s > ~88`` in float32."""

    def forward(self, raw):
        return raw.exp(), raw


class SigmoidScale(Scale):
    """``scale = sigmoid(s + 2)`` (Glow, Kingma & Dhariwal 2018). Only shrinks; can reach ~0."""

    upper = 1.0

    def forward(self, raw):
        u = raw + GLOW_SIGMOID_SHIFT
        return torch.sigmoid(u), F.logsigmoid(u)


def _log_affine_sigmoid(raw: Tensor, low: float, width: float) -> Tensor:
    """``log(low + width * sigmoid(raw))`` in log space, exact for every ``raw``."""
    log_low = torch.full_like(raw, math.log(low))
    return torch.logaddexp(log_low, math.log(width) + F.logsigmoid(raw))


class BiasedSigmoidScale(Scale):
    """``scale = sigmoid(s) + eps`` (Daniels, "Biased Sigmoid"): bounded away from zero by ``eps``."""

    def __init__(self, eps: float = BIASED_SIGMOID_EPS):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"biased_sigmoid needs eps > 0, got {eps}")
        self.eps = float(eps)
        self.lower, self.upper = self.eps, 1.0 + self.eps

    def forward(self, raw):
        return torch.sigmoid(raw) + self.eps, _log_affine_sigmoid(raw, self.eps, 1.0)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class BoundedScale(Scale):
    """``scale = a + (b - a) sigmoid(s)`` (Daniels, "Bounded Net"), ``0 < a < b``."""

    def __init__(self, a: float = BOUNDED_LOWER, b: float = BOUNDED_UPPER):
        super().__init__()
        if not (a > 0 and b > a and math.isfinite(b)):
            raise ValueError(f"bounded scale needs 0 < a < b < inf, got a={a}, b={b}")
        self.a, self.b = float(a), float(b)
        self.lower, self.upper = self.a, self.b

    def forward(self, raw):
        return self.a + (self.b - self.a) * torch.sigmoid(raw), _log_affine_sigmoid(raw, self.a, self.b - self.a)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"


class _SoftClamp(Scale):
    """``log_scale = c * g(s / c)`` with a bounded odd ``g``, ``|g| <= 1``, ``g'(0) = 1``."""

    def __init__(self, c: float = SOFT_CLAMP):
        super().__init__()
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"soft clamp needs a finite c > 0, got {c}")
        self.c = float(c)
        self.lower, self.upper = math.exp(-self.c), math.exp(self.c)

    def _g(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, raw):
        log_scale = self.c * self._g(raw / self.c)
        return log_scale.exp(), log_scale

    def extra_repr(self) -> str:
        return f"c={self.c}"


class TanhClampScale(_SoftClamp):
    """``scale = exp(c tanh(s / c))``: a soft clamp of the log-scale to ``(-c, c)``."""

    def _g(self, u):
        return torch.tanh(u)


class AtanClampScale(_SoftClamp):
    """``scale = exp(c (2/pi) atan(s / c))`` (FrEIA's soft clamp); slower saturation than tanh."""

    def _g(self, u):
        return (2.0 / math.pi) * torch.atan(u)


SCALES: dict[str, type[Scale]] = {
    "exp": ExpScale,
    "sigmoid": SigmoidScale,
    "biased_sigmoid": BiasedSigmoidScale,
    "bounded": BoundedScale,
    "tanh_clamp": TanhClampScale,
    "atan_clamp": AtanClampScale,
}


def make_scale(name: str, **params) -> Scale:
    """The scale parameterisation ``name`` (a key of :data:`SCALES`) built with ``params``::

        make_scale("bounded", a=0.2, b=1.0)(raw)  # -> (scale, log_scale)
    """
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known scales: {', '.join(sorted(SCALES))}")
    try:
        return SCALES[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters {params} for scale {name!r}: {e}") from e
