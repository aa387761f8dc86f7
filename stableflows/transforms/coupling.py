"""Coupling layers (NICE: Dinh et al. 2014; RealNVP: Dinh et al. 2017; Glow: Kingma & Dhariwal 2018).

The input is split by a mask into a kept part ``x_a`` and a transformed part ``x_b``::

    additive:  y_a = x_a,  y_b = x_b + t(x_a),                log|det| = 0
    affine:    y_a = x_a,  y_b = x_b * scale(s) + t,  (s, t) = net(x_a),
               log|det| = sum log scale(s)

The inverse recomputes ``net(y_a) = net(x_a)`` and solves the elementwise map for ``x_b``. Affine
coupling divides by ``scale(s)`` there, which is why the choice of scale parameterisation
(:mod:`.scales`) decides how stable the inverse is (Daniels, paper 003).

Masks (``parity`` flips which part is kept):

* ``"channel"``: the first ``n // 2`` channels (features, for vectors) vs the remaining
  ``n - n // 2``; parity 0 keeps the first part (Glow).
* ``"checkerboard"``: for images, spatial positions with ``(h + w + parity)`` even are kept
  (RealNVP); the CNN sees the input with the transformed positions zeroed. For vectors,
  alternating features: index ``i`` is kept when ``i + parity`` is even.

:class:`Coupling` is the template: it splits, runs the conditioner, merges and validates;
subclasses only write the elementwise map on the flat transformed entries ``(B, N_b)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ShapeError, Transform, check_shape, stats_wanted
from .nets import MLP, GlowCNN
from .reshape import as_event_shape
from .scales import Scale, make_scale

__all__ = ["Coupling", "AdditiveCoupling", "AffineCoupling", "MASKS"]

MASKS = ("channel", "checkerboard")


class Coupling(Transform):
    """Template of a coupling layer on event shape ``(D,)`` (MLP conditioner) or ``(C, H, W)``
    (:class:`GlowCNN` conditioner). Subclasses set ``n_params`` (conditioner outputs per transformed
    entry) and implement :meth:`_couple` / :meth:`_uncouple`.
    """

    n_params: int

    def __init__(self, shape, *, mask: str = "channel", parity: int = 0, hidden: int = 64):
        super().__init__()
        self.shape = as_event_shape(shape, type(self).__name__)
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; known masks: {', '.join(MASKS)}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.mask, self.parity = mask, int(parity)
        is_image = len(self.shape) == 3
        if is_image and mask == "checkerboard":
            c, h, w = self.shape
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            kept = ((hh + ww + self.parity) % 2 == 0).flatten()  # (H*W,)
            self._dim = 2  # index the flattened spatial positions of (B, C, H*W)
            self.register_buffer("board", kept.to(torch.get_default_dtype()).view(1, 1, h, w), persistent=False)
        else:
            n = self.shape[0]
            idx = torch.arange(n)
            kept = idx < n // 2 if mask == "channel" else (idx % 2 == 0)
            if self.parity == 1:
                kept = ~kept
            self._dim = 1  # index channels / features
        keep_idx, trans_idx = kept.nonzero().flatten(), (~kept).nonzero().flatten()
        if keep_idx.numel() == 0 or trans_idx.numel() == 0:
            raise ShapeError(f"{type(self).__name__}: the {mask} mask of event shape {self.shape} leaves one part empty")
        self.register_buffer("keep_idx", keep_idx, persistent=False)
        self.register_buffer("trans_idx", trans_idx, persistent=False)
        n_out = self.n_params * trans_idx.numel()
        if not is_image:
            self.net = MLP(keep_idx.numel(), n_out, hidden=hidden)
        elif mask == "channel":
            self.net = GlowCNN(keep_idx.numel(), n_out, hidden=hidden)
        else:
            self.net = GlowCNN(self.shape[0], self.n_params * self.shape[0], hidden=hidden)

    # -------------------------------------------------------------- split / merge
    def _params(self, x: Tensor) -> Tensor:
        """Conditioner outputs at the transformed entries, ``(B, n_params, N_b)``."""
        b = x.shape[0]
        if self._dim == 1:
            h = self.net(x.index_select(1, self.keep_idx))  # (B, P*D_b) or (B, P*C_b, H, W)
            return h.reshape(b, self.n_params, -1)
        c, hgt, wid = self.shape
        h = self.net(x * self.board)  # (B, P*C, H, W)
        h = h.reshape(b, self.n_params, c, hgt * wid).index_select(3, self.trans_idx)  # (B, P, C, N/2)
        return h.reshape(b, self.n_params, -1)

    def _take(self, x: Tensor) -> Tensor:
        """The transformed entries of ``x``, flat ``(B, N_b)``."""
        b = x.shape[0]
        if self._dim == 1:
            return x.index_select(1, self.trans_idx).reshape(b, -1)
        return x.reshape(b, self.shape[0], -1).index_select(2, self.trans_idx).reshape(b, -1)

    def _put(self, x: Tensor, yb: Tensor) -> Tensor:
        """``x`` with its transformed entries replaced by ``yb`` (B, N_b)."""
        b = x.shape[0]
        if self._dim == 1:
            return x.index_copy(1, self.trans_idx, yb.reshape(b, self.trans_idx.numel(), *self.shape[1:]))
        flat = x.reshape(b, self.shape[0], -1)  # (B, C, H*W)
        return flat.index_copy(2, self.trans_idx, yb.reshape(b, self.shape[0], -1)).reshape(x.shape)

    def _check_event(self, x, direction, what):
        check_shape(x, self.shape, what)

    def _forward(self, x):
        yb, logdet = self._couple(self._take(x), self._params(x))
        return self._put(x, yb), logdet

    def _inverse(self, z):
        xb, logdet = self._uncouple(self._take(z), self._params(z))
        return self._put(z, xb), logdet

    # -------------------------------------------------------------- elementwise map
    def _couple(self, xb: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(x_b (B, N_b), params (B, P, N_b)) -> (y_b, log|det| (B,))``."""
        raise NotImplementedError

    def _uncouple(self, yb: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"shape={self.shape}, mask={self.mask!r}, parity={self.parity}"


def _absmax(t: Tensor) -> Tensor:
    return t.detach().abs().max()


class AdditiveCoupling(Coupling):
    """``y_b = x_b + t(x_a)`` (NICE), volume preserving: log-det 0. Globally bi-Lipschitz whenever
    ``t`` is Lipschitz. ``stats`` (when asked): ``max_abs_shift``."""

    n_params = 1

    def _couple(self, xb, params):
        t = params[:, 0]
        if stats_wanted():
            self.stats = {"max_abs_shift": _absmax(t)}
        return xb + t, xb.new_zeros(xb.shape[0])

    def _uncouple(self, yb, params):
        t = params[:, 0]
        if stats_wanted():
            self.stats = {"max_abs_shift": _absmax(t)}
        return yb - t, yb.new_zeros(yb.shape[0])


class AffineCoupling(Coupling):
    """``y_b = x_b * scale(s) + t``, ``(t, s) = net(x_a)``; log-det ``sum log scale(s)``.

    ``scale`` is a name of :data:`~stableflows.transforms.scales.SCALES` (built with
    ``scale_kwargs``) or a :class:`~stableflows.transforms.scales.Scale` instance. ``stats`` (when asked):
    ``min_scale``, ``max_scale``, ``max_abs_shift`` of the last call.
    """

    n_params = 2

    def __init__(self, shape, *, mask: str = "channel", parity: int = 0, hidden: int = 64,
                 scale: str | Scale = "sigmoid", scale_kwargs: dict | None = None):
        super().__init__(shape, mask=mask, parity=parity, hidden=hidden)
        if isinstance(scale, Scale):
            if scale_kwargs:
                raise ValueError("scale_kwargs are only used with a scale given by name")
            self.scale = scale
        else:
            self.scale = make_scale(scale, **(scale_kwargs or {}))

    def _scale_shift(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, raw = params[:, 0], params[:, 1]  # (B, N_b) each
        scale, log_scale = self.scale(raw)
        if stats_wanted():  # 0-d tensors, read by whoever asked (base.py: diagnostics only when asked)
            with torch.no_grad():
                self.stats = {"min_scale": scale.min(), "max_scale": scale.max(), "max_abs_shift": _absmax(t)}
        return scale, log_scale, t

    def _couple(self, xb, params):
        scale, log_scale, t = self._scale_shift(params)
        return xb * scale + t, log_scale.sum(dim=1)

    def _uncouple(self, yb, params):
        scale, log_scale, t = self._scale_shift(params)
        return (yb - t) / scale, -log_scale.sum(dim=1)
