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

__all__ = ["Logit", "DEFAULT_LOGIT_ALPHA"]

# Default alpha of the logit pre-transform, measured (test bpd after a fixed number of steps, which does not
# depend on the machine's load): demo Glow on digits (17 levels), 1000 steps, seeds 0 / 1: alpha 0.05 ->
# 2.095 / 2.122, 0.02 -> 2.045, 0.01 -> 2.034 / 2.053, 0.003 -> 2.039 / 2.049, 0.001 -> 2.049; a small Glow
# on Fashion-MNIST (256 levels, width 32, 2 x 2 steps), 2000 steps, seeds 0 / 1: 0.05 -> 4.40, 0.01 -> 4.01 / 3.96,
# 0.003 -> 3.84 / 3.82, 0.001 -> 3.77.
# 0.003 ties the best on digits and is close to the best on 256 levels. Paper configs pin their own
# (configs/: Residual Flow 0.05 on CIFAR-10, 1e-5 on MNIST; Glow none).
DEFAULT_LOGIT_ALPHA = 0.003


class Logit(Transform):
    """``y = logit(alpha + (1 - 2 alpha) x)`` on ``-alpha / (1 - 2 alpha) < x < (1 - alpha) / (1 - 2 alpha)``
    (which contains ``[0, 1]`` when ``alpha > 0``; it is ``(0, 1)`` when ``alpha = 0``).

    Any shape ``(B, ...)``. Inputs outside the domain raise :class:`InputOutsideDomain` at the public
    entry (the model's, or the layer's own when called alone; :func:`~.base.validation`); data-range
    checks (levels, ``[0, 1]``) belong to the data pipeline (:func:`stableflows.metrics.check_levels`).
    """

    def __init__(self, alpha: float = DEFAULT_LOGIT_ALPHA):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)
        self._log_width = math.log1p(-2.0 * self.alpha)  # log(1 - 2 alpha)

    def domain(self) -> tuple[float, float]:
        """The open interval of ``x`` on which the map is a bijection onto the reals:
        ``alpha + (1 - 2 alpha) x`` in ``(0, 1)``. With ``alpha > 0`` it is wider than ``[0, 1]``,
        and the inverse (sampling) lands anywhere in it, so the forward pass accepts all of it."""
        lo = -self.alpha / (1.0 - 2.0 * self.alpha)
        return lo, 1.0 - lo

    def _check_domain(self, x, direction="forward"):
        """Checked at the public entry (the Logit is the first layer of a flow; see base.py)."""
        if direction != "forward":
            return
        lo, hi = self.domain()
        u = self.alpha + (1.0 - 2.0 * self.alpha) * x
        one_minus_u = (1.0 - self.alpha) - (1.0 - 2.0 * self.alpha) * x
        inside = (u > 0) & (one_minus_u > 0)
        if not bool(inside.all()):
            x = x.detach()
            n_nan = int(torch.isnan(x).sum())
            finite = x[~torch.isnan(x)]
            found = f"[{float(finite.min()):.6g}, {float(finite.max()):.6g}]" if finite.numel() else "none"
            raise InputOutsideDomain(
                f"Logit(alpha={self.alpha}) needs inputs in the open interval ({lo:.6g}, {hi:.6g}) "
                f"(data in [0, 1] when alpha > 0); found values in {found}"
                + (f" and {n_nan} NaN" if n_nan else "")
            )

    def _forward(self, x):
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
