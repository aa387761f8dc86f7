"""Probe inputs of Nalisnick et al. (2019, paper 004): constant and random images (App. D) and
graying (Fig. 6b, sec. 5).

* constant images: every entry at level ``l`` (``l = 0..L-1``), dequantised with the fixed noise;
  flows typically give them the *highest* likelihood of all.
* random images: uniform levels with uniform dequantisation, i.e. ``U[0, 1)`` per entry.
* graying (004 sec. 5, Fig. 6b: "making the pixel values closer to 128"): the *integer* image is
  pulled towards the mid level of its range, ``x_a = round(m + a (x - m))``, ``m = (L - 1) / 2``
  (127.5 of 0..255, 8 of digits' 0..16), for factors ``a`` from 1 (unchanged) to 0 (the constant
  mid-level image), and then dequantised with the full fixed noise ``(x_a + u) / L`` -- so a grayed
  image is again an image of the data's format, scored with the same bits/dim as the data.
  (Graying the dequantised ``v`` towards each example's own mean would also shrink the noise ``u``
  and, at ``a = 0``, put all mass on one point.) The second-order analysis predicts that shrinking
  the variance raises the likelihood (for a constant-volume flow, for every parameter setting).

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

__all__ = ["GRAY_FACTORS", "constant_inputs", "random_inputs", "graying_curve", "gray_levels", "bpd_of",
           "fixed_dequantize"]

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


def gray_levels(x_int: Tensor, levels: int, factor: float) -> Tensor:
    """``round(m + factor (x - m))``, ``m = (L - 1) / 2``: integer images grayed towards the mid level."""
    if not 0.0 <= float(factor) <= 1.0:
        raise ValueError(f"graying factor must lie in [0, 1] (1 keeps the image), got {factor}")
    x = x_int.double().cpu()
    if bool((x != torch.round(x)).any()) or float(x.min()) < 0 or float(x.max()) > levels - 1:
        raise ValueError(f"graying needs integer images with levels 0..{levels - 1} (not dequantised inputs)")
    m = (levels - 1) / 2.0
    return torch.round(m + float(factor) * (x - m)).clamp(0, levels - 1)


def graying_curve(flow: nn.Module, sets: dict, levels: int, *, factors: Sequence[float] = GRAY_FACTORS,
                  seed: int = FIXED_NOISE_SEED) -> dict:
    """Mean bits/dim of each set of *integer* images in ``sets`` (name -> ``(N, *shape)`` levels
    ``0..L-1``) grayed towards the mid level by every factor and dequantised with the fixed noise of
    ``seed``: ``{"factors": [...], name: {"mean": [...], "median": [...], "nonfinite": [...]}}``."""
    out: dict = {"factors": [float(a) for a in factors]}
    for name, x in sets.items():
        rows = {"mean": [], "median": [], "nonfinite": []}
        for a in factors:
            b = bpd_of(flow, fixed_dequantize(gray_levels(x, levels, a), levels, seed), levels)
            fin = b[np.isfinite(b)]
            rows["mean"].append(float(fin.mean()) if fin.size else None)
            rows["median"].append(float(np.median(fin)) if fin.size else None)
            rows["nonfinite"].append(int(b.size - fin.size))
        out[name] = rows
    return out
