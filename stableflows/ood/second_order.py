"""Second-order analysis of the likelihood gap between two data sets (Nalisnick et al. 2019, paper 004, sec. 5).

Expanding ``log p(x)`` to second order around an interior point ``x0`` and taking expectations
under the training distribution ``p`` and another distribution ``q`` (Eq. 4):

    E_q[log p(x)] - E_p[log p(x)]  ~  g^T (E_q[x] - E_p[x]) + 1/2 Tr{ H (S_q - S_p) },

with ``g = grad log p(x0)``, ``H = hess log p(x0)`` and ``S = E[(x - x0)(x - x0)^T]``. With equal
means (``E_q[x] = E_p[x] = x0``) the gradient term vanishes (Eq. 5); with diagonal ``S`` only
``diag H`` matters (App. F). The expansion is exact when ``log p`` is quadratic, e.g. a flow whose
``F`` is affine (a constant-volume Glow with zero coupling networks).

Constant-volume Glow (additive coupling, ActNorm, 1x1 convolutions, fixed priors):
``log p(x) = -||F(x)||^2 / 2 + const``, so ``H = -(J^T J + sum_d F_d hess F_d)``. Dropping the second
term (the paper's claim that translations have zero second derivatives; exact for affine ``F``,
and exact at almost every ``x0`` when the coupling networks are piecewise linear, as ReLU CNNs are)
gives the Gauss-Newton curvature ``gamma_i = (J^T J)_ii >= 0`` and

    E_q - E_p  ~  -1/2 sum_i gamma_i (sigma_q,i^2 - sigma_p,i^2)          (Eq. 5, diagonal)

which is positive whenever ``q`` has smaller variances in every dimension: a data set that "sits
inside" the training set gets the higher likelihood, whatever the parameters.

The paper's closed form (Eq. 6) writes ``gamma`` per channel from the 1x1 kernels alone,
``gamma_c = (prod_k sum_j u_{k,c,j})^2`` (the extracted text is garbled; this is the published form),
which ignores ActNorm, the couplings and the multi-scale structure, and is not ``(J^T J)_cc`` even for a
linear flow. :func:`paper_eq6` evaluates it literally on the kernels of the first level, for
comparison; :func:`second_order_prediction` reports the exact-Hessian (Eq. 4, Eq. 5, diagonal) and
Gauss-Newton predictions next to the measured difference.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ..models.distributions import StandardNormal
from ..transforms.linear import Invertible1x1
from ..transforms.multiscale import MultiScale
from ..transforms.reshape import Squeeze
from .decompose import latent_log_prob, likelihood_terms

__all__ = ["standard_normal_base", "second_moments", "log_prob_derivatives", "latent_jacobian", "curvature",
           "second_order_prediction", "paper_eq6", "HESSIAN_MAX_DIM"]

HESSIAN_MAX_DIM = 1024  # exact Hessians up to this dimension (one backward pass per dimension)


def _flat64(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()


def second_moments(x: Tensor, x0: Tensor) -> Tensor:
    """``S = E[(x - x0)(x - x0)^T]`` over the batch, ``(D, D)`` float64 (``x``: ``(N, *shape)``)."""
    d = _flat64(x) - x0.reshape(1, -1).to(torch.float64).cpu()  # (N, D)
    return d.T @ d / d.shape[0]


def _float64_flow(flow: nn.Module) -> nn.Module:
    import copy

    f = copy.deepcopy(flow).to(dtype=torch.float64, device="cpu")
    f.eval()
    return f


def log_prob_derivatives(flow: nn.Module, x0: Tensor) -> tuple[float, Tensor, Tensor]:
    """``(log p(x0), gradient (D,), Hessian (D, D))`` of ``log p`` at one input ``x0`` (event shape),
    in float64 by autograd (one backward pass per dimension)."""
    f = _float64_flow(flow)
    shape = tuple(x0.shape)
    d = x0.numel()
    if d > HESSIAN_MAX_DIM:
        raise ValueError(f"exact Hessian of a {d}-dimensional input exceeds HESSIAN_MAX_DIM={HESSIAN_MAX_DIM}")

    def logp(flat: Tensor) -> Tensor:
        z, ld = f.transform(flat.reshape(1, *shape))
        return (latent_log_prob(f, z) + ld)[0]

    x = x0.detach().reshape(-1).to(torch.float64).cpu().requires_grad_(True)
    val = logp(x)
    (g,) = torch.autograd.grad(val, x, create_graph=True)
    rows = [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(d)]
    h = torch.stack(rows)  # (D, D)
    return float(val.detach()), g.detach(), 0.5 * (h + h.T).detach()


def latent_jacobian(flow: nn.Module, x0: Tensor) -> Tensor:
    """``J = dF/dx`` at ``x0`` (event shape), ``(D, D)`` float64 by autograd."""
    f = _float64_flow(flow)
    shape = tuple(x0.shape)

    def fwd(flat: Tensor) -> Tensor:
        return f.transform(flat.reshape(1, *shape))[0].reshape(-1)

    x = x0.detach().reshape(-1).to(torch.float64).cpu()
    return torch.autograd.functional.jacobian(fwd, x)


def curvature(flow: nn.Module, x0: Tensor) -> dict:
    """Everything the expansion needs at ``x0`` (event shape): ``log p(x0)``, gradient, Hessian and
    the Gauss-Newton curvature ``gamma = diag(J^T J)`` of the latent map (float64)."""
    val, g, h = log_prob_derivatives(flow, x0)
    j = latent_jacobian(flow, x0)
    return {"x0": x0.detach().to(torch.float64).cpu(), "log_p_x0": val, "grad": g, "hess": h,
            "gamma": (j ** 2).sum(0)}


def second_order_prediction(flow: nn.Module, x_p: Tensor, x_q: Tensor, *, x0: Tensor | None = None,
                            curv: dict | None = None, measured: float | None = None) -> dict:
    """Predicted and measured ``E_q[log p(x)] - E_p[log p(x)]`` (nats per example).

    ``x_p`` (training-like) and ``x_q`` (other) are model-space inputs ``(N, *shape)``; the expansion
    point ``x0`` defaults to the mean of ``x_p`` (or is that of ``curv``, a :func:`curvature` result
    to reuse). Returns the measured difference (computed unless given), the predictions of Eq. 4
    (gradient + full second moments), Eq. 5 (equal means: curvature term only), Eq. 5 with diagonal
    second moments, and the Gauss-Newton form ``-1/2 sum gamma_i (S_q,ii - S_p,ii)`` with
    ``gamma = diag(J^T J)`` (the constant-volume Glow analysis), plus the variance traces.
    """
    if tuple(x_p.shape[1:]) != tuple(x_q.shape[1:]):
        raise ValueError(f"x_p and x_q must have the same event shape, got {tuple(x_p.shape)} and {tuple(x_q.shape)}")
    mu_p, mu_q = _flat64(x_p).mean(0), _flat64(x_q).mean(0)
    if curv is None:
        curv = curvature(flow, mu_p.reshape(x_p.shape[1:]) if x0 is None else x0)
    x0, g, h, gamma = curv["x0"], curv["grad"], curv["hess"], curv["gamma"]
    ds = second_moments(x_q, x0) - second_moments(x_p, x0)
    grad_term = float(g @ (mu_q - mu_p))
    curv_full = 0.5 * float(torch.sum(h * ds))  # 1/2 Tr(H dS), H and dS symmetric
    curv_diag = 0.5 * float(torch.sum(torch.diagonal(h) * torch.diagonal(ds)))
    # -1/2 ||F||^2: the Gauss-Newton form holds for an N(0, I) base only
    gn = -0.5 * float(torch.sum(gamma * torch.diagonal(ds))) if standard_normal_base(flow) else None
    if measured is None:
        tp, tq = likelihood_terms(flow, x_p), likelihood_terms(flow, x_q)
        measured = float(np.nanmean(tq.log_px) - np.nanmean(tp.log_px))
    var_p = _flat64(x_p).var(0, unbiased=False)
    var_q = _flat64(x_q).var(0, unbiased=False)
    preds = {"eq4": grad_term + curv_full, "eq5": curv_full, "eq5_diag": curv_diag, "gauss_newton_diag": gn}
    signs = {k: bool(np.sign(v) == np.sign(measured)) for k, v in preds.items() if v is not None}
    return {
        "measured": measured,
        **preds,
        "gradient_term": grad_term,
        "mean_gap_l2": float(torch.linalg.norm(mu_q - mu_p)),
        "trace_var_p": float(var_p.sum()),
        "trace_var_q": float(var_q.sum()),
        "log_p_x0": curv["log_p_x0"],
        "sign_agrees": signs,
        "dim": int(mu_p.numel()),
        "n_p": int(x_p.shape[0]),
        "n_q": int(x_q.shape[0]),
    }


def standard_normal_base(flow: nn.Module) -> bool:
    """Whether ``flow``'s base is ``N(0, I)`` (a flow without ``base`` counts as one), the latent the
    Gauss-Newton form and Eq. 6 assume."""
    base = getattr(flow, "base", None)
    return base is None or isinstance(base, StandardNormal)


def _first_level_kernels(flow: nn.Module) -> tuple[list[Tensor], bool]:
    """The 1x1 kernels ``U_k`` (C x C) of the first level (before its split), in forward order, and
    whether the level starts with a squeeze."""
    ms = next((m for m in flow.modules() if isinstance(m, MultiScale)), None)
    root = ms.level if ms is not None else flow.transform
    convs = [m for m in root.modules() if isinstance(m, Invertible1x1)]
    squeezed = any(isinstance(m, Squeeze) for m in root.modules())
    return [c.weight_matrix().detach().to(torch.float64).cpu() for c in convs], squeezed


def paper_eq6(flow: nn.Module, x_p: Tensor, x_q: Tensor, *, latent_var: float = 1.0) -> dict:
    """The paper's Eq. 6 evaluated literally on the first level of a (CV-)Glow:

        E_q - E_p  ~  -1/(2 sigma^2) sum_c gamma_c sum_{h,w} (sigma_q,hwc^2 - sigma_p,hwc^2),
        gamma_c = (prod_k sum_j u_{k,c,j})^2,

    with the variances taken in the channel layout the kernels act on (after the level's squeeze).
    Returns the prediction, ``gamma_c`` and the per-channel variance differences.
    """
    if not standard_normal_base(flow):
        raise ValueError(f"paper_eq6 assumes an N(0, sigma^2 I) latent; this flow's base is {type(flow.base).__name__}")
    kernels, squeezed = _first_level_kernels(flow)
    if not kernels:
        raise ValueError("paper_eq6 needs a flow with invertible 1x1 convolutions (Glow / CV-Glow)")

    def layout(x: Tensor) -> Tensor:
        x = x.detach().to(torch.float64).cpu()
        if x.dim() == 4 and squeezed:
            x = torch.nn.functional.pixel_unshuffle(x, 2)  # (N, 4C, H/2, W/2), the Squeeze layout
        return x

    vp, vq = layout(x_p).var(0, unbiased=False), layout(x_q).var(0, unbiased=False)  # (C, H, W) or (C,)
    c = kernels[0].shape[0]
    if vp.shape[0] != c:
        raise ValueError(f"first-level kernels act on {c} channels but the data have {vp.shape[0]}")
    prod = torch.ones(c, dtype=torch.float64)
    for u in kernels:
        prod = prod * u.sum(dim=1)  # sum_j u_{k,c,j}
    gamma = prod ** 2
    dvar = (vq - vp).reshape(c, -1).sum(1)  # sum over h, w
    pred = -float((gamma * dvar).sum()) / (2.0 * latent_var)
    return {"prediction": pred, "gamma_c": gamma.tolist(), "sum_hw_dvar_c": dvar.tolist(),
            "n_kernels": len(kernels), "note": "literal Eq. 6: first-level 1x1 kernels only (no ActNorm, couplings, "
                                              "deeper levels)"}
