"""Linear and convolutional layers with a bounded Lipschitz constant (i-ResNets, Residual Flows).

Soft normalisation (Behrmann et al. 2019, eq. 6; Chen et al. 2019, sec. 2)::

    W_eff = W / max(1, ||W|| / c)          so that ||W_eff|| <= c

with ``||.||`` an induced operator norm of the *layer as a map* (``norm=``):

* ``"spectral"`` (p = 2): estimated by power iteration (Miyato et al. 2018). For a convolution it
  is the norm of the convolution operator at the real input size (Gouk et al. 2018; Chen et al.
  2019, app. E), iterated with ``conv2d`` / ``conv_transpose2d``, *not* the norm of the reshaped
  kernel (which can underestimate the operator norm by up to a factor ``sqrt(kh * kw)``).
  Adaptive: each training-mode call runs at least ``n_power_iter`` iterations and continues until
  the change of the estimate is ``<= atol + rtol * sigma`` (capped at ``max_iter``); the vectors
  ``u, v`` are buffers, persisted between steps and saved in the ``state_dict``.
* ``"inf"`` (p = q = inf, Chen et al. 2019, app. D): exact, ``max_i sum_j |W_ij|`` (largest
  absolute row sum). For a convolution: the largest absolute sum of one output channel's kernel,
  exact whenever the input is at least as large as the kernel (a border output sees fewer taps),
  an upper bound otherwise.
* ``"one"`` (p = q = 1): exact, largest absolute column sum (convolution: per input channel).
* ``"mixed"`` (Chen et al. 2019, app. D; linear layers): the induced mixed norm
  ``||W||_{p->q} = sup ||W x||_q / ||x||_p`` with orders ``p`` (domain) and ``q`` (codomain) that are
  learned (:class:`NormOrder`, ``p = 2 + tanh(s) / 2`` in (1.5, 2.5) as the paper's CIFAR-10 runs,
  ``s`` initialised to 0, i.e. the spectral norm at the start), estimated by the generalised power
  method (:func:`mixed_power_iteration`; Higham 1992, Johnston 2016's QETLAB), whose last step is
  differentiable so the orders get gradients. :func:`chain_orders` makes a branch's layers share
  orders, ``p_0 -> p_1 -> ... -> p_0`` (app. D eq. 17), so ``Lip(g) <= prod_l c_l`` in ``||.||_{p_0}``.
  The power method gives a lower estimate of the norm (exact for ``p = q = 2``, and where the
  iteration reaches the global maximum), as spectral normalisation does.

A residual branch ``g`` built only from layers of one norm and activations with ``|phi'| <= 1`` has
``Lip(g) <= prod_l c_l`` in that norm (sub-multiplicativity, app. D eq. 16-17); :func:`lipschitz_bound`
computes that product (for mixed norms only when the orders are chained).

Evaluation mode (and :func:`frozen_normalization`) runs no iteration: the norm is ``u^T W v`` with
the stored vectors, a deterministic function of the current ``W``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ShapeError

__all__ = [
    "NORMS",
    "LipschitzLinear",
    "LipschitzConv2d",
    "SpectralLinear",
    "SpectralConv2d",
    "frozen_normalization",
    "refresh_normalization",
    "RefreshOnEval",
    "power_iteration_buffers",
    "lipschitz_bound",
    "operator_matrix",
    "compute_lipschitz_exact",
    "NormOrder",
    "dual_vector",
    "mixed_power_iteration",
    "mixed_norm_step",
    "chain_orders",
    "orders_chained",
]

NORMS = ("spectral", "inf", "one", "mixed")
VECTOR_NORM_EPS = 1e-12  # floor of ||u||, ||v|| in power iteration (a zero weight gives sigma = 0)
DEFAULT_COEFF = 0.98  # Residual Flows (i-ResNet used 0.9)
DEFAULT_POWER_RTOL = 1e-4  # relative change of sigma that ends the adaptive power iteration
DEFAULT_POWER_ATOL = 1e-6  # absolute change of sigma that ends it
DEFAULT_MAX_POWER_ITER = 100  # cap per training step
INIT_MAX_POWER_ITER = 200  # cap when the vectors are first initialised (and in refresh_norm)
INIT_POWER_RTOL_EPS = 10.0  # initial convergence to this many machine epsilons (valid before training)
_POWER_INIT_SEED = 0x5EED  # u, v start from a fixed generator, so lazy init does not touch the global RNG


def _normalize(t: Tensor) -> Tensor:
    return t / t.norm().clamp_min(VECTOR_NORM_EPS)


class _LipschitzMixin:
    """Shared machinery: norm of the operator, soft normalisation, adaptive power iteration.

    Subclasses provide ``_matvec(W, v)`` (the layer without bias applied to ``v``), ``_rmatvec(W, u)``
    (its adjoint) and ``_inf_norm(W)`` / ``_one_norm(W)``.
    """

    weight: Tensor

    def _init_lipschitz(self, coeff: float, norm: str, n_power_iter: int, atol: float | None,
                        rtol: float | None, max_iter: int) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not (coeff > 0 and math.isfinite(coeff)):
            raise ValueError(f"coeff must be a positive finite number, got {coeff}")
        if n_power_iter < 1 or max_iter < n_power_iter:
            raise ValueError(f"need 1 <= n_power_iter <= max_iter, got {n_power_iter}, {max_iter}")
        self.coeff = float(coeff)
        self.norm = norm
        self.n_power_iter = int(n_power_iter)
        self.atol = atol
        self.rtol = rtol
        self.max_iter = int(max_iter)
        self._frozen = False
        self.stats: dict = {}
        self.register_buffer("sigma", torch.zeros((), dtype=self.weight.dtype))  # last norm estimate

    # ------------------------------------------------------------------ norm of the operator
    def _power_iteration(self, n_min: int, max_iter: int, atol: float | None, rtol: float | None) -> int:
        """Update ``u, v`` in place; return the number of iterations run."""
        adaptive = atol is not None or rtol is not None  # the stopping test reads the device each iteration
        with torch.no_grad():
            w = self.weight
            u, v = self.u, self.v
            prev = float(self.sigma) if adaptive else 0.0
            it = 0
            while it < max_iter:
                it += 1
                v = _normalize(self._rmatvec(w, u))
                wv = self._matvec(w, v)
                u = _normalize(wv)
                if not adaptive:
                    if it >= n_min:
                        break
                    continue
                sigma = float(wv.norm())
                if it >= n_min and abs(sigma - prev) <= (atol or 0.0) + (rtol or 0.0) * sigma:
                    break
                prev = sigma
            self.u.copy_(u)
            self.v.copy_(v)
        self.stats = {"power_iterations": float(it)}
        return it

    def operator_norm(self, update: bool = False) -> Tensor:
        """``||W||`` in the layer's norm (a scalar, differentiable with respect to ``W``)."""
        w = self.weight
        if self.norm == "spectral":
            if update:
                self._power_iteration(self.n_power_iter, self.max_iter, self.atol, self.rtol)
            # clones: later in-place updates of the buffers must not invalidate this graph
            sigma = (self.u.clone() * self._matvec(w, self.v.clone())).sum()
        elif self.norm == "inf":
            sigma = self._inf_norm(w)
        elif self.norm == "mixed":
            sigma = self._mixed_norm(update)
        else:
            sigma = self._one_norm(w)
        with torch.no_grad():
            self.sigma.copy_(sigma.detach())
        return sigma

    def normalized_weight(self, update: bool = False) -> Tensor:
        """``W / max(1, ||W|| / c)``; ``update`` runs the adaptive power iteration first."""
        scale = (self.operator_norm(update) / self.coeff).clamp_min(1.0)
        return self.weight / scale

    def _update_now(self) -> bool:
        return bool(self.training) and not self._frozen

    def lipschitz_bound(self) -> float:
        """``min(sigma, c)`` from the last norm estimate: the Lipschitz constant of the layer
        (``c`` for a convolution whose input size is not known yet)."""
        if self.norm == "spectral" and self.v.numel() == 0:
            return self.coeff
        return min(float(self.sigma), self.coeff)

    def refresh_norm(self, rtol: float | None = None, max_iter: int = INIT_MAX_POWER_ITER) -> None:
        """Converge the power iteration for the current weights (e.g. after loading or editing them);
        ``rtol`` defaults to a few machine epsilons of the weight's dtype."""
        if rtol is None:
            rtol = INIT_POWER_RTOL_EPS * torch.finfo(self.weight.dtype).eps
        if self.norm == "mixed":
            self._mixed_refresh(rtol, max_iter)
        if self.norm == "spectral" and self.v.numel() > 0:
            self._power_iteration(1, max_iter, 0.0, rtol)
        if self.norm != "spectral" or self.v.numel() > 0:
            with torch.no_grad():
                self.operator_norm(update=False)

    def extra_repr(self) -> str:  # shown by print(module)
        return f"{super().extra_repr()}, coeff={self.coeff}, norm={self.norm}"


class LipschitzLinear(_LipschitzMixin, nn.Linear):
    """``y = W_eff x + b`` with ``||W_eff|| <= coeff`` in the chosen norm (see module docstring).

    Args:
        in_features, out_features: as :class:`torch.nn.Linear`.
        coeff: the bound ``c`` (0.98 Residual Flows, 0.9 i-ResNet).
        norm: ``"spectral"``, ``"inf"`` or ``"one"``.
        n_power_iter: minimum power iterations per training-mode call (spectral).
        atol, rtol: adaptive stop on the change of ``sigma``; both None: exactly ``n_power_iter``.
        max_iter: cap on the iterations per call.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, coeff: float = DEFAULT_COEFF,
                 norm: str = "spectral", n_power_iter: int = 1, atol: float | None = DEFAULT_POWER_ATOL,
                 rtol: float | None = DEFAULT_POWER_RTOL, max_iter: int = DEFAULT_MAX_POWER_ITER,
                 domain: "NormOrder | float | None" = None, codomain: "NormOrder | float | None" = None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_lipschitz(coeff, norm, n_power_iter, atol, rtol, max_iter)
        if norm == "mixed":  # orders p (domain) and q (codomain): learned unless given as numbers
            self.domain = domain if isinstance(domain, NormOrder) else NormOrder(domain)
            self.codomain = codomain if isinstance(codomain, NormOrder) else NormOrder(codomain)
        elif domain is not None or codomain is not None:
            raise ValueError(f"domain / codomain norm orders need norm='mixed', got norm={norm!r}")
        gen = torch.Generator().manual_seed(_POWER_INIT_SEED)
        shape_u, shape_v = (out_features,), (in_features,)
        if norm == "mixed":
            shape_u = (0,)  # the mixed power method keeps only its domain vector
        elif norm != "spectral":  # no iteration: empty placeholders keep one state_dict layout
            shape_u = shape_v = (0,)
        self.register_buffer("u", _normalize(torch.randn(shape_u, generator=gen)).to(self.weight.dtype))
        self.register_buffer("v", _normalize(torch.randn(shape_v, generator=gen)).to(self.weight.dtype))
        self.refresh_norm()

    def _matvec(self, w: Tensor, v: Tensor) -> Tensor:
        return w @ v  # (out,)

    def _rmatvec(self, w: Tensor, u: Tensor) -> Tensor:
        return w.t() @ u  # (in,)

    @staticmethod
    def _inf_norm(w: Tensor) -> Tensor:
        return w.abs().sum(dim=1).amax()  # amax: max()'s backward reads the device

    @staticmethod
    def _one_norm(w: Tensor) -> Tensor:
        return w.abs().sum(dim=0).amax()  # amax: max()'s backward reads the device

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(self._update_now()), self.bias)


class LipschitzConv2d(_LipschitzMixin, nn.Conv2d):
    """``y = conv(x, W_eff) + b`` with the *operator* norm of the convolution at most ``coeff``.

    The spectral norm depends on the spatial input size: give ``input_shape=(H, W)`` (or
    ``(C, H, W)``), or leave it None and the first input fixes it (the power iteration is then run
    to convergence on that call). A later input of another size raises :class:`ShapeError`, since
    the norm would no longer be a bound. Zero padding, ``groups=1``, ``dilation=1``.

    Args: as :class:`LipschitzLinear`, plus ``kernel_size``, ``stride`` and ``padding``
    (default ``kernel_size // 2``, which keeps the size at stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int | None = None, bias: bool = True, coeff: float = DEFAULT_COEFF,
                 norm: str = "spectral", input_shape: Sequence[int] | None = None, n_power_iter: int = 1,
                 atol: float | None = DEFAULT_POWER_ATOL, rtol: float | None = DEFAULT_POWER_RTOL,
                 max_iter: int = DEFAULT_MAX_POWER_ITER):
        if not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size must be an int (square kernels), got {kernel_size!r}")
        padding = kernel_size // 2 if padding is None else int(padding)
        if norm == "mixed":
            raise ValueError("norm='mixed' (induced mixed norms) is implemented for LipschitzLinear only")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_lipschitz(coeff, norm, n_power_iter, atol, rtol, max_iter)
        # (1, C_in, H, W) / (1, C_out, H', W') once the input size is known
        self.register_buffer("u", torch.empty(0, dtype=self.weight.dtype))
        self.register_buffer("v", torch.empty(0, dtype=self.weight.dtype))
        if norm != "spectral":
            self.refresh_norm()
        elif input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(shape) == 3:
                if shape[0] != in_channels:
                    raise ShapeError(f"input_shape {shape} has {shape[0]} channels, expected {in_channels}")
                shape = shape[1:]
            if len(shape) != 2:
                raise ShapeError(f"input_shape must be (H, W) or (C, H, W), got {input_shape}")
            self._init_vectors(shape)

    # ------------------------------------------------------------------ operator and adjoint
    def _matvec(self, w: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v, w, None, self.stride, self.padding)  # (1, C_out, H', W')

    def _rmatvec(self, w: Tensor, u: Tensor) -> Tensor:
        h, wd = self.v.shape[-2:]
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        out_pad = (h - ((u.shape[-2] - 1) * sh - 2 * ph + kh), wd - ((u.shape[-1] - 1) * sw - 2 * pw + kw))
        return F.conv_transpose2d(u, w, None, self.stride, self.padding, out_pad)  # (1, C_in, H, W)

    @staticmethod
    def _inf_norm(w: Tensor) -> Tensor:
        return w.abs().sum(dim=(1, 2, 3)).amax()  # amax: max()'s backward reads the device

    @staticmethod
    def _one_norm(w: Tensor) -> Tensor:
        return w.abs().sum(dim=(0, 2, 3)).amax()  # amax: max()'s backward reads the device

    def _init_vectors(self, hw: Sequence[int]) -> None:
        gen = torch.Generator().manual_seed(_POWER_INIT_SEED)
        with torch.no_grad():
            v = torch.randn((1, self.in_channels, *hw), generator=gen).to(self.weight)
            u = self._matvec(self.weight.detach(), v)
            self.v = _normalize(v)
            self.u = _normalize(torch.randn(u.shape, generator=gen).to(self.weight))
        self.refresh_norm()

    @property
    def input_shape(self) -> tuple[int, int] | None:
        """The spatial size ``(H, W)`` the spectral norm is computed for (None until known)."""
        return tuple(self.v.shape[-2:]) if self.v.numel() > 0 else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("u", "v"):  # lazily sized buffers take the saved size
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, dtype=self.weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.norm == "spectral":
            if self.v.numel() == 0:
                self._init_vectors(x.shape[-2:])
            elif tuple(x.shape[-2:]) != self.input_shape:
                raise ShapeError(f"{type(self).__name__} is normalised for inputs of size {self.input_shape}, "
                                 f"got {tuple(x.shape[-2:])}; its operator norm differs at another size")
        return self._conv_forward(x, self.normalized_weight(self._update_now()), self.bias)


class SpectralLinear(LipschitzLinear):
    """:class:`LipschitzLinear` with the spectral norm (``norm="spectral"``)."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, norm="spectral", **kwargs)


class SpectralConv2d(LipschitzConv2d):
    """:class:`LipschitzConv2d` with the spectral norm of the convolution operator."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, norm="spectral", **kwargs)


# ----------------------------------------------------------------------------- module-level helpers
def _lipschitz_layers(module: nn.Module) -> Iterator[_LipschitzMixin]:
    return (m for m in module.modules() if isinstance(m, _LipschitzMixin))


@contextlib.contextmanager
def frozen_normalization(module: nn.Module) -> Iterator[None]:
    """Within the block, no normalised layer of ``module`` updates its power-iteration vectors, so
    repeated calls (fixed-point inverse, recomputation in backward) use the same weights."""
    layers = list(_lipschitz_layers(module))
    before = [layer._frozen for layer in layers]
    for layer in layers:
        layer._frozen = True
    try:
        yield
    finally:
        for layer, b in zip(layers, before):
            layer._frozen = b


def refresh_normalization(module: nn.Module, rtol: float | None = None,
                          max_iter: int = INIT_MAX_POWER_ITER) -> None:
    """Converge the norm estimate of every normalised layer of ``module`` for its current weights."""
    for layer in _lipschitz_layers(module):
        layer.refresh_norm(rtol, max_iter)


def power_iteration_buffers(module: nn.Module) -> set[str]:
    """State-dict names of the power-iteration vectors (``u``, ``v``) of every spectrally normalised
    layer of ``module``. They belong to one weight: an average of them is not a singular vector of
    the averaged weight (it is shorter, so ``u^T W v`` underestimates the norm), so weight averaging
    must copy them and re-converge (:func:`refresh_normalization`), never average them."""
    return {f"{name}.{b}" if name else b for name, m in module.named_modules()
            if isinstance(m, _LipschitzMixin) and m.norm in ("spectral", "mixed") for b in ("u", "v")}


class RefreshOnEval:
    """Mixin for an ``nn.Module`` holding normalised layers: ``eval()`` re-converges the power
    iteration of every normalised layer for the current weights (EMA averages and loaded weights
    come with vectors that belong to other weights; evaluation does not update them)."""

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            refresh_normalization(self)
        return self


def lipschitz_bound(module: nn.Module) -> float | None:
    """An upper bound of ``Lip(module)`` for a :class:`torch.nn.Sequential` (or a single layer) of
    normalised layers of *one* norm and activations with a ``lipschitz`` attribute; None when no
    bound can be certified (an unknown layer, or layers of different norms)."""
    children = list(module) if isinstance(module, nn.Sequential) else [module]
    bound, norms = 1.0, set()
    for child in children:
        if isinstance(child, _LipschitzMixin):
            bound *= child.lipschitz_bound()
            norms.add(child.norm)
        elif isinstance(child, nn.Sequential):
            sub = lipschitz_bound(child)
            if sub is None:
                return None
            bound *= sub
            norms.update(layer.norm for layer in _lipschitz_layers(child))
        elif isinstance(child, nn.Identity):
            continue
        elif isinstance(getattr(child, "lipschitz", None), (int, float)):
            bound *= float(child.lipschitz)
        else:
            return None
    if norms == {"mixed"} and not orders_chained(module):
        return None
    return bound if len(norms) <= 1 else None


def operator_matrix(layer: nn.Module, input_shape: Sequence[int] | None = None) -> Tensor:
    """The dense matrix of the (bias-free) normalised layer, ``(out_dim, in_dim)``, as currently
    used in evaluation mode. Convolutions are applied to every basis vector of the input of size
    ``input_shape`` ``(H, W)`` (default: the size the norm was computed for). For small sizes."""
    with torch.no_grad():
        w = layer.normalized_weight(update=False)
        if isinstance(layer, LipschitzLinear):
            return w.clone()
        if not isinstance(layer, LipschitzConv2d):
            raise TypeError(f"operator_matrix needs a LipschitzLinear or LipschitzConv2d, got {type(layer).__name__}")
        hw = tuple(input_shape) if input_shape is not None else layer.input_shape
        if hw is None:
            raise ShapeError("operator_matrix: give input_shape=(H, W) for a convolution without a known input size")
        d = layer.in_channels * hw[0] * hw[1]
        basis = torch.eye(d, dtype=w.dtype, device=w.device).reshape(d, layer.in_channels, *hw)  # (D, C, H, W)
        out = F.conv2d(basis, w, None, layer.stride, layer.padding)  # (D, C_out, H', W')
        return out.reshape(d, -1).t()  # (out_dim, in_dim)


def compute_lipschitz_exact(layer: nn.Module, input_shape: Sequence[int] | None = None,
                            norm: str | None = None) -> float:
    """The exact operator norm of the normalised layer (dense matrix; small layers only):
    largest singular value (``"spectral"``), largest absolute row sum (``"inf"``) or column sum
    (``"one"``). ``norm`` defaults to the layer's own norm."""
    m = operator_matrix(layer, input_shape).double()
    norm = norm or layer.norm
    if norm == "spectral":
        return float(torch.linalg.matrix_norm(m, ord=2))
    if norm == "inf":
        return float(m.abs().sum(dim=1).max())
    if norm == "one":
        return float(m.abs().sum(dim=0).max())
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ----------------------------------------------------------------------------- induced mixed norms
MIXED_ORDER_CENTRE, MIXED_ORDER_HALF_WIDTH = 2.0, 0.5  # p = 2 + tanh(s) / 2 in (1.5, 2.5) (002 app. D)
MIXED_STARTS = 8  # random starts of the mixed power method when its vector is (re)initialised
DUAL_EPS = 1e-30  # floor of ||y||_q in the dual vector (a zero vector stays zero)


class NormOrder(nn.Module):
    """A vector-norm order ``p`` for :class:`LipschitzLinear` with ``norm="mixed"``.

    Learned (``value=None``): ``p = 2 + tanh(s) / 2`` with a parameter ``s`` initialised to 0 (p = 2),
    the parameterisation of Chen et al. 2019, app. D (orders in (1.5, 2.5)). Fixed: ``value`` in
    ``(1, inf)`` as a buffer (``norm="one"`` / ``"inf"`` cover 1 and inf exactly). One instance may be shared by the codomain of one layer and the domain
    of the next (:func:`chain_orders`)."""

    def __init__(self, value: float | None = None):
        super().__init__()
        if value is None:
            self.raw = nn.Parameter(torch.zeros(()))
        else:
            if not (1.0 < float(value) < math.inf):  # p = 1 and inf have exact norms: "one", "inf"
                raise ValueError(f"a mixed-norm order must lie in (1, inf), got {value}")
            self.register_buffer("fixed", torch.tensor(float(value)))

    @property
    def learned(self) -> bool:
        return hasattr(self, "raw")

    def forward(self) -> Tensor:
        if self.learned:
            return MIXED_ORDER_CENTRE + MIXED_ORDER_HALF_WIDTH * torch.tanh(self.raw)
        return self.fixed

    def extra_repr(self) -> str:
        return "learned" if self.learned else f"p={float(self.fixed):g}"


def _pnorm(x: Tensor, p: Tensor) -> Tensor:
    """``||x||_p`` of a vector, scaled by its largest entry (no overflow / underflow of ``|x|^p``)."""
    m = x.detach().abs().max().clamp_min(DUAL_EPS)
    return m * ((x / m).abs().pow(p).sum()).pow(1.0 / p)


def dual_vector(y: Tensor, q: Tensor) -> Tensor:
    """``sign(y) |y|^(q-1) / ||y||_q^(q-1)``: the unit vector of the dual norm ``q* = q / (q - 1)`` with
    ``<dual, y> = ||y||_q`` (for ``q = 2``: ``y / ||y||_2``). Scaled by ``max |y|``."""
    m = y.detach().abs().max().clamp_min(DUAL_EPS)
    t = y / m
    return torch.sign(t) * t.abs().pow(q - 1.0) / _pnorm(t, q).clamp_min(DUAL_EPS).pow(q - 1.0)


def mixed_norm_step(matvec, rmatvec, v: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the generalised power method for ``||A||_{p->q}`` from ``v`` (``||v||_p = 1``):
    ``y = A v``, ``x = dual_{p*}(A^T dual_q(y))`` (``||x||_p = 1``), estimate ``||A x||_q``. Returns
    ``(x, ||A x||_q)``; differentiable in ``A``, ``p`` and ``q`` when they carry gradients."""
    y = matvec(v)
    z = rmatvec(dual_vector(y, q))
    p_star = p / (p - 1.0)
    x = dual_vector(z, p_star)
    return x, _pnorm(matvec(x), q)


def mixed_power_iteration(matvec, rmatvec, v: Tensor, p: Tensor, q: Tensor, *, n_min: int = 1,
                          max_iter: int = DEFAULT_MAX_POWER_ITER, atol: float | None = DEFAULT_POWER_ATOL,
                          rtol: float | None = DEFAULT_POWER_RTOL) -> tuple[Tensor, float | Tensor, int]:
    """Iterate :func:`mixed_norm_step` without gradients until the estimate changes by at most
    ``atol + rtol * sigma`` (at least ``n_min`` steps, at most ``max_iter``); ``(v, sigma, steps)``.
    With ``atol = rtol = None``: exactly ``n_min`` steps and ``sigma`` a 0-d tensor (no device read).
    The estimate never decreases (the step maximises a convex function's linearisation)."""
    with torch.no_grad():
        p, q = p.detach(), q.detach()
        v = v / _pnorm(v, p).clamp_min(DUAL_EPS)
        adaptive = atol is not None or rtol is not None
        prev, sigma, it = -math.inf, 0.0, 0
        while it < max_iter:
            it += 1
            v, s = mixed_norm_step(matvec, rmatvec, v, p, q)
            if not adaptive:  # a fixed number of steps: no device read (the estimate stays a tensor)
                if it >= n_min:
                    sigma = s
                    break
                continue
            sigma = float(s)
            if it >= n_min and abs(sigma - prev) <= (atol or 0.0) + (rtol or 0.0) * sigma:
                break
            prev = sigma
    return v, sigma, it


def _mixed_norm(self, update: bool) -> Tensor:
    """``||W||_{p->q}`` of a mixed-norm layer: the iteration (training mode, not frozen) without
    gradients, then one differentiable step from the stored vector (gradients to W, p and q)."""
    w = self.weight
    p, q = self.domain(), self.codomain()
    if update:
        v, _, it = mixed_power_iteration(lambda t: w.detach() @ t, lambda t: w.detach().t() @ t, self.v, p, q,
                                         n_min=self.n_power_iter, max_iter=self.max_iter, atol=self.atol,
                                         rtol=self.rtol)
        with torch.no_grad():
            self.v.copy_(v)
        self.stats = {"power_iterations": float(it)}
    _, sigma = mixed_norm_step(lambda t: w @ t, lambda t: w.t() @ t, self.v.clone(), p, q)
    return sigma


def _mixed_refresh(self, rtol: float, max_iter: int) -> None:
    """Converge the mixed power method for the current weights and orders from the stored vector and
    :data:`MIXED_STARTS` random ones (a fixed generator); keep the vector of the largest estimate."""
    w = self.weight.detach()
    p, q = self.domain().detach(), self.codomain().detach()
    gen = torch.Generator().manual_seed(_POWER_INIT_SEED + 1)
    starts = [self.v.detach()] + [torch.randn(self.v.shape, generator=gen).to(w) for _ in range(MIXED_STARTS)]
    best_v, best = None, -math.inf
    for v0 in starts:
        v, sigma, _ = mixed_power_iteration(lambda t: w @ t, lambda t: w.t() @ t, v0, p, q, max_iter=max_iter,
                                            atol=0.0, rtol=rtol)
        if sigma > best:
            best_v, best = v, sigma
    with torch.no_grad():
        self.v.copy_(best_v)


_LipschitzMixin._mixed_norm = _mixed_norm
_LipschitzMixin._mixed_refresh = _mixed_refresh


def chain_orders(branch: nn.Module) -> nn.Module:
    """Share the norm orders of the mixed-norm layers of ``branch`` (in order) as app. D eq. 17 needs:
    layer ``l``'s codomain is layer ``l+1``'s domain, the last layer's codomain the first's domain,
    so ``||J_g||_{p_0} <= prod_l ||W_l||_{p_l -> p_{l+1}}``. In place; returns ``branch``."""
    layers = [m for m in branch.modules() if isinstance(m, _LipschitzMixin) and m.norm == "mixed"]
    for a, b in zip(layers, layers[1:] + layers[:1]):
        a.codomain = b.domain
    for layer in layers:
        layer.refresh_norm()
    return branch


def orders_chained(branch: nn.Module) -> bool:
    """True when the mixed-norm layers of ``branch`` form the closed chain of :func:`chain_orders`."""
    layers = [m for m in branch.modules() if isinstance(m, _LipschitzMixin) and m.norm == "mixed"]
    return all(a.codomain is b.domain for a, b in zip(layers, layers[1:] + layers[:1]))
