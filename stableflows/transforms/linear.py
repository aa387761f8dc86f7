"""Invertible channel mixing on dim 1: learned (Glow's invertible 1x1 convolution) and fixed permutations.

For vectors ``(B, C)`` :class:`Invertible1x1` is an invertible linear layer ``z = W x``; for images
``(B, C, H, W)`` it applies the same ``W`` at every pixel (Kingma & Dhariwal 2018, sec. 3.2)::

    log|det| = H * W * log|det W|

LU form (Glow, sec. 3.2): ``W = P L (U + diag(sign * exp(log_s)))`` with ``P`` a fixed permutation,
``L`` unit lower triangular, ``U`` strictly upper triangular; then ``log|det W| = sum(log_s)`` in
O(C) and the inverse is two triangular solves.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Transform, check_shape
from .reshape import as_event_shape

__all__ = ["Invertible1x1", "Permutation", "PERMUTATIONS"]

PERMUTATIONS = ("reverse", "shuffle")


def _to_rows(x: Tensor) -> Tensor:
    """``(B, C)`` or ``(B, C, H, W)`` -> ``(N, C)`` with one row per vector / pixel."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 2:
        return rows
    b, c, h, w = like.shape
    return rows.reshape(b, h, w, c).movedim(-1, 1)  # (B, C, H, W)


class Invertible1x1(Transform):
    """``z = W x`` on dim 1 of ``(B, C)`` / ``(B, C, H, W)``, ``W`` initialised as a random orthogonal
    matrix (drawn from torch's global RNG). ``lu=True``: LU parameterisation with triangular-solve
    inverse; ``lu=False``: a plain matrix, ``slogdet`` log-det and ``linalg.solve`` inverse.
    """

    def __init__(self, shape, *, lu: bool = True):
        super().__init__()
        self.shape = as_event_shape(shape, "Invertible1x1")
        c = self.shape[0]
        self.lu = bool(lu)
        self._positions = math.prod(self.shape[1:])  # H * W (1 for vectors)
        w0 = torch.linalg.qr(torch.randn(c, c))[0]  # random orthogonal (C, C)
        if self.lu:
            p, lower, upper = torch.linalg.lu(w0)
            s = upper.diagonal()
            self.register_buffer("perm", p)  # fixed; saved, it is random
            self.register_buffer("sign_s", torch.sign(s))
            self.lower = nn.Parameter(lower.tril(-1))
            self.upper = nn.Parameter(upper.triu(1))
            self.log_s = nn.Parameter(s.abs().log())
        else:
            self.weight = nn.Parameter(w0)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """``(L, U)`` with unit diagonal ``L`` and ``U`` carrying ``sign * exp(log_s)``."""
        eye = torch.eye(self.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight_matrix(self) -> Tensor:
        """The ``(C, C)`` matrix ``W``."""
        if not self.lu:
            return self.weight
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (a scalar)."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def _logdet(self, x: Tensor) -> Tensor:
        return (self._positions * self.log_abs_det()).expand(x.shape[0])

    def _check_event(self, x, direction, what):
        check_shape(x, self.shape, what)

    def _forward(self, x):
        rows = _to_rows(x) @ self.weight_matrix().T  # (N, C): z_n = W x_n
        return _from_rows(rows, x), self._logdet(x)

    def _inverse(self, z):
        rows = _to_rows(z)  # (N, C); solve x_n W^T = z_n for every row
        if self.lu:
            # x U^T L^T P^T = z  <=>  (x U^T) L^T = z P  (P orthogonal)
            lower, upper = self._factors()
            y = torch.linalg.solve_triangular(lower.T, rows @ self.perm, upper=True, left=False, unitriangular=True)
            x = torch.linalg.solve_triangular(upper.T, y, upper=False, left=False)
        else:
            x = torch.linalg.solve(self.weight.T, rows, left=False)
        return _from_rows(x, z), -self._logdet(z)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, lu={self.lu}"


class Permutation(Transform):
    """A fixed permutation of dim 1 (RealNVP's channel reversal or a seeded shuffle); log-det 0."""

    def __init__(self, shape, *, kind: str = "reverse", seed: int = 0):
        super().__init__()
        self.shape = as_event_shape(shape, "Permutation")
        c = self.shape[0]
        if kind == "reverse":
            perm = torch.arange(c - 1, -1, -1)
        elif kind == "shuffle":
            perm = torch.randperm(c, generator=torch.Generator().manual_seed(int(seed)))
        else:
            raise ValueError(f"unknown permutation kind {kind!r}; known kinds: {', '.join(PERMUTATIONS)}")
        self.kind = kind
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _check_event(self, x, direction, what):
        check_shape(x, self.shape, what)

    def _forward(self, x):
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def _inverse(self, z):
        return z.index_select(1, self.inv_perm), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, kind={self.kind!r}"
