"""Log-det estimators of residual blocks ``F(x) = x + g(x)`` (i-ResNets, Residual Flows).

``make_estimator(name, **options)`` builds one by name: ``"exact"`` (brute-force Jacobian),
``"series"`` (truncated power series, biased) or ``"roulette"`` (unbiased Russian roulette); see
each module for the mathematics and :mod:`.neumann` for the gradient modes.
"""
from __future__ import annotations

from .base import PROBES, LogDetEstimator, batch_dot, sample_probe
from .exact import ExactEstimator, brute_force_jacobian_logdet
from .neumann import BackwardInForward, power_series_logdet, series_surrogate
from .roulette import COUNT_DISTRIBUTIONS, Geometric, Poisson, RouletteEstimator
from .series import PowerSeriesEstimator, SeriesEstimator

__all__ = [
    "ESTIMATORS",
    "make_estimator",
    "LogDetEstimator",
    "PowerSeriesEstimator",
    "ExactEstimator",
    "SeriesEstimator",
    "RouletteEstimator",
    "Geometric",
    "Poisson",
    "COUNT_DISTRIBUTIONS",
    "PROBES",
    "sample_probe",
    "batch_dot",
    "brute_force_jacobian_logdet",
    "series_surrogate",
    "power_series_logdet",
    "BackwardInForward",
]

ESTIMATORS = {"exact": ExactEstimator, "series": SeriesEstimator, "roulette": RouletteEstimator}


def make_estimator(name: str, *, n_exact_terms: int = 2, eval_exact_terms: int = 20, n_samples: int = 1,
                   dist: str = "geometric", p: float | None = None, n_series_terms: int = 5,
                   neumann_grad: bool = True, grad_in_forward: bool = True,
                   probe: str = "gaussian") -> LogDetEstimator:
    """An estimator by name; each takes the options that apply to it (the others are ignored)."""
    common = dict(probe=probe, neumann_grad=neumann_grad, grad_in_forward=grad_in_forward)
    if name == "exact":
        return ExactEstimator()
    if name == "series":
        return SeriesEstimator(n_terms=n_series_terms, **common)
    if name == "roulette":
        return RouletteEstimator(n_exact_terms=n_exact_terms, eval_exact_terms=eval_exact_terms, dist=dist, p=p,
                                 n_samples=n_samples, **common)
    raise ValueError(f"unknown log-det estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
