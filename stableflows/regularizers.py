"""Regularizers that keep an invertible network locally stable (Behrmann et al. 2020,
"Understanding and Mitigating Exploding Inverses in Invertible Neural Networks", poster: "Controlling
Local Stability").

**Bi-directional finite differences (FD).** A penalty on the Jacobian ``J = dF/dx`` keeps the forward
map from amplifying perturbations; the same on ``J^{-1} = dF^{-1}/dz`` keeps the inverse stable.
Both are estimated with one random direction per example::

    R_fwd(x) = ||F(x + eps d) - F(x)||^2 / eps^2          ~ ||J(x) d||^2,
    R_inv(z) = ||F^-1(z + eps d') - F^-1(z)||^2 / eps^2   ~ ||J^-1(z) d'||^2,   z = F(x) (detached),

``d``, ``d'`` uniform on the unit sphere, so ``E ||J d||^2 = ||J||_F^2 / D``. They cost one (two)
extra passes and are applied every ``every`` steps (the authors' code: every 10 steps, eps 0.1).
Gradients flow through ``F`` / ``F^{-1}`` into the parameters, through stored activations or
memory-saving chains alike.

**Normalizing-flow objective (NF).** ``-log p(x) = -log N(F(x)) - log|det J|`` added with a small
weight: the prior term pushes ``F(x)`` to small norm (forward stability), the log-det term raises all
singular values of ``J``, the small ones most (inverse stability). It is computed from the
``(z, logdet)`` the classifier already has, in bits/dim for discrete data (nats/dim otherwise), so
the weight does not depend on the data dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .metrics import nats_to_bpd
from .models.flow import standard_normal_log_prob
from .transforms.base import Transform

__all__ = [
    "unit_directions",
    "fd_penalty",
    "forward_fd_penalty",
    "inverse_fd_penalty",
    "FiniteDifferenceRegularizer",
    "FlowObjectiveRegularizer",
    "nll_per_dim",
    "FD_EPS",
    "FD_WEIGHT",
    "FD_EVERY",
    "NF_WEIGHT",
]

FD_EPS = 0.1  # finite-difference step (the authors' code uses 0.1)
FD_WEIGHT = 1e-3  # default weight of each FD term (on the batch mean of ||J d||^2)
FD_EVERY = 10  # apply the FD terms every k-th step (the authors' --regularize_every 10)
NF_WEIGHT = 1e-2  # default weight of the NF term (on bits/dim or nats/dim)
MIN_DIRECTION_NORM = 1e-30  # guards the normalisation of a (practically impossible) zero draw


def _out(result) -> Tensor:
    """A transform returns ``(out, logdet)``; plain functions may return ``out``."""
    return result[0] if isinstance(result, (tuple, list)) else result


def unit_directions(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One direction per example, uniform on the unit sphere of ``like[0]``'s shape:
    ``d = g / ||g||``, ``g ~ N(0, I)``; shape and dtype of ``like``."""
    g = torch.randn(like.shape, generator=generator, dtype=like.dtype,
                    device=like.device if generator is None else generator.device).to(like.device)
    norm = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(MIN_DIRECTION_NORM)  # (B,)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def fd_penalty(fn: Callable, x: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
               fx: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``||fn(x + eps d) - fn(x)||^2 / eps^2`` per example, shape ``(B,)``.

    ``fn`` returns ``out`` or ``(out, logdet)``; ``d`` defaults to :func:`unit_directions`;
    ``fx`` is ``fn(x)`` when the caller already has it (saves a pass; gradients flow through it).
    """
    if not eps > 0:
        raise ValueError(f"finite-difference step eps must be > 0, got {eps}")
    d = unit_directions(x, generator) if d is None else d
    if d.shape != x.shape:
        raise ValueError(f"direction shape {tuple(d.shape)} differs from input shape {tuple(x.shape)}")
    base = _out(fn(x)) if fx is None else fx
    moved = _out(fn(x + eps * d))
    diff = (moved - base).reshape(x.shape[0], -1)  # (B, D)
    return diff.pow(2).sum(dim=1) / eps ** 2


def forward_fd_penalty(transform: Transform, x: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
                       z: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``||F(x + eps d) - F(x)||^2 / eps^2`` per example (``z = F(x)`` if known)."""
    return fd_penalty(transform, x, eps=eps, d=d, fx=z, generator=generator)


def inverse_fd_penalty(transform: Transform, z: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """``||F^-1(z + eps d) - F^-1(z)||^2 / eps^2`` per example. ``z`` is detached: the penalty
    regularises the inverse map at the latent points, not where they come from."""
    return fd_penalty(transform.inverse, z.detach(), eps=eps, d=d, generator=generator)


@dataclass
class FiniteDifferenceRegularizer:
    """Bi-directional FD penalty ``w_fwd mean_B R_fwd + w_inv mean_B R_inv`` every ``every`` steps.

    Call it as ``penalty, logs = reg(transform, x, z=F(x), step=step)``; it returns a zero penalty
    (and no FD passes) on the other steps.
    """

    weight_forward: float = FD_WEIGHT
    weight_inverse: float = FD_WEIGHT
    eps: float = FD_EPS
    every: int = FD_EVERY

    def __post_init__(self):
        if self.weight_forward < 0 or self.weight_inverse < 0:
            raise ValueError(f"FD weights must be >= 0, got {self.weight_forward}, {self.weight_inverse}")
        if not self.eps > 0:
            raise ValueError(f"FD eps must be > 0, got {self.eps}")
        if self.every < 1:
            raise ValueError(f"FD every must be >= 1, got {self.every}")

    @property
    def enabled(self) -> bool:
        return self.weight_forward > 0 or self.weight_inverse > 0

    def active(self, step: int | None) -> bool:
        return self.enabled and (step is None or step % self.every == 0)

    def __call__(self, transform: Transform, x: Tensor, *, z: Tensor | None = None, step: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        zero = x.new_zeros(())
        if not self.active(step):
            return zero, {}
        total, logs = zero, {}
        if self.weight_forward > 0:
            d = unit_directions(x, generator)
            r, bad = _finite_rows_mean(lambda rows: forward_fd_penalty(
                transform, x[rows], eps=self.eps, d=d[rows], z=None if z is None else z[rows]), x.shape[0])
            total = total + self.weight_forward * r
            logs["fd_forward"] = float(r.detach())
            logs["fd_forward_nonfinite"] = bad
        if self.weight_inverse > 0:
            if z is None:
                with torch.no_grad():
                    z = _out(transform(x))
            d = unit_directions(z, generator)
            r, bad = _finite_rows_mean(lambda rows: inverse_fd_penalty(
                transform, z[rows], eps=self.eps, d=d[rows]), z.shape[0])
            total = total + self.weight_inverse * r
            logs["fd_inverse"] = float(r.detach())
            logs["fd_inverse_nonfinite"] = bad
        return total, logs


def _finite_rows_mean(penalty: Callable[[Tensor], Tensor], n: int) -> tuple[Tensor, int]:
    """Batch mean of a per-example penalty over the rows where it is finite, and how many were not.

    Where the map explodes at the moved point (the exploding inverse the penalty is meant to
    prevent), that row's penalty is inf/NaN and its gradient NaN, even through a mask (0 * inf).
    The penalty is then recomputed on the finite rows only, so the regulariser keeps acting on the
    rest of the batch instead of turning the whole step's loss into NaN. No finite row: 0.
    """
    rows = torch.arange(n)
    r = penalty(rows)
    finite = torch.isfinite(r.detach())
    bad = int((~finite).sum())
    if bad == 0:
        return r.mean(), 0
    if bad == n:
        return r.new_zeros(()), bad
    return penalty(rows[finite.cpu()]).mean(), bad


def nll_per_dim(z: Tensor, logdet: Tensor, levels: int | None) -> Tensor:
    """``-log p(x)`` per example in bits/dim (``levels`` given: docs/METRICS.md, discrete data) or nats/dim
    (continuous data), from ``z = F(x)`` and ``log|det dF/dx|`` under a standard-normal base."""
    log_p = standard_normal_log_prob(z) + logdet  # (B,)
    dim = z[0].numel()
    if levels is not None:
        return nats_to_bpd(log_p, dim, levels)
    return -log_p / dim


@dataclass
class FlowObjectiveRegularizer:
    """``weight * mean_B(-log p(x))`` per dimension (bits/dim for discrete data), every ``every`` steps."""

    weight: float = NF_WEIGHT
    every: int = 1

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"NF weight must be >= 0, got {self.weight}")
        if self.every < 1:
            raise ValueError(f"NF every must be >= 1, got {self.every}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def active(self, step: int | None) -> bool:
        return self.enabled and (step is None or step % self.every == 0)

    def __call__(self, z: Tensor, logdet: Tensor, *, levels: int | None = None, step: int | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        if not self.active(step):
            return z.new_zeros(()), {}
        nll = nll_per_dim(z, logdet, levels).mean()
        key = "nf_bpd" if levels is not None else "nf_nats_per_dim"
        return self.weight * nll, {key: float(nll.detach())}

