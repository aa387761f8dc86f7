"""Conditional layers: bijections in ``x`` whose parameters depend on a context ``c`` (conditional
invertible neural networks, cINNs: Ardizzone, Kruse, Rother & Koethe 2019, "Analyzing inverse
problems with invertible neural networks"; Ardizzone, Luth, Kruse, Rother & Koethe 2019, "Guided
image generation with conditional invertible neural networks"; FrEIA's ``cond=`` / ``c=[...]``).

A conditional coupling is the coupling of :mod:`.coupling` / :mod:`.splines` whose conditioner
also sees the context::

    y_a = x_a,   y_b = g(x_b; theta(x_a, c)),   theta = net(concat(x_a, e(c)))

with the same elementwise maps ``g`` (additive, affine with any scale of :mod:`.scales`,
rational-quadratic spline), so for every fixed ``c`` it is exactly the unconditional layer with the
conditioner ``x_a -> net(x_a, e(c))``: log-det, inverse and stability are those of that layer.
``e(c)`` puts the context next to ``x_a`` (:func:`context_features`):

* vector layers ``(D,)``: the context flattened, ``(B, prod(context_shape))`` concatenated features;
* image layers ``(C, H, W)``: a vector context ``(k,)`` broadcast over the ``H x W`` positions as
  ``k`` extra channels; an image context ``(C_c, H_c, W_c)`` average-pooled to ``H x W``
  (``adaptive_avg_pool2d``: exact block means when ``H_c, W_c`` are multiples of ``H, W``), so the
  same context image feeds every level of a multi-scale flow.

The conditioner's last layer is zero-initialised (:mod:`.nets`), so every block starts as the same
map for every context: the identity for additive, spline and scales with ``scale(0) = 1``.

:class:`ConditionalElementwiseAffine` is Glow's class-conditional prior (Kingma & Dhariwal 2018,
sec. 5 / openai/glow ``prior`` with ``ycond``) written as a map to ``N(0, I)``::

    z = (x - mu(c)) * exp(-logs(c)),   (mu, logs) = W vec(c) + b,   log|det| = -(H W) sum_ch logs(c)

(one ``mu``, ``logs`` per channel, broadcast over positions; per feature for vectors), with
``W = b = 0`` at the start: the identity for every context.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ShapeError, Transform, check_shape
from .coupling import AdditiveCoupling, AffineCoupling
from .reshape import as_event_shape
from .splines import DEFAULT_BINS, DEFAULT_BOUND, SplineCoupling

__all__ = ["ConditionalCoupling", "ConditionalAdditiveCoupling", "ConditionalAffineCoupling",
           "ConditionalSplineCoupling", "ConditionalElementwiseAffine", "as_context_shape", "context_channels",
           "context_features"]


def as_context_shape(context_shape: int | Sequence[int], layer: str = "conditional layer") -> tuple[int, ...]:
    """``context_shape`` as ``(k,)`` (vector contexts) or ``(C, H, W)`` (image contexts); an int ``k`` is ``(k,)``."""
    if isinstance(context_shape, bool):
        raise ShapeError(f"{layer}: context_shape must be an int or (k,) / (C, H, W), got {context_shape!r}")
    if isinstance(context_shape, int):
        context_shape = (context_shape,)
    return as_event_shape(context_shape, f"{layer} context")


def context_channels(context_shape: Sequence[int], event_shape: Sequence[int]) -> int:
    """Number of conditioner inputs the context adds to a layer on ``event_shape``."""
    cs = tuple(context_shape)
    if len(event_shape) == 3:
        return cs[0]  # k broadcast channels, or the C_c channels of a pooled context image
    return math.prod(cs)


def context_features(context: Tensor, event_shape: Sequence[int]) -> Tensor:
    """The context as conditioner input of a layer on ``event_shape``: ``(B, k)`` for vectors,
    ``(B, k, H, W)`` for images (see the module docstring)."""
    b = context.shape[0]
    if len(event_shape) != 3:
        return context.reshape(b, -1)  # (B, prod(context_shape))
    h, w = int(event_shape[1]), int(event_shape[2])
    if context.dim() == 2:
        return context[:, :, None, None].expand(b, context.shape[1], h, w)  # (B, k, H, W)
    if tuple(context.shape[2:]) == (h, w):
        return context
    return F.adaptive_avg_pool2d(context, (h, w))  # (B, C_c, H, W)


class ConditionalCoupling:
    """Mixin that makes a :class:`~stableflows.transforms.coupling.Coupling` conditional: the
    context (resolved by :meth:`Transform._context`: given, or bound) is appended to the
    conditioner input. Put it first in the bases; see :class:`ConditionalAffineCoupling`."""

    takes_context = True

    def _context_features(self, x: Tensor, context: Tensor | None) -> Tensor:
        return context_features(self._context(x, context), self.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", context_shape={self.context_shape}"


class ConditionalAdditiveCoupling(ConditionalCoupling, AdditiveCoupling):
    """``y_b = x_b + t(x_a, c)`` (NICE, conditional): log-det 0 for every context."""

    def __init__(self, shape, *, context_shape, mask: str = "channel", parity: int = 0, hidden: int = 64):
        cs = as_context_shape(context_shape, type(self).__name__)
        super().__init__(shape, mask=mask, parity=parity, hidden=hidden,
                         context_channels=context_channels(cs, as_event_shape(shape, type(self).__name__)))
        self.context_shape = cs


class ConditionalAffineCoupling(ConditionalCoupling, AffineCoupling):
    """``y_b = x_b * scale(s) + t``, ``(t, s) = net(x_a, c)``; log-det ``sum log scale(s)`` (RealNVP /
    Glow coupling of a cINN). ``scale``, ``scale_kwargs`` as :class:`~stableflows.transforms.coupling.AffineCoupling`."""

    def __init__(self, shape, *, context_shape, mask: str = "channel", parity: int = 0, hidden: int = 64,
                 scale="sigmoid", scale_kwargs: dict | None = None):
        cs = as_context_shape(context_shape, type(self).__name__)
        super().__init__(shape, mask=mask, parity=parity, hidden=hidden, scale=scale, scale_kwargs=scale_kwargs,
                         context_channels=context_channels(cs, as_event_shape(shape, type(self).__name__)))
        self.context_shape = cs


class ConditionalSplineCoupling(ConditionalCoupling, SplineCoupling):
    """``y_b = RQS(x_b; theta(x_a, c))`` on ``[-bound, bound]``, identity outside (Durkan et al. 2019)."""

    def __init__(self, shape, *, context_shape, mask: str = "channel", parity: int = 0, hidden: int = 64,
                 bins: int = DEFAULT_BINS, bound: float = DEFAULT_BOUND):
        cs = as_context_shape(context_shape, type(self).__name__)
        super().__init__(shape, mask=mask, parity=parity, hidden=hidden, bins=bins, bound=bound,
                         context_channels=context_channels(cs, as_event_shape(shape, type(self).__name__)))
        self.context_shape = cs


class ConditionalElementwiseAffine(Transform):
    """Class-conditional Gaussian prior as a map to ``N(0, I)`` (module docstring): per channel (image)
    or feature (vector) ``mu(c)``, ``logs(c)`` linear in the flattened context, zero-initialised."""

    takes_context = True

    def __init__(self, shape: Sequence[int], *, context_shape):
        super().__init__()
        self.shape = as_event_shape(shape, type(self).__name__)
        self.context_shape = as_context_shape(context_shape, type(self).__name__)
        c = self.shape[0]
        self.linear = nn.Linear(math.prod(self.context_shape), 2 * c)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self._spatial = math.prod(self.shape[1:])

    def _check_event(self, x, direction, what):
        check_shape(x, self.shape, what)

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        c = self._context(x, context)
        h = self.linear(c.reshape(c.shape[0], -1))  # (B, 2 C)
        view = (x.shape[0], self.shape[0]) + (1,) * (len(self.shape) - 1)
        return h[:, 0::2].reshape(view), h[:, 1::2].reshape(view)  # mu, logs: (B, C[, 1, 1])

    def _forward(self, x, context=None):
        mu, logs = self._params(x, context)
        return (x - mu) * torch.exp(-logs), -self._spatial * logs.reshape(x.shape[0], -1).sum(dim=1)

    def _inverse(self, z, context=None):
        mu, logs = self._params(z, context)
        return z * torch.exp(logs) + mu, self._spatial * logs.reshape(z.shape[0], -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, context_shape={self.context_shape}"
