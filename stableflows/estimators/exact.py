"""Brute-force ``log|det(I + J_g(x))|`` from the full Jacobian (small dimensions: 2-D toys, tests).

The Jacobian of every example is built with one evaluation of ``g`` on ``D`` copies of it and one
backward pass: with ``x`` repeated ``D`` times, ``d/dx^(i) sum_i g_i(x^(i))`` is row ``i`` of
``J_g``. The log-det is ``slogdet(I + J)`` (:func:`lu_slogdet`), differentiable (second derivatives of ``g``) when
gradients are enabled. Cost: ``g`` on a batch of ``B * D``. The paper uses it for 2-D densities
(Chen et al. 2019, app. D).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import LogDetEstimator, graph_leaf, local_graph

__all__ = ["ExactEstimator", "brute_force_jacobian_logdet", "lu_slogdet"]


def lu_slogdet(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det a|)`` of ``a (..., n, n)`` from an LU factorisation with partial pivoting,
    ``a = P L U``: ``det a = (-1)^(row swaps) prod diag(U)``. The values and derivatives (any order)
    of ``torch.linalg.slogdet``, without its host-side error checks: slogdet's backward reads the
    LAPACK status from the device (two reads per call); ``lu_factor_ex`` reports it as a tensor
    nobody reads. A singular ``a`` gives sign 0 and ``-inf``, as slogdet."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(a)
    diag = lu.diagonal(dim1=-2, dim2=-1)  # (..., n)
    rows = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=pivots.dtype)  # LAPACK pivots are 1-based
    swaps = (pivots != rows).sum(dim=-1) % 2
    sign = (1 - 2 * swaps).to(a.dtype) * torch.sign(diag).prod(dim=-1)
    return sign, diag.abs().log().sum(dim=-1)


def brute_force_jacobian_logdet(g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(g(x), J, sign, logabsdet)`` with ``J`` of shape (B, D, D) and ``det(I + J) = sign * exp(logabsdet)``."""
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = math.prod(shape)
    params_need = isinstance(g, torch.nn.Module) and any(p.requires_grad for p in g.parameters())
    graph = torch.is_grad_enabled() and (x.requires_grad or params_need)
    with local_graph():
        if graph and x.requires_grad:
            xr = x.repeat_interleave(d, dim=0)  # (B * D, *S), a function of x
        else:
            xr = graph_leaf(x.detach().repeat_interleave(d, dim=0))
        out = g(xr).reshape(b, d, d)  # out[b, i, :] = g(x_b), computed on copy i
        (jac,) = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), xr, create_graph=graph)
        jac = jac.reshape(b, d, d)  # jac[b, i, j] = d g_i / d x_j
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        sign, logabsdet = lu_slogdet(eye + jac)
    gx = out[:, 0].reshape(b, *shape)
    if not graph:
        gx, jac, logabsdet = gx.detach(), jac.detach(), logabsdet.detach()
    return gx, jac, sign, logabsdet


class ExactEstimator(LogDetEstimator):
    """Exact log-det from the brute-force Jacobian; ``stats["nonpositive_det"]`` (when asked: tracing,
    :func:`~stableflows.transforms.base.collect_stats`) counts examples where ``det(I + J_g) <= 0``
    (impossible for ``Lip(g) < 1``: the block is not invertible there)."""

    name = "exact"

    def __call__(self, g, x, *, training: bool) -> tuple[Tensor, Tensor]:
        gx, _, sign, logdet = brute_force_jacobian_logdet(g, x)
        self.stats = {"logdet_terms": 0.0}
        from ..transforms.base import stats_wanted  # here: transforms imports this package

        if stats_wanted():  # a device value: only when asked (transforms/base.py)
            self.stats["nonpositive_det"] = (sign <= 0).sum().to(x.dtype)
        return gx, logdet
