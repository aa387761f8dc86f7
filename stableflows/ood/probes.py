"""Probe inputs of Nalisnick et al. (2019, paper 004): constant and random images (App. D) and
graying (Fig. 6b, sec. 5).

* constant images: every entry at level ``l`` (``l = 0..L-1``), dequantised with the fixed noise;
  flows typically give them the *highest* likelihood of all.
* random images: uniform levels with uniform dequantisation, i.e. ``U[0, 1)`` per entry.
* graying: ``v_a = m + a (v - m)``, ``m`` the example's mean, for factors ``a`` from 1 (unchanged) to
  0 (a constant image); the second-order analysis predicts that shrinking the variance raises the
  likelihood (for a constant-volume flow, for every parameter setting).

All probes return model-space inputs; :func:`bpd_of` scores them with the docs/METRICS.md formula
``bpd = -(log p(v) - D ln L) / (D ln 2)`` (the dequantised value ``v`` taken as given).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.ood import ood_family
from ..metrics import nats_to_bpd
from .decompose import likelihood_terms

__all__ = ["GRAY_FACTORS", "constant_inputs", "random_inputs", "graying_curve", "bpd_of", "fixed_dequantize"]

GRAY_FACTORS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0)  # contrast kept: 1 = unchanged, 0 = constant
FIXED_NOISE_SEED = 0  # docs/METRICS.md: test bits/dim use u drawn with seed 0


def fixed_dequantize(x_int: Tensor, levels: int, seed: int = FIXED_NOISE_SEED) -> Tensor:
    """``(x + u) / L`` (float64) with ``u ~ U[0,1)`` drawn in float32 from a CPU generator seeded
    ``seed`` -- the same ``u`` as :func:`stableflows.train.evaluate.fixed_noise` and
    :func:`stableflows.metrics.bits_per_dim` on float32 splits, so the bits/dim agree with training."""
    u = torch.rand(x_int.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    return (x_int.double().cpu() + u) / levels


def bpd_of(flow: nn.Module, v: Tensor, levels: int, *, batch_size: int = 256) -> np.ndarray:
    """Per-example bits/dim of model-space inputs (NaN where the model refuses an input)."""
    t = likelihood_terms(flow, v, batch_size=batch_size)
    d = int(np.prod(v.shape[1:]))
    return nats_to_bpd(torch.from_numpy(t.log_px), d, levels).numpy()


def constant_inputs(shape: Sequence[int], levels: int) -> tuple[np.ndarray, Tensor]:
    """One constant image per level ``l = 0..L-1``, dequantised with the fixed noise: ``(levels, v)``."""
    lv = torch.arange(levels, dtype=torch.float64)
    x = lv.reshape(-1, *([1] * len(shape))).expand(levels, *shape).clone()
    return lv.numpy(), fixed_dequantize(x, levels)


def random_inputs(shape: Sequence[int], n: int, *, seed: int = 0) -> Tensor:
    """``n`` images with ``U[0, 1)`` entries (uniform levels, uniformly dequantised)."""
    ref = torch.zeros(1, *shape, dtype=torch.float64)
    return ood_family("uniform", ref, n, seed=seed)


def graying_curve(flow: nn.Module, sets: dict, levels: int, *, factors: Sequence[float] = GRAY_FACTORS) -> dict:
    """Mean bits/dim of each model-space set in ``sets`` (name -> ``(N, *shape)``) grayed by every
    factor: ``{"factors": [...], name: {"mean": [...], "median": [...], "nonfinite": [...]}}``."""
    out: dict = {"factors": [float(a) for a in factors]}
    for name, v in sets.items():
        rows = {"mean": [], "median": [], "nonfinite": []}
        for a in factors:
            b = bpd_of(flow, ood_family("grayed", v, v.shape[0], factor=float(a)), levels)
            fin = b[np.isfinite(b)]
            rows["mean"].append(float(fin.mean()) if fin.size else None)
            rows["median"].append(float(np.median(fin)) if fin.size else None)
            rows["nonfinite"].append(int(b.size - fin.size))
        out[name] = rows
    return out
