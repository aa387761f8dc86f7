"""Multi-scale structure of RealNVP / Glow (Dinh et al. 2017, sec. 3.6; Kingma & Dhariwal 2018, sec. 3).

After each level half of the channels is *factored out*. Glow models the factored-out half
``h2`` with a Gaussian whose mean and log-scale are predicted from the kept half ``h1``; here that
learned conditional prior is written as an invertible map to a standard normal,

    eps2 = (h2 - mu(h1)) * exp(-logs(h1)),     log|det| = -sum logs(h1),

so every model has a standard-normal latent and the same layer contract (:class:`SplitPrior`).
:class:`MultiScale` runs one level, factors out, recurses on the kept half, and returns the
concatenation of all factored-out parts as a flat latent ``(B, D)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import ShapeError, Transform, stats_wanted, sum_except_batch

__all__ = ["Flatten", "ElementwiseAffine", "SplitPrior", "MultiScale"]


class Flatten(Transform):
    """``(B, *shape) -> (B, prod(shape))``, log-det 0."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def _check_event(self, x, direction, what):
        if direction == "forward" and tuple(x.shape[1:]) != self.shape:
            raise ShapeError(f"Flatten expects (B, {self.shape}), got {tuple(x.shape)}")
        if direction == "inverse" and (x.dim() != 2 or x.shape[1] != math.prod(self.shape)):
            raise ShapeError(f"Flatten.inverse expects (B, {math.prod(self.shape)}), got {tuple(x.shape)}")

    def _forward(self, x):
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def _inverse(self, z):
        return z.reshape(z.shape[0], *self.shape), z.new_zeros(z.shape[0])


class ElementwiseAffine(Transform):
    """Learned per-channel Gaussian prior written as a map to N(0, I) (Glow's ``learn_top``):

        z = (x - mu) * exp(-logs),     log|det| = -(H W) sum_c logs_c.

    Zero-initialised, i.e. the identity at the start of training.
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        pshape = (1, self.shape[0]) + (1,) * (len(self.shape) - 1)
        self.mu = nn.Parameter(torch.zeros(pshape))
        self.logs = nn.Parameter(torch.zeros(pshape))
        self._spatial = math.prod(self.shape[1:])

    def _forward(self, x):
        z = (x - self.mu) * torch.exp(-self.logs)
        return z, (-self._spatial * self.logs.sum()).expand(x.shape[0])

    def _inverse(self, z):
        x = z * torch.exp(self.logs) + self.mu
        return x, (self._spatial * self.logs.sum()).expand(z.shape[0])


class SplitPrior(Transform):
    """Glow's learned conditional prior of the factored-out channels, as a bijection.

    Input ``(B, C, H, W)`` is split into ``h1 = x[:, :C1]`` (kept) and ``h2 = x[:, C1:]``;
    a zero-initialised 3x3 convolution of ``h1`` gives ``(mu, logs)`` and
    ``eps2 = (h2 - mu) * exp(-logs)``; the output is ``cat(h1, eps2)``. With ``learned=False``
    the prior is a fixed standard normal (identity map; used by constant-volume Glow).
    """

    def __init__(self, shape: Sequence[int], *, learned: bool = True):
        super().__init__()
        c, h, w = (int(s) for s in shape)
        if c < 2:
            raise ShapeError(f"SplitPrior needs at least 2 channels, got shape {tuple(shape)}")
        self.c1 = c - c // 2
        self.c2 = c // 2
        self.learned = learned
        if learned:
            self.conv = nn.Conv2d(self.c1, 2 * self.c2, 3, padding=1)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def _params(self, h1: Tensor) -> tuple[Tensor, Tensor]:
        out = self.conv(h1)  # (B, 2 C2, H, W)
        return out[:, 0::2], out[:, 1::2]

    def _forward(self, x):
        if not self.learned:
            return x, x.new_zeros(x.shape[0])
        h1, h2 = x[:, : self.c1], x[:, self.c1:]
        mu, logs = self._params(h1)
        eps = (h2 - mu) * torch.exp(-logs)
        if stats_wanted():
            self.stats = {"min_prior_scale": torch.exp(logs).min().detach()}
        return torch.cat([h1, eps], dim=1), -sum_except_batch(logs)

    def _inverse(self, z):
        if not self.learned:
            return z, z.new_zeros(z.shape[0])
        h1, eps = z[:, : self.c1], z[:, self.c1:]
        mu, logs = self._params(h1)
        if stats_wanted():
            self.stats = {"min_prior_scale": torch.exp(logs).min().detach()}
        return torch.cat([h1, eps * torch.exp(logs) + mu], dim=1), sum_except_batch(logs)


class MultiScale(Transform):
    """One level of a multi-scale flow, then factor-out, then the next level on the kept half.

    ``level`` maps ``(B, *in_shape) -> (B, C, H, W)``; ``prior`` (a :class:`SplitPrior`) maps the
    factored-out half to N(0, I); ``inner`` maps the kept half ``(B, C1, H, W)`` to a flat latent
    ``(B, D1)``. Output: ``cat(inner(h1), flatten(eps2))``, shape ``(B, D)``.
    """

    def __init__(self, level: Transform, prior: SplitPrior, inner: Transform, level_out_shape: Sequence[int]):
        super().__init__()
        self.level, self.prior, self.inner = level, prior, inner
        c, h, w = (int(s) for s in level_out_shape)
        self.kept_shape = (prior.c1, h, w)
        self.out_shape = (prior.c2, h, w)
        self.d_kept = prior.c1 * h * w

    def _forward(self, x):
        h, ld = self.level(x)  # (B, C, H, W)
        h, ld_p = self.prior(h)
        h1, eps = h[:, : self.prior.c1], h[:, self.prior.c1:]
        z1, ld_i = self.inner(h1)  # (B, D1)
        z = torch.cat([z1, eps.reshape(eps.shape[0], -1)], dim=1)  # (B, D)
        return z, ld + ld_p + ld_i

    def _check_event(self, x, direction, what):
        if direction == "forward":
            self.level._check_event(x, direction, what)
        elif x.dim() != 2 or x.shape[1] != self.d_kept + math.prod(self.out_shape):
            raise ShapeError(f"multi-scale latent must be flat (B, {self.d_kept + math.prod(self.out_shape)}), "
                             f"got {tuple(x.shape)}")

    def _check_domain(self, x, direction):
        if direction == "forward":
            self.level._check_domain(x, direction)

    def _inverse(self, z):
        z1, eps = z[:, : self.d_kept], z[:, self.d_kept:]
        h1, ld_i = self.inner.inverse(z1)
        h = torch.cat([h1, eps.reshape(z.shape[0], *self.out_shape)], dim=1)
        h, ld_p = self.prior.inverse(h)
        x, ld = self.level.inverse(h)
        return x, ld + ld_p + ld_i
