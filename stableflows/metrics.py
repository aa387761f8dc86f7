"""Metrics defined once (docs/METRICS.md).

bits/dim on discrete data with ``L`` levels: ``v = (x + u) / L``, ``u ~ U[0,1)^D``,
``bpd = -(log p(v) - D ln L) / (D ln 2)``. A uniform model scores ``log2 L``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .transforms.base import InputOutsideDomain, check_finite

__all__ = ["dequantize", "bits_per_dim", "nats_to_bpd", "check_levels"]


def check_levels(x: Tensor, levels: int, what: str = "data") -> None:
    """Discrete data must hold integer values in ``[0, levels - 1]``."""
    check_finite(x, what)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > levels - 1:
        raise InputOutsideDomain(f"{what} must lie in [0, {levels - 1}] (levels={levels}), found [{lo}, {hi}]")
    if not bool(torch.all(x == torch.round(x))):
        raise InputOutsideDomain(f"{what} must hold integer levels, found non-integer values")


def dequantize(x: Tensor, levels: int, u: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``(x + u) / L`` with ``u ~ U[0,1)`` (drawn from ``generator`` unless given)."""
    if u is None:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device if generator is None else generator.device).to(x.device)
    return (x + u) / levels


def nats_to_bpd(log_prob_v: Tensor, dim: int, levels: int) -> Tensor:
    """bits/dim of discrete data from ``log p(v)`` of the dequantised data (per example)."""
    return -(log_prob_v - dim * math.log(levels)) / (dim * math.log(2.0))


def bits_per_dim(flow, x: Tensor, levels: int, u: Tensor | None = None, seed: int | None = 0) -> Tensor:
    """Per-example bits/dim of integer data ``x`` under ``flow``.

    The dequantisation noise is ``u`` if given, else drawn with ``seed`` (the fixed test-time
    noise of docs/METRICS.md; ``seed=None`` draws from the global RNG).
    """
    check_levels(x, levels)
    gen = None
    if u is None and seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    v = dequantize(x, levels, u)
    lp = flow.log_prob(v)
    return nats_to_bpd(lp, v[0].numel(), levels)
