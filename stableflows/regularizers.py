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

*Rows that explode.* Where the map blows up at the moved point (the exploding inverse the penalty
exists for) a row's penalty is inf/NaN, and so is its gradient, even through a mask (``0 * inf``).
Such a row is not dropped: it enters the batch mean through the bounded surrogate ``log1p(R)``,
computed in the log domain from the difference (finite wherever the difference is, also where its
square overflows); where the moved point itself is non-finite, the step is halved
(``eps / 2, eps / 4, ...``, at most :data:`FD_BACKTRACK` times) until it is finite. Its gradient
still pushes the map towards stability, without one exploding row swamping the step
(``d log1p(R) = dR / (1 + R)``). Rows with a finite penalty at ``eps`` keep the exact penalty, and
the mean is over the whole batch. The logs count both
(``fd_*_nonfinite``: rows non-finite at ``eps``; ``fd_*_dropped``: rows non-finite at every step,
the only rows left out, with no finite gradient to give). ``mode="jvp"`` uses the exact
``||J d||^2`` (a Jacobian-vector product by double backward, through stored activations; the
layers must be twice differentiable, which the implicit inverse of residual blocks is not).

*The authors' weights in this normalisation.* Their training script (``train_inn_classifier.py``)
draws ``d ~ N(0, I)`` of shape ``(B, D)`` and normalises it over the *batch* dimension (every
feature column has unit norm), so one example's direction has ``||d_b||^2 ~ D / B``; it sums the
penalty over the batch and divides by ``eps``, not ``eps^2``::

    c ||F(x + eps d) - F(x)||_F^2 / eps  ~  c eps sum_b ||J d_b||^2  ~  c eps (D / B) B mean_b ||J u_b||^2
                                          =  (c eps D) mean_b ||J u_b||^2,       u_b = d_b / ||d_b||,

while the penalty here is ``w mean_b ||J u_b||^2``. Their ``c = 1e-4`` at ``eps = 0.1`` on CIFAR-10
(``D = 3072``) is therefore ``w = c eps D = 0.031`` here (:data:`AUTHORS_FD_WEIGHT`). (Their inputs are
standardised per channel, std ~0.25 of the [0, 1] range, so on the same function their ``J`` is
~4x smaller than on [0, 1] data; the conversion above is of the penalty as written.)

**Normalizing-flow objective (NF).** ``-log p(x) = -log N(F(x)) - log|det J|`` added with a small
weight: the prior term pushes ``F(x)`` to small norm (forward stability), the log-det term raises all
singular values of ``J``, the small ones most (inverse stability). It is computed from the
``(z, logdet)`` the classifier already has, in bits/dim for discrete data (nats/dim otherwise), so
the weight does not depend on the data dimension.
"""
from __future__ import annotations

import math
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
    "fd_difference",
    "log1p_penalty",
    "robust_rows_mean",
    "forward_fd_penalty",
    "inverse_fd_penalty",
    "FiniteDifferenceRegularizer",
    "FlowObjectiveRegularizer",
    "nll_per_dim",
    "FD_EPS",
    "FD_WEIGHT",
    "FD_EVERY",
    "FD_BACKTRACK",
    "FD_MODES",
    "AUTHORS_FD_WEIGHT",
    "NF_WEIGHT",
    "jvp_penalty",
]

FD_EPS = 0.1  # finite-difference step (the authors' code uses 0.1)
FD_WEIGHT = 1e-3  # default weight of each FD term (on the batch mean of ||J d||^2)
FD_EVERY = 10  # apply the FD terms every k-th step (the authors' --regularize_every 10)
FD_BACKTRACK = 8  # halvings of eps tried for a row whose penalty is non-finite at eps
FD_MODES = ("fd", "jvp")  # finite differences (bounded surrogate for exploding rows) | exact ||J d||^2
AUTHORS_FD_COEFF, AUTHORS_FD_EPS, AUTHORS_FD_DIM = 1e-4, 0.1, 3072  # CIFAR-10 command lines of their README
AUTHORS_FD_WEIGHT = AUTHORS_FD_COEFF * AUTHORS_FD_EPS * AUTHORS_FD_DIM  # = 0.0307 in this normalisation
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


def fd_difference(fn: Callable, x: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
                  fx: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``fn(x + eps d) - fn(x)`` flattened per example, shape ``(B, D_out)`` (see :func:`fd_penalty`)."""
    if not eps > 0:
        raise ValueError(f"finite-difference step eps must be > 0, got {eps}")
    d = unit_directions(x, generator) if d is None else d
    if d.shape != x.shape:
        raise ValueError(f"direction shape {tuple(d.shape)} differs from input shape {tuple(x.shape)}")
    base = _out(fn(x)) if fx is None else fx
    moved = _out(fn(x + eps * d))
    return (moved - base).reshape(x.shape[0], -1)  # (B, D)


def fd_penalty(fn: Callable, x: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
               fx: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``||fn(x + eps d) - fn(x)||^2 / eps^2`` per example, shape ``(B,)``.

    ``fn`` returns ``out`` or ``(out, logdet)``; ``d`` defaults to :func:`unit_directions`;
    ``fx`` is ``fn(x)`` when the caller already has it (saves a pass; gradients flow through it).
    """
    return fd_difference(fn, x, eps=eps, d=d, fx=fx, generator=generator).pow(2).sum(dim=1) / eps ** 2


def log1p_penalty(diff: Tensor, eps: float) -> Tensor:
    """``log1p(||diff||^2 / eps^2)`` per row, computed in the log domain: finite wherever ``diff`` is,
    also where the square overflows (``||diff|| > ~1e19`` in float32)."""
    m = diff.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(diff.dtype).tiny)  # a constant scale
    log_r = 2.0 * (m.squeeze(1).log() + 0.5 * (diff / m).pow(2).sum(dim=1).log()) - 2.0 * math.log(eps)
    return torch.nn.functional.softplus(log_r)  # log(1 + exp(log r)) = log1p(r)


def forward_fd_penalty(transform: Transform, x: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
                       z: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``||F(x + eps d) - F(x)||^2 / eps^2`` per example (``z = F(x)`` if known)."""
    return fd_penalty(transform, x, eps=eps, d=d, fx=z, generator=generator)


def inverse_fd_penalty(transform: Transform, z: Tensor, *, eps: float = FD_EPS, d: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """``||F^-1(z + eps d) - F^-1(z)||^2 / eps^2`` per example. ``z`` is detached: the penalty
    regularises the inverse map at the latent points, not where they come from."""
    return fd_penalty(transform.inverse, z.detach(), eps=eps, d=d, generator=generator)


def jvp_penalty(fn: Callable, x: Tensor, d: Tensor) -> Tensor:
    """``||J_fn(x) d||^2`` per example, exactly: the Jacobian-vector product as the derivative of the
    vector-Jacobian product ``u -> J^T u`` (double backward), differentiable in the parameters."""
    x = x.detach().requires_grad_(True)
    y = _out(fn(x))
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, x, u, create_graph=True)  # J^T u, linear in u
    (jd,) = torch.autograd.grad(jt_u, u, d, create_graph=True)  # J d
    return jd.reshape(x.shape[0], -1).pow(2).sum(dim=1)


@dataclass
class FiniteDifferenceRegularizer:
    """Bi-directional FD penalty ``w_fwd mean_B R_fwd + w_inv mean_B R_inv`` every ``every`` steps.

    Call it as ``penalty, logs = reg(transform, x, z=F(x), step=step)``; it returns a zero penalty
    (and no FD passes) on the other steps. ``mode``: ``"fd"`` (finite differences; rows that explode
    enter through the bounded surrogate of the module docstring) or ``"jvp"`` (exact ``||J d||^2``).
    """

    weight_forward: float = FD_WEIGHT
    weight_inverse: float = FD_WEIGHT
    eps: float = FD_EPS
    every: int = FD_EVERY
    mode: str = "fd"

    def __post_init__(self):
        if self.weight_forward < 0 or self.weight_inverse < 0:
            raise ValueError(f"FD weights must be >= 0, got {self.weight_forward}, {self.weight_inverse}")
        if not self.eps > 0:
            raise ValueError(f"FD eps must be > 0, got {self.eps}")
        if self.every < 1:
            raise ValueError(f"FD every must be >= 1, got {self.every}")
        if self.mode not in FD_MODES:
            raise ValueError(f"FD mode must be one of {', '.join(FD_MODES)}, got {self.mode!r}")

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
            if self.mode == "jvp":
                r, counts = _jvp_rows(transform, transform, x, d)
            else:
                r, counts = robust_rows_mean(lambda rows, eps: fd_difference(
                    transform, x[rows], eps=eps, d=d[rows], fx=None if z is None else z[rows]), x.shape[0], self.eps)
            total = total + self.weight_forward * r
            logs.update(_logs("fd_forward", r, counts))
        if self.weight_inverse > 0:
            if z is None:
                with torch.no_grad():
                    z = _out(transform(x))
            d = unit_directions(z, generator)
            if self.mode == "jvp":
                r, counts = _jvp_rows(transform, transform.inverse, z.detach(), d)
            else:
                zd = z.detach()
                r, counts = robust_rows_mean(lambda rows, eps: fd_difference(
                    transform.inverse, zd[rows], eps=eps, d=d[rows]), z.shape[0], self.eps)
            total = total + self.weight_inverse * r
            logs.update(_logs("fd_inverse", r, counts))
        return total, logs


def _logs(key: str, r: Tensor, counts: tuple[int, int]) -> dict[str, float]:
    return {key: float(r.detach()), f"{key}_nonfinite": counts[0], f"{key}_dropped": counts[1]}


def _jvp_rows(transform: Transform, fn: Callable, x: Tensor, d: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Batch mean of the exact ``||J d||^2`` through stored activations; non-finite rows dropped."""
    from .memory import stored_activations

    with stored_activations(transform):
        r = jvp_penalty(fn, x, d)
    finite = torch.isfinite(r.detach())
    bad = int((~finite).sum())
    if bad == 0:
        return r.mean(), (0, 0)
    with stored_activations(transform):
        kept = jvp_penalty(fn, x[finite], d[finite]).sum() if bad < x.shape[0] else r.new_zeros(())
    return kept / x.shape[0], (bad, bad)


def robust_rows_mean(difference: Callable[[Tensor, float], Tensor], n: int, eps: float, *,
                     backtrack: int = FD_BACKTRACK) -> tuple[Tensor, tuple[int, int]]:
    """Batch mean over all ``n`` rows of the FD penalty ``||diff||^2 / eps^2``, ``diff =
    difference(rows, eps)`` of shape ``(len(rows), D)``, keeping rows where it is not finite.

    A row whose penalty is finite at ``eps`` contributes it exactly. A row whose difference is finite
    but whose square overflows contributes ``log1p(R)`` computed in the log domain; a row whose
    difference is non-finite (the map exploded at the moved point) is re-evaluated at ``eps / 2^k``,
    ``k = 1 .. backtrack``, and contributes ``log1p(R(eps / 2^k))`` at the first finite step (module
    docstring). Returns the mean and ``(rows non-finite at eps, rows non-finite at every step)``; the
    latter contribute 0. A row's inf/NaN poisons the gradient of the whole batch even through a mask
    (``0 * inf``), so every subset is evaluated again on its own.
    """
    rows = torch.arange(n)
    diff = difference(rows, eps)
    r = diff.pow(2).sum(dim=1) / eps ** 2
    finite = torch.isfinite(r.detach()).cpu()
    n_bad = int((~finite).sum())
    if n_bad == 0:
        return r.mean(), (0, 0)
    total = (difference(rows[finite], eps).pow(2).sum(dim=1) / eps ** 2).sum() if n_bad < n else r.new_zeros(())
    todo = rows[~finite]
    step = eps
    for k in range(backtrack + 1):
        if todo.numel() == 0:
            break
        if k > 0:
            step = step / 2
        with torch.no_grad():
            ok = torch.isfinite(difference(todo, step)).all(dim=1).cpu()
        if bool(ok.any()):
            total = total + log1p_penalty(difference(todo[ok], step), step).sum()
        todo = todo[~ok]
    return total / n, (n_bad, int(todo.numel()))


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

