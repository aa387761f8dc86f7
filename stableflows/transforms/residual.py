"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019; Residual Flows, Chen et al. 2019).

    z = F(x) = x + g(x),      log|det dz/dx| = log det(I + J_g(x))

``F`` is invertible when ``Lip(g) < 1`` (Banach fixed point), which Lipschitz-normalised layers
(:mod:`.lipschitz`) and activations with ``|phi'| <= 1`` (:mod:`.activations`) guarantee:
``Lip(g) <= prod_l c_l``. The log-det comes from an estimator of :mod:`stableflows.estimators`
(exact, truncated series, Russian roulette; Neumann gradient, backward-in-forward).

Inverse: fixed-point iteration ``x_{k+1} = z - g(x_k)`` from ``x_0 = z`` until
``|x_{k+1} - x_k| <= atol + rtol |z|`` elementwise (``x_k - x_{k+1} = F(x_k) - z`` is the residual of
the equation), at most ``max_iter`` iterations (one device read each: the stopping tests; training
never inverts). ``stats`` records the iterations, ``converged`` and ``diverged`` (non-finite, or the
per-example residual grew far above its smallest value: what a non-contractive ``g`` does), and, when
asked (:func:`~stableflows.transforms.base.collect_stats`, tracing) or on failure, the final residual
(max over the batch of ``max |F(x_k) - z|``; the returned ``x_{k+1}`` is at least as close for a
contraction) and the certified bound (``contractive = 0`` for ``Lip(g) >= 1``). Nothing is returned silently: a non-converged inverse
warns (:class:`InverseNotConvergedWarning`) and, with ``strict=True``, raises
:class:`~stableflows.transforms.base.InverseNotConverged` (:class:`NotContractiveError` for a bound
``>= 1``). Gradients through the inverse use the implicit function theorem
(``dx/dz = (I + J_g)^-1``, an adjoint fixed point in backward), not the unrolled iterations.

Under ``torch.compile`` a block runs eagerly (``torch.compiler.disable``: one graph break per block
and direction), the layers around it compile: the log-det estimators differentiate ``g`` twice in
training (the Neumann surrogate, the exact Jacobian with ``create_graph``), which AOTAutograd does
not support; the Russian roulette draws its number of terms on the host, which sets the length of
the series (one graph per count otherwise); the fixed-point inverse stops on a tolerance.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from ..estimators import LogDetEstimator, make_estimator
from .activations import make_activation
from .base import InverseNotConverged, Transform, check_finite, stats_wanted
from .lipschitz import DEFAULT_COEFF, LipschitzConv2d, LipschitzLinear, frozen_normalization, lipschitz_bound

__all__ = [
    "ResidualBlock",
    "NotContractiveError",
    "InverseNotConvergedWarning",
    "mlp_lipschitz",
    "conv_lipschitz",
]

DEFAULT_INVERSE_ATOL = 1e-6
DEFAULT_INVERSE_RTOL = 1e-6
DEFAULT_INVERSE_MAX_ITER = 500
DIVERGENCE_GROWTH = 100.0  # diverged: per-example ||residual||_2 > this * sqrt(D) * its smallest value
# (a contraction in any p-norm keeps the 2-norm residual within sqrt(D) of its smallest value)
ADJOINT_EXTRA_ITERATIONS = 10  # margin of the adjoint fixed point when its stopping test is unavailable


class NotContractiveError(InverseNotConverged):
    """The certified Lipschitz bound of ``g`` is >= 1: the block may not be invertible (strict mode)."""


class InverseNotConvergedWarning(RuntimeWarning):
    """A fixed-point inverse stopped before its tolerance (non-strict mode); see the block's ``stats``."""


class ResidualBlock(Transform):
    """``z = x + g(x)`` with a Lipschitz-constrained ``g`` (module docstring).

    Args:
        g: the residual branch, shape-preserving, examples independent, ``Lip(g) < 1``.
        estimator: ``"exact"``, ``"series"``, ``"roulette"`` or a
            :class:`~stableflows.estimators.LogDetEstimator`; the options below configure a named one
            (see :func:`stableflows.estimators.make_estimator`).
        n_exact_terms, eval_exact_terms, n_samples, dist, p: Russian roulette (training: 2 exact
            terms + ``Geom(0.5)`` tail; evaluation: 20 exact terms + tail).
        n_series_terms: length of the truncated series (i-ResNet).
        neumann_grad, grad_in_forward, probe: gradient modes and Hutchinson probe.
        inverse_atol, inverse_rtol, max_iter: fixed-point inverse tolerances and cap.
        strict: raise instead of warning when the inverse fails or ``g`` is not certified contractive.
    """

    def __init__(self, g: nn.Module, *, estimator: str | LogDetEstimator = "roulette", n_exact_terms: int = 2,
                 eval_exact_terms: int = 20, n_samples: int = 1, dist: str = "geometric", p: float | None = None,
                 n_series_terms: int = 5, neumann_grad: bool = True, grad_in_forward: bool = True,
                 probe: str = "gaussian", inverse_atol: float = DEFAULT_INVERSE_ATOL,
                 inverse_rtol: float = DEFAULT_INVERSE_RTOL, max_iter: int = DEFAULT_INVERSE_MAX_ITER,
                 strict: bool = False):
        super().__init__()
        if not isinstance(g, nn.Module):
            raise TypeError(f"g must be an nn.Module, got {type(g).__name__}")
        if inverse_atol < 0 or inverse_rtol < 0 or inverse_atol + inverse_rtol <= 0 or max_iter < 1:
            raise ValueError("need inverse_atol, inverse_rtol >= 0 (not both 0) and max_iter >= 1")
        self.g = g
        if isinstance(estimator, LogDetEstimator):
            self.estimator = estimator
        else:
            self.estimator = make_estimator(
                estimator, n_exact_terms=n_exact_terms, eval_exact_terms=eval_exact_terms, n_samples=n_samples,
                dist=dist, p=p, n_series_terms=n_series_terms, neumann_grad=neumann_grad,
                grad_in_forward=grad_in_forward, probe=probe)
        self.inverse_atol = float(inverse_atol)
        self.inverse_rtol = float(inverse_rtol)
        self.max_iter = int(max_iter)
        self.strict = bool(strict)
        self.last_inverse_residual: Tensor | None = None  # (B,) max |F(x) - z| per example, last inverse

    def extra_repr(self) -> str:
        return (f"estimator={self.estimator!r}, inverse_atol={self.inverse_atol:g}, "
                f"inverse_rtol={self.inverse_rtol:g}, max_iter={self.max_iter}, strict={self.strict}")

    def lipschitz_bound(self) -> float | None:
        """Certified upper bound of ``Lip(g)`` (product of layer norms), None if not certifiable."""
        return lipschitz_bound(self.g)

    def _check_contractive(self) -> float:
        bound = self.lipschitz_bound()
        value = math.nan if bound is None else bound
        if self.strict and bound is not None and bound >= 1.0:
            raise NotContractiveError(f"Lip(g) <= {bound:.4g} is not below 1: the residual block may not be "
                                      "invertible", iterations=0, residual=math.nan)
        return value

    # ------------------------------------------------------------------ forward
    @torch.compiler.disable  # eager inside torch.compile: see _estimate
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.strict:
            self._check_contractive()
        gx, logdet = self.estimator(self.g, x, training=self.training)
        self.stats = dict(self.estimator.stats)
        return x + gx, logdet

    # ------------------------------------------------------------------ inverse
    def _check_domain(self, x: Tensor, direction: str) -> None:
        if direction == "inverse":  # the fixed point of a non-finite z is not defined
            check_finite(x, "ResidualBlock inverse input")

    def _fixed_point(self, z: Tensor) -> tuple[Tensor, Tensor, int, bool, bool]:
        """Solve ``x + g(x) = z`` without a graph: ``(x, residual (B,), iterations, converged, diverged)``.
        One device read per iteration (the three stopping tests together)."""
        b = z.shape[0]
        growth = DIVERGENCE_GROWTH * math.sqrt(z[0].numel())
        tol = self.inverse_atol + self.inverse_rtol * z.abs()
        with torch.no_grad():
            x = z.clone()
            best = torch.full((b,), math.inf, dtype=z.dtype, device=z.device)
            converged = diverged = False
            res_max = torch.full((b,), math.inf, dtype=z.dtype, device=z.device)
            it = 0
            for it in range(1, self.max_iter + 1):
                x_new = z - self.g(x)
                step = x_new - x  # = z - F(x_k)
                x = x_new
                flat = step.reshape(b, -1)
                res_max = flat.abs().amax(dim=1)  # (B,)
                res_2 = flat.norm(dim=1)
                best = torch.minimum(best, res_2)
                nonfinite, done, grew = torch.stack([~torch.isfinite(res_2).all(), (step.abs() <= tol).all(),
                                                     (res_2 > growth * best).any()]).tolist()
                if nonfinite:
                    diverged = True
                    break
                if done:
                    converged = True
                    break
                if grew:
                    diverged = True
                    break
        return x, res_max, it, converged, diverged

    def _bound(self) -> float:
        """The certified ``Lip(g)`` bound as a float (nan if not certifiable; reads the device)."""
        bound = self.lipschitz_bound()
        return math.nan if bound is None else bound

    @torch.compiler.disable  # eager inside torch.compile: a host loop to a tolerance, and the estimator
    def _inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        with frozen_normalization(self.g):  # every call of g below sees the same weights
            bound = self._check_contractive() if self.strict else None
            x, res_max, it, converged, diverged = self._fixed_point(z)
            self.last_inverse_residual = res_max  # (B,), on the device
            info = {"inverse_iterations": float(it), "inverse_converged": float(converged),
                    "inverse_diverged": float(diverged)}  # known on the host: always recorded
            if stats_wanted() or not converged:  # the residual and the bound are device reads
                bound = self._bound() if bound is None else bound
                info["inverse_residual"] = res_max.max()
                info["lipschitz_bound"] = bound
                info["contractive"] = float(bound < 1.0) if not math.isnan(bound) else math.nan
            self.stats = info
            if not converged:
                what = "diverged" if diverged else "did not converge"
                residual = float(info["inverse_residual"])
                msg = (f"ResidualBlock fixed-point inverse {what} after {it} iterations (residual {residual:.3g}, "
                       f"atol {self.inverse_atol:g}, rtol {self.inverse_rtol:g}, Lip(g) bound {bound:.4g})")
                if self.strict:
                    raise InverseNotConverged(msg, iterations=it, residual=residual)
                warnings.warn(msg, InverseNotConvergedWarning, stacklevel=3)
            params = [p for p in self.g.parameters() if p.requires_grad]
            if torch.is_grad_enabled() and (z.requires_grad or params):
                x = _ImplicitInverse.apply(self, z, x, it, *params)
            _, logdet = self.estimator(self.g, x, training=self.training)
            self.stats.update(self.estimator.stats)
        return x, -logdet


class _ImplicitInverse(torch.autograd.Function):
    """Identity on the solved ``x*`` whose backward is the implicit-function gradient of
    ``x* + g(x*) = z``: with ``(I + J)^T a = dL/dx`` (fixed point ``a = dL/dx - J^T a``),
    ``dL/dz = a`` and ``dL/dtheta = -(dg/dtheta)^T a``."""

    @staticmethod
    def forward(ctx, block, z, x_star, forward_iterations, *params):
        ctx.block = block
        ctx.forward_iterations = forward_iterations
        ctx.save_for_backward(x_star)
        return x_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x):
        block = ctx.block
        (x_star,) = ctx.saved_tensors
        params = [p for p in block.g.parameters() if p.requires_grad]
        tol = block.inverse_atol + block.inverse_rtol * grad_x.abs()
        # under vmap (vectorised Jacobians) the stopping test cannot be evaluated: then iterate as long
        # as the forward fixed point needed, twice over (same contraction rate), plus a margin
        fixed_count = min(block.max_iter, 2 * ctx.forward_iterations + ADJOINT_EXTRA_ITERATIONS)
        with torch.enable_grad(), frozen_normalization(block.g):
            x_ = x_star.detach().requires_grad_(True)
            gx = block.g(x_)
            a, converged, it = grad_x, None, 0
            for it in range(1, block.max_iter + 1):
                (jt_a,) = torch.autograd.grad(gx, x_, a, retain_graph=True)
                a_new = grad_x - jt_a
                done = _all_true((a_new - a).abs() <= tol)
                a = a_new
                if done is None:  # not decidable (vmap)
                    if it >= fixed_count:
                        break
                elif done:
                    converged = True
                    break
                else:
                    converged = False
            block.stats["inverse_grad_iterations"] = float(it)  # host-known
            if converged is False:
                msg = f"ResidualBlock inverse gradient (adjoint fixed point) did not converge in {it} iterations"
                if block.strict:
                    raise InverseNotConverged(msg, iterations=it, residual=float((a - grad_x).abs().max()))
                warnings.warn(msg, InverseNotConvergedWarning, stacklevel=2)
            grads = torch.autograd.grad(gx, params, -a, allow_unused=True) if params else ()
        return (None, a, None, None, *grads)


def _all_true(mask: Tensor) -> bool | None:
    """``bool(mask.all())``, or None where a functorch transform (vmap) makes it undecidable."""
    try:
        return bool(mask.all())
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- residual branches
def _lipschitz_kwargs(coeff, norm, n_power_iter, atol, rtol, max_power_iter) -> dict:
    # atol = rtol = None: exactly n_power_iter iterations per training call, no device read (base.py);
    # a tolerance: adaptive, reading the change of sigma from the device after every iteration
    return dict(coeff=coeff, norm=norm, n_power_iter=n_power_iter, max_iter=max_power_iter, atol=atol, rtol=rtol)


def mlp_lipschitz(dim: int, hidden: int, *, coeff: float = DEFAULT_COEFF, activation: str = "lipswish",
                  n_layers: int = 3, norm: str = "spectral", preact: bool = False, n_power_iter: int = 1,
                  atol: float | None = None, rtol: float | None = None, max_power_iter: int = 100) -> nn.Sequential:
    """``g`` for vectors: ``[act ->] Linear(dim, hidden) -> act -> ... -> Linear(hidden, dim)`` with
    ``n_layers`` normalised linear layers (``Lip(g) <= coeff^n_layers``); ``preact`` puts an activation
    first (as the fully connected blocks of the paper's image models, app. E). Power iteration:
    ``n_power_iter`` per training call, or adaptive with a tolerance ``atol`` / ``rtol``
    (:class:`~stableflows.transforms.lipschitz.LipschitzLinear`; it reads the device every iteration)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    kw = _lipschitz_kwargs(coeff, norm, n_power_iter, atol, rtol, max_power_iter)
    sizes = [dim] + [hidden] * (n_layers - 1) + [dim]
    layers: list[nn.Module] = [make_activation(activation)] if preact else []
    for i in range(n_layers):
        if i > 0:
            layers.append(make_activation(activation))
        layers.append(LipschitzLinear(sizes[i], sizes[i + 1], **kw))
    return nn.Sequential(*layers)


def conv_lipschitz(channels: int, hidden: int, *, coeff: float = DEFAULT_COEFF, activation: str = "lipswish",
                   input_shape: Sequence[int] | None = None, norm: str = "spectral", kernel_size: int = 3,
                   n_power_iter: int = 1, atol: float | None = None, rtol: float | None = None,
                   max_power_iter: int = 100) -> nn.Sequential:
    """``g`` for images (Chen et al. 2019, app. E):
    ``act -> kxk conv -> act -> 1x1 conv -> act -> kxk conv``, channels ``C -> hidden -> hidden -> C``,
    every conv normalised as an operator at the input size ``input_shape=(H, W)`` (or the first input's);
    power iteration as :func:`mlp_lipschitz`."""
    kw = _lipschitz_kwargs(coeff, norm, n_power_iter, atol, rtol, max_power_iter)
    return nn.Sequential(
        make_activation(activation),
        LipschitzConv2d(channels, hidden, kernel_size, input_shape=input_shape, **kw),
        make_activation(activation),
        LipschitzConv2d(hidden, hidden, 1, input_shape=input_shape, **kw),
        make_activation(activation),
        LipschitzConv2d(hidden, channels, kernel_size, input_shape=input_shape, **kw),
    )
