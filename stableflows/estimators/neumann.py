"""Weighted power series of ``log det(I + J)`` and its three gradient modes.

Given weights ``c_1..c_n`` (all 1 for the truncated series; Russian-roulette weights otherwise)
and a probe ``v``, the value is (Chen et al. 2019, eq. 6)::

    logdet ~= sum_{k=1}^n c_k (-1)^(k+1) / k  v^T J^k v,      v^T J^k from k vector-Jacobian products.

Gradient modes, all with respect to ``x`` and the parameters of ``g``:

* plain backprop (eq. 7): differentiate the series itself; memory grows with ``n``.
* Neumann series (Theorem 2, eq. 8, app. C): ``d logdet = tr((I + J)^-1 dJ)`` estimated by
  ``sum_{k=0}^{n-1} c_{k+1} (-1)^k v^T J^k (dJ) v``: the row vector
  ``u^T = sum_k c_{k+1} (-1)^k v^T J^k`` is accumulated without a graph and only the surrogate
  ``s = u^T J v`` is differentiated, so memory does not grow with ``n``. Term ``k`` carries the
  weight of series term ``k + 1``, whose derivative it is, so that in expectation over the probe
  the gradient is that of the estimated log-det.
* backward-in-forward (sec. 3.2, eq. 9): the gradients of ``sum_b s_b`` are computed during the
  forward pass (:class:`BackwardInForward`) and the surrogate's graph is freed at once; backward
  scales them by ``dL/dlogdet``. For ``x`` the stored gradient is per example (examples are
  independent), so any weights are exact. For the parameters the stored gradient is a sum over
  the batch and is exact only for a gradient ``dL/dlogdet_b`` equal for every example (a mean
  loss); for per-example weights ``w_b`` the published code silently returns ``mean(w) * sum_b``.
  Here backward checks this and, when the weights differ, rebuilds the surrogate from the kept
  graph of ``g(x)`` and contracts it with the weights: exact, at the cost of one more pass. The
  check reads one device value per block; with input validation switched off
  (:func:`~stableflows.transforms.base.validation`: the training loop, compiled code) it is not read,
  and differing weights turn the parameter gradients NaN instead (every objective of the training
  loop is a batch mean: one weight).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import batch_dot, graph_leaf, local_graph

__all__ = ["series_surrogate", "power_series_logdet", "BackwardInForward"]


def _vjp(gx: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    """``w^T J_g(x)`` per example (B, *S)."""
    (out,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if out is None else out


def series_surrogate(gx: Tensor, x: Tensor, v: Tensor, coeffs: Sequence[float], *, neumann: bool,
                     create_graph: bool) -> tuple[Tensor, Tensor | None]:
    """``(value, s)``: the weighted series (B,) and a per-example surrogate whose gradient is the
    estimator's gradient (the value itself for plain backprop, ``u^T J v`` for the Neumann series;
    None without ``create_graph``). ``gx = g(x)`` must have a graph to ``x``."""
    b, n = x.shape[0], len(coeffs)
    value = x.new_zeros(b)
    plain = create_graph and not neumann
    u = torch.zeros_like(v) if (neumann and create_graph) else None  # Neumann row vector
    w = v  # v^T J^k, k = 0
    for k in range(1, n + 1):
        if u is not None:
            u = u + (coeffs[k - 1] * (-1) ** (k - 1)) * w  # term k - 1 of the Neumann series
        w = _vjp(gx, x, w, create_graph=plain)
        value = value + (coeffs[k - 1] * (-1) ** (k + 1) / k) * batch_dot(w, v)
    if plain:
        return value, value
    if u is not None:
        return value.detach(), batch_dot(_vjp(gx, x, u, create_graph=True), v)
    return value.detach(), None


def _sum_grads(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class BackwardInForward(torch.autograd.Function):
    """``(g(x), logdet)`` whose log-det gradient is computed during forward (see module docstring).

    ``apply(spec, x, *params)`` with ``spec = (g, v, coeffs, neumann, params)``; ``params`` are the
    parameters of ``g`` that require grad (passed twice so autograd tracks them). First-order only.
    """

    @staticmethod
    def forward(ctx, spec, x, *params):
        g, v, coeffs, neumann, g_params = spec
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            gx = g(x_)  # (B, *S), its graph is kept for the path-wise gradient
            value, s = series_surrogate(gx, x_, v, coeffs, neumann=neumann, create_graph=True)
            inputs = (x_, *g_params)
            if s.requires_grad:
                grads = torch.autograd.grad(s.sum(), inputs, retain_graph=True, allow_unused=True)
            else:  # no term depends on x or the parameters (e.g. zero terms drawn)
                grads = (None,) * len(inputs)
        ctx.spec, ctx.gx, ctx.x_, ctx.grads = spec, gx, x_, grads
        return gx.detach(), value.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gx, grad_logdet):
        _, v, coeffs, neumann, g_params = ctx.spec
        inputs = (ctx.x_, *g_params)
        with torch.enable_grad():
            total = list(torch.autograd.grad(ctx.gx, inputs, grad_gx, retain_graph=True, allow_unused=True))
            one_weight = (grad_logdet == grad_logdet[0]).all()
            from ..transforms.base import validation_enabled  # here: transforms imports this package

            if not validation_enabled():  # no device read: NaN parameter gradients if the weights differ
                logdet_part = _stored_gradients(ctx, grad_logdet, one_weight)
            elif bool(one_weight):  # one weight for the batch: stored gradients
                logdet_part = _stored_gradients(ctx, grad_logdet, None)
            else:  # per-example weights: rebuild the surrogate on the kept graph of g(x)
                _, s = series_surrogate(ctx.gx, ctx.x_, v, coeffs, neumann=neumann, create_graph=True)
                if s.requires_grad:
                    logdet_part = list(torch.autograd.grad((s * grad_logdet).sum(), inputs, retain_graph=True,
                                                           allow_unused=True))
                else:
                    logdet_part = [None] * len(inputs)
        grads = [_sum_grads(a, b) for a, b in zip(total, logdet_part)]
        grads[0] = grads[0] if ctx.needs_input_grad[1] else None
        return (None, *grads)


def _stored_gradients(ctx, grad_logdet: Tensor, one_weight: Tensor | None) -> list:
    """The log-det gradients stored in forward, scaled by the batch weight ``dL/dlogdet``: exact per
    example for ``x``, exact for the parameters when every example has the same weight. With
    ``one_weight`` (a device flag, not read) the parameter gradients become NaN where it is false, so
    a loss with per-example weights fails loudly (non-finite gradients) instead of silently."""
    per_example = grad_logdet.reshape(-1, *([1] * (ctx.x_.dim() - 1)))
    gx_part = None if ctx.grads[0] is None else ctx.grads[0] * per_example
    params = []
    for gr in ctx.grads[1:]:
        if gr is not None:
            gr = gr * grad_logdet[0]
            if one_weight is not None:
                gr = torch.where(one_weight, gr, torch.full_like(gr, math.nan))
        params.append(gr)
    return [gx_part] + params


def power_series_logdet(g: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, coeffs: Sequence[float], *,
                        neumann_grad: bool, grad_in_forward: bool) -> tuple[Tensor, Tensor]:
    """``(g(x), weighted series)`` with the requested gradient mode (plain / Neumann / in forward)."""
    params = [p for p in g.parameters() if p.requires_grad] if isinstance(g, torch.nn.Module) else []
    if not (torch.is_grad_enabled() and (x.requires_grad or params)):
        with local_graph():  # values only: no graph is kept
            x_ = graph_leaf(x)
            gx = g(x_)
            value, _ = series_surrogate(gx, x_, v, coeffs, neumann=True, create_graph=False)
        return gx.detach(), value
    if grad_in_forward:
        return BackwardInForward.apply((g, v, list(coeffs), neumann_grad, params), x, *params)
    x_ = x if x.requires_grad else x.detach().requires_grad_(True)
    gx = g(x_)
    value, s = series_surrogate(gx, x_, v, coeffs, neumann=neumann_grad, create_graph=True)
    if neumann_grad:  # value forward, gradient of the surrogate backward
        return gx, value + (s - s.detach())
    return gx, value
