"""Activation normalisation (Glow, Kingma & Dhariwal 2018, sec. 3.1).

    y = (x + b) * exp(logs)        per channel (dim 1),   log|det| = H * W * sum(logs)

``b`` and ``logs`` are initialised from the first training batch so that the output has zero mean
and unit variance per channel (data-dependent initialisation), then trained as ordinary parameters.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import Transform, check_shape
from .reshape import as_event_shape

__all__ = ["ActNorm", "ACTNORM_INIT_EPS"]

ACTNORM_INIT_EPS = 1e-6
"""Added to the per-channel standard deviation at initialisation (Glow): ``logs = -log(std + eps)``.
A constant channel in the first batch therefore gets ``logs = -log(eps) ~ 13.8``."""


class ActNorm(Transform):
    """Per-channel affine map with data-dependent initialisation, for ``(B, C)`` or ``(B, C, H, W)``.

    The first ``forward`` call in training mode sets ``b = -mean`` and ``logs = -log(std + eps)``
    over batch and spatial positions, and flips the buffer ``initialized`` (saved in the
    ``state_dict``, so a loaded model is not re-initialised). The flag is read from the device once
    (the first training call after construction or loading); afterwards its host copy decides. Under ``torch.distributed`` the
    statistics are pooled over all ranks, so every rank gets the same initialisation.
    """

    def __init__(self, shape):
        super().__init__()
        self.shape = as_event_shape(shape, "ActNorm")
        c = self.shape[0]
        self.bias = nn.Parameter(torch.zeros(c))
        self.logs = nn.Parameter(torch.zeros(c))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # host copy of a True ``initialized``: no device read per step
        self._positions = math.prod(self.shape[1:])  # H * W (1 for vectors)

    def _view(self, p: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (len(self.shape) - 1)))  # (1, C) or (1, C, 1, 1)

    def _logdet(self, x: Tensor) -> Tensor:
        return (self._positions * self.logs.sum()).expand(x.shape[0]).to(x.dtype)

    def _check_event(self, x, direction, what):
        check_shape(x, self.shape, what)

    def _forward(self, x):
        if self.training and not self._known_initialized:
            if not bool(self.initialized):  # read once per model: later steps know it on the host
                self.initialize(x)
            self._known_initialized = True
        return (x + self._view(self.bias)) * self._view(self.logs).exp(), self._logdet(x)

    def _inverse(self, z):
        return z * self._view(-self.logs).exp() - self._view(self.bias), -self._logdet(z)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``b``, ``logs`` so that ``self(x)`` has zero mean and unit variance per channel."""
        mean, var = _channel_moments(x)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(var.sqrt() + ACTNORM_INIT_EPS))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded flag is read again on the next training call

    def extra_repr(self) -> str:
        return f"shape={self.shape}, initialized={bool(self.initialized)}"


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of ``x`` over batch and spatial dims, pooled over all
    ranks when ``torch.distributed`` is initialised (exact pooling: counts, means, squared deviations)."""
    dims = [0, *range(2, x.dim())]
    n = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    mean = x.mean(dim=dims)  # (C,)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mean, (x - _bcast(mean, x)).pow(2).mean(dim=dims)
    total = n.clone()
    dist.all_reduce(total)
    gmean = mean * n
    dist.all_reduce(gmean)
    gmean = gmean / total
    m2 = (x - _bcast(gmean, x)).pow(2).sum(dim=dims)  # squared deviations from the pooled mean
    dist.all_reduce(m2)
    return gmean, m2 / total


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))
