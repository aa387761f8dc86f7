"""Jacobian products of batch-independent maps ``(B, D_in) -> (B, D_out)`` that work through every
stableflows layer.

Only plain reverse-mode ``torch.autograd`` is used: ``torch.func`` cannot trace residual blocks
(in-place updates in the fixed point, ``autograd.Function`` s without ``setup_context`` / ``jvp``),
its ``vmap`` cannot batch layers that record ``float(...)`` statistics, and any forward-mode AD
(``torch.func.jvp``, ``torch.autograd.forward_ad``) costs a one-off import of ``torch._dynamo``
(seconds on a small CPU machine) while failing on the same custom Functions.

* VJP ``u -> J^T u``: one forward graph, reused with ``retain_graph`` for every ``u``.
* JVP ``v -> J v``: the double-backward trick ``J v = d/du <J^T u, v>`` on one cached graph of
  ``J^T u`` (one extra backward per product); where a layer is not twice differentiable (the
  implicit backward of residual blocks is ``once_differentiable``), central finite differences
  ``(f(x + h v) - f(x - h v)) / 2h`` with
  ``h = FD_REL_STEP(dtype) * max(||x||, 1) / ||v||`` (error ``O(h^2)`` plus rounding, plus the
  tolerance of any iterative inverse divided by ``h``).

Because each example is mapped independently, ``J^T u`` of the batch sum gives every example's
product at once, and a full Jacobian needs ``D_out`` reverse passes over one forward graph.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["vjp_fn", "jvp_fn", "jacobians", "FD_REL_STEP"]

# central differences: h ~ eps^(1/3) balances truncation O(h^2) and rounding O(eps / h)
FD_REL_STEP = {torch.float64: 6e-6, torch.float32: 5e-3}


def vjp_fn(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(f(x), u -> J^T u)`` for ``x (B, D)``; ``u`` has the shape of ``f(x)``."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        y = f(xx)

    def back(u: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(y, xx, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(xx) if g is None else g.detach()

    return y.detach(), back


def jvp_fn(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> J v`` at ``x`` (see the module docstring for the fallback chain)."""
    x = x.detach()
    cache: dict = {}

    def double_backward(v):
        if "g" not in cache:
            with torch.enable_grad():
                xx = x.clone().requires_grad_(True)
                y = f(xx)
                u = torch.zeros_like(y, requires_grad=True)
                (g,) = torch.autograd.grad(y, xx, u, create_graph=True)  # J^T u, linear in u
            cache.update(g=g, u=u)
        (jv,) = torch.autograd.grad(cache["g"], cache["u"], v, retain_graph=True)
        return jv

    def finite_difference(v):
        rel = FD_REL_STEP.get(x.dtype, 1e-3)
        xn = x.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1.0)
        vn = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(1e-300)
        h = (rel * xn / vn).view(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            return (f(x + h * v) - f(x - h * v)) / (2 * h)

    chain = [double_backward, finite_difference]
    state = {"i": 0}

    def jvp(v: Tensor) -> Tensor:
        while True:
            try:
                return chain[state["i"]](v).detach()
            except Exception:  # noqa: BLE001 - fall back to the next method
                if state["i"] == len(chain) - 1:
                    raise
                state["i"] += 1

    jvp.method = lambda: chain[state["i"]].__name__  # type: ignore[attr-defined]
    return jvp


def jacobians(f: Callable[[Tensor], Tensor], x: Tensor, *, chunk: int | None = None) -> Tensor:
    """Per-example Jacobians ``(B, D_out, D_in)`` of a batch-independent ``f`` at ``x (B, D_in)``:
    one forward per chunk of examples, then ``D_out`` VJPs of the batch sum."""
    b = x.shape[0]
    chunk = b if chunk is None else max(1, int(chunk))
    out = []
    for s in range(0, b, chunk):
        xc = x[s:s + chunk].detach()
        y, back = vjp_fn(lambda t: f(t).sum(0), xc)  # (D_out,)
        eye = torch.eye(y.shape[0], dtype=xc.dtype, device=xc.device)
        out.append(torch.stack([back(e) for e in eye], 1))  # (Bc, D_out, D_in)
    return torch.cat(out, 0)
