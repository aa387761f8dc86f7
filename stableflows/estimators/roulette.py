"""Unbiased Russian-roulette estimator of ``log det(I + J_g)`` (Chen et al. 2019, Theorem 1).

With ``m`` terms computed exactly and a random number ``N`` of further terms (Kahn 1955; eq. 5-6)::

    logdet ~= sum_{k=1}^{m} T_k + sum_{j=1}^{N} T_{m+j} / P(N >= j),   T_k = (-1)^(k+1)/k v^T J^k v

is unbiased for every ``N`` with support on all of ``{1, 2, ...}``, because
``E[1{N >= j}] / P(N >= j) = 1``. ``n_samples`` independent counts ``N_1..N_S`` share one probe:
term ``m + j`` gets the weight ``mean_s 1{N_s >= j} / P(N >= j)`` (evaluated up to ``max_s N_s``).
One draw serves the whole batch (as in the published code: all examples need the same number of
vector-Jacobian products anyway). The counts come from torch's global *CPU* generator, whatever the
device of the model (so they are part of the saved RNG state, and drawing them reads no device
value: the number of terms is known on the host before the series starts). The paper trains with ``m = 2``, ``N ~ Geom(0.5)`` (4 terms
expected) and evaluates with ``m = 20`` plus the same unbiased tail.

Counts:

* ``"geometric"``: ``N in {1, 2, ...}``, ``P(N = n) = p (1-p)^(n-1)``, ``P(N >= j) = (1-p)^(j-1)``;
  ``p`` defaults to 0.5. The variance is finite roughly when ``||J||^2 < 1 - p``.
* ``"poisson"``: ``N ~ Poisson(p)`` on ``{0, 1, ...}``, ``p`` (the mean) defaults to 2. Long draws
  are rarer than for a geometric count, but the weights ``1 / P(N >= j)`` grow factorially: the
  variance is finite only for terms that decay faster than geometrically, and in practice the
  draws that would matter are vanishingly rare.
"""
from __future__ import annotations

import math

import torch

from .series import PowerSeriesEstimator

__all__ = ["Geometric", "Poisson", "COUNT_DISTRIBUTIONS", "RouletteEstimator"]

MIN_UNIFORM = 1e-300  # floor of the uniform draw in inverse-CDF sampling (log(0) guard)
POISSON_TAIL_TERMS = 200  # terms summed for P(N >= j) of a Poisson count
POISSON_TAIL_EPS = 1e-30  # stop summing the tail once a term is this small relative to the sum


class Geometric:
    """``N in {1, 2, ...}`` with ``P(N = n) = p (1 - p)^(n - 1)``."""

    default_param = 0.5

    def __init__(self, p: float):
        if not 0.0 < p < 1.0:
            raise ValueError(f"geometric p must lie in (0, 1) (support on every term), got {p}")
        self.p = float(p)

    def sample(self, n: int) -> list[int]:
        u = torch.rand(n, dtype=torch.float64).clamp_min(MIN_UNIFORM)  # torch's global CPU generator
        return [int(c) for c in (torch.log(u) / math.log1p(-self.p)).floor().add(1).tolist()]  # host list

    def survival(self, j: int) -> float:
        """``P(N >= j)``."""
        return 1.0 if j <= 1 else (1.0 - self.p) ** (j - 1)

    @property
    def mean(self) -> float:
        return 1.0 / self.p


class Poisson:
    """``N ~ Poisson(lam)`` on ``{0, 1, ...}``."""

    default_param = 2.0

    def __init__(self, lam: float):
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(f"poisson mean must be positive and finite, got {lam}")
        self.lam = float(lam)

    def sample(self, n: int) -> list[int]:
        return [int(c) for c in torch.poisson(torch.full((n,), self.lam, dtype=torch.float64)).tolist()]

    def _pmf(self, i: int) -> float:
        return math.exp(i * math.log(self.lam) - self.lam - math.lgamma(i + 1))

    def survival(self, j: int) -> float:
        """``P(N >= j)``, summed over the tail (no cancellation for large ``j``)."""
        if j <= 0:
            return 1.0
        total = 0.0
        for i in range(j, j + POISSON_TAIL_TERMS):
            term = self._pmf(i)
            total += term
            if i > self.lam and term <= POISSON_TAIL_EPS * total:
                break
        return total

    @property
    def mean(self) -> float:
        return self.lam


COUNT_DISTRIBUTIONS = {"geometric": Geometric, "poisson": Poisson}


class RouletteEstimator(PowerSeriesEstimator):
    """Unbiased Russian-roulette series (see module docstring).

    Args:
        n_exact_terms: terms always computed in training mode (paper: 2).
        eval_exact_terms: terms always computed in evaluation mode (paper: 20).
        dist: ``"geometric"`` or ``"poisson"`` number of further terms.
        p: geometric success probability (default 0.5) or Poisson mean (default 2.0).
        n_samples: independent counts averaged into the weights.
        probe, neumann_grad, grad_in_forward: see :class:`PowerSeriesEstimator`.
    """

    name = "roulette"

    def __init__(self, *, n_exact_terms: int = 2, eval_exact_terms: int = 20, dist: str = "geometric",
                 p: float | None = None, n_samples: int = 1, **kwargs):
        super().__init__(**kwargs)
        if dist not in COUNT_DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {sorted(COUNT_DISTRIBUTIONS)}, got {dist!r}")
        if n_exact_terms < 0 or eval_exact_terms < 0 or n_samples < 1:
            raise ValueError("need n_exact_terms >= 0, eval_exact_terms >= 0 and n_samples >= 1")
        cls = COUNT_DISTRIBUTIONS[dist]
        self.dist = dist
        self.p = float(cls.default_param if p is None else p)
        self._count = cls(self.p)
        self.n_exact_terms = int(n_exact_terms)
        self.eval_exact_terms = int(eval_exact_terms)
        self.n_samples = int(n_samples)

    def coefficients(self, training: bool) -> list[float]:
        m = self.n_exact_terms if training else self.eval_exact_terms
        counts = self._count.sample(self.n_samples)
        tail = [sum(c >= j for c in counts) / (len(counts) * self._count.survival(j)) for j in range(1, max(counts) + 1)]
        return [1.0] * m + tail
