"""Reshaping layers and event-shape helpers.

:class:`Squeeze` is RealNVP's / Glow's space-to-depth operation (Dinh et al. 2017, sec. 3.6;
Kingma & Dhariwal 2018, sec. 3): every ``f x f`` spatial block becomes ``f * f`` channels. It is a
permutation of the entries, so its log-det is 0.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F

from .base import ShapeError, Transform

__all__ = ["Squeeze", "as_event_shape"]


def as_event_shape(shape: Sequence[int], layer: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints, either ``(D,)`` (vectors) or ``(C, H, W)`` (images)."""
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ShapeError(f"{layer}: event shape must be a sequence of ints, got {shape!r}") from e
    if len(out) not in (1, 3) or min(out) < 1:
        raise ShapeError(f"{layer}: event shape must be (D,) or (C, H, W) with positive sizes, got {shape!r}")
    return out


class Squeeze(Transform):
    """``(B, C, H, W) -> (B, C f^2, H / f, W / f)``; channel ``c f^2 + i f + j`` of the output holds
    entry ``(i, j)`` of each ``f x f`` block of input channel ``c`` (``pixel_unshuffle`` order).
    The inverse unsqueezes. Raises :class:`ShapeError` when H or W is not divisible by ``f``.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"Squeeze factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)

    def _check_event(self, x, direction, what):
        f = self.factor
        if direction == "forward":
            if x.dim() != 4:
                raise ShapeError(f"Squeeze needs images (B, C, H, W), got shape {tuple(x.shape)}")
            if x.shape[2] % f or x.shape[3] % f:
                raise ShapeError(f"Squeeze({f}): height and width must be divisible by {f}, got {tuple(x.shape)}")
        else:
            if x.dim() != 4:
                raise ShapeError(f"Squeeze inverse needs images (B, C, H, W), got shape {tuple(x.shape)}")
            if x.shape[1] % (f * f):
                raise ShapeError(f"Squeeze({f}) inverse: channels must be divisible by {f * f}, got {tuple(x.shape)}")

    def _forward(self, x):
        f = self.factor
        return F.pixel_unshuffle(x, f), x.new_zeros(x.shape[0])  # (B, C f^2, H/f, W/f)

    def _inverse(self, z):
        f = self.factor
        return F.pixel_shuffle(z, f), z.new_zeros(z.shape[0])  # (B, C / f^2, H f, W f)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
