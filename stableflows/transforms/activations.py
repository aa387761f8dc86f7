"""Activations with Lipschitz constant at most 1, for the residual branch ``g`` of i-ResNets.

``Lip(g) <= prod ||W_l||`` needs ``|phi'(z)| <= 1`` for every activation (Chen et al. 2019,
app. D eq. 16). Each class carries ``lipschitz = 1.0``, which :func:`lipschitz_bound` reads.

* :class:`LipSwish` (Chen et al. 2019, sec. 3.3, eq. 10): ``phi(z) = z * sigmoid(beta z) / 1.1``,
  ``beta = softplus(beta_raw)`` learnable; ``max_t d/dt [t sigmoid(t)] ~= 1.0998 < 1.1`` for every
  ``beta``, and ``phi''`` does not vanish where ``|phi'|`` is near 1 (no derivative saturation).
* :class:`ELU` (alpha = 1): ``phi' = 1`` for ``z > 0``, ``exp(z)`` below (i-ResNet's choice).
* :class:`Softplus`: ``log(1 + exp(beta z)) / beta``, ``phi' = sigmoid(beta z)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LipSwish", "ELU", "Softplus", "ACTIVATIONS", "make_activation"]

SWISH_LIPSCHITZ_DIVISOR = 1.1  # max |d/dz z sigmoid(z)| = 1.0998... (paper eq. 10)


class LipSwish(nn.Module):
    """``z * sigmoid(beta z) / 1.1`` with learnable ``beta = softplus(beta_raw) > 0``."""

    lipschitz = 1.0

    def __init__(self, beta: float = 1.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"LipSwish beta must be positive, got {beta}")
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.expm1(beta))))  # softplus^-1(beta)

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.beta_raw)

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.beta * x).sigmoid() / SWISH_LIPSCHITZ_DIVISOR


class ELU(nn.Module):
    """ELU with ``alpha = 1`` (Lipschitz 1)."""

    lipschitz = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)


class Softplus(nn.Module):
    """``log(1 + exp(beta z)) / beta`` (Lipschitz 1 for every ``beta > 0``)."""

    lipschitz = 1.0

    def __init__(self, beta: float = 1.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"Softplus beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, beta=self.beta)


ACTIVATIONS = {"lipswish": LipSwish, "elu": ELU, "softplus": Softplus}


def make_activation(name: str) -> nn.Module:
    """A new activation module by name (``lipswish``, ``elu``, ``softplus``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None

