"""Elementwise bijections.

:class:`Logit` is the "unsquashing" pre-transform of RealNVP (Dinh et al. 2017, sec. 4.1) and
Residual Flows (Chen et al. 2019, app. E: alpha = 1e-5 on MNIST, 0.05 otherwise)::

    u = alpha + (1 - 2 alpha) x,     y = logit(u) = log u - log(1 - u)
    log|dy/dx| = log(1 - 2 alpha) - log u - log(1 - u)      (per entry, summed)
    x = (sigmoid(y) - alpha) / (1 - 2 alpha)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import InputOutsideDomain, Transform, sum_except_batch

__all__ = ["Logit"]


class Logit(Transform):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for ``x`` in ``[0, 1]`` (``(0, 1)`` when ``alpha = 0``).

    Any shape ``(B, ...)``. Inputs outside the domain raise :class:`InputOutsideDomain`.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)
        self._log_width = math.log1p(-2.0 * self.alpha)  # log(1 - 2 alpha)

    def _check_domain(self, x):
        if self.alpha > 0:
            inside = (x >= 0) & (x <= 1)
            domain = "[0, 1]"
        else:
            inside = (x > 0) & (x < 1)
            domain = "(0, 1) (alpha = 0: logit(0) and logit(1) are infinite)"
        if not bool(inside.all()):
            n_nan = int(torch.isnan(x).sum())
            finite = x[~torch.isnan(x)]
            found = f"[{float(finite.min()):.6g}, {float(finite.max()):.6g}]" if finite.numel() else "none"
            raise InputOutsideDomain(
                f"Logit(alpha={self.alpha}) needs inputs in {domain}; found values in {found}"
                + (f" and {n_nan} NaN" if n_nan else "")
            )

    def _forward(self, x):
        self._check_domain(x)
        u = self.alpha + (1.0 - 2.0 * self.alpha) * x
        one_minus_u = (1.0 - self.alpha) - (1.0 - 2.0 * self.alpha) * x  # 1 - u without cancellation
        log_u, log_1mu = torch.log(u), torch.log(one_minus_u)
        return log_u - log_1mu, sum_except_batch(self._log_width - log_u - log_1mu)

    def _inverse(self, y):
        x = (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)
        # log|dx/dy| = log u + log(1 - u) - log(1 - 2 alpha), u = sigmoid(y), in log space
        return x, sum_except_batch(F.logsigmoid(y) + F.logsigmoid(-y) - self._log_width)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
