"""Power-series log-det estimators; the truncated series of i-ResNets (Behrmann et al. 2019).

    log det(I + J_g) = sum_{k>=1} (-1)^(k+1) / k  tr(J_g^k)        (Lip(g) < 1; Chen et al. eq. 3)

:class:`SeriesEstimator` keeps the first ``n_terms`` terms with one Hutchinson probe per example.
It is biased: the dropped tail ``sum_{k>n}`` grows with ``Lip(g)`` (and with the dimension),
which is why Residual Flows replace it with the Russian-roulette estimator
(:class:`~stableflows.estimators.roulette.RouletteEstimator`).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import PROBES, LogDetEstimator, sample_probe
from .neumann import power_series_logdet

__all__ = ["PowerSeriesEstimator", "SeriesEstimator"]


class PowerSeriesEstimator(LogDetEstimator):
    """Shared part of the series estimators: draw weights, draw a probe, evaluate the series.

    Args:
        probe: ``"gaussian"`` or ``"rademacher"`` Hutchinson probe.
        neumann_grad: gradient by the Neumann series (Theorem 2) instead of plain backprop.
        grad_in_forward: compute the log-det gradient during forward (sec. 3.2).
    """

    def __init__(self, *, probe: str = "gaussian", neumann_grad: bool = True, grad_in_forward: bool = True):
        super().__init__()
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        self.probe = probe
        self.neumann_grad = bool(neumann_grad)
        self.grad_in_forward = bool(grad_in_forward)

    def coefficients(self, training: bool) -> list[float]:
        """Weights ``c_1..c_n`` of the series terms (drawn anew for the roulette)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor, *, training: bool) -> tuple[Tensor, Tensor]:
        coeffs = self.coefficients(training)  # random draws: number of terms first, then the probe
        v = sample_probe(x, self.probe)
        gx, logdet = power_series_logdet(g, x, v, coeffs, neumann_grad=self.neumann_grad,
                                         grad_in_forward=self.grad_in_forward)
        self.stats = {"logdet_terms": float(len(coeffs))}
        return gx, logdet


class SeriesEstimator(PowerSeriesEstimator):
    """Truncated power series with ``n_terms`` terms (biased; i-ResNet used 5 to 10)."""

    name = "series"

    def __init__(self, *, n_terms: int = 5, **kwargs):
        super().__init__(**kwargs)
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = int(n_terms)

    def coefficients(self, training: bool) -> list[float]:
        return [1.0] * self.n_terms
