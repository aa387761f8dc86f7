"""Graying as paper 004 does it (sec. 5, Fig. 6b): integer images pulled towards the mid level of
their range, then dequantised with the full noise. Reference: the formula written out on a
hand-made image, and bits/dim through :func:`stableflows.metrics.bits_per_dim` with the same noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stableflows.metrics import bits_per_dim
from stableflows.models import glow
from stableflows.ood.probes import fixed_dequantize, gray_levels, graying_curve

L = 17


def test_gray_levels_on_a_hand_made_image():
    x = torch.tensor([[[[0.0, 16.0], [8.0, 3.0]]]])
    # m = 8: 8 + 0.5 (x - 8) = 4, 12, 8, 5.5 -> round half to even: 4, 12, 8, 6
    assert gray_levels(x, L, 0.5).flatten().tolist() == [4.0, 12.0, 8.0, 6.0]
    assert gray_levels(x, L, 1.0).flatten().tolist() == x.flatten().tolist()
    assert gray_levels(x, L, 0.0).flatten().tolist() == [8.0] * 4  # the constant mid-level image
    assert gray_levels(torch.full((1, 1, 2, 2), 255.0), 256, 0.0).unique().tolist() == [128.0]  # 127.5 -> 128
    with pytest.raises(ValueError, match="integer"):
        gray_levels(x / L, L, 0.5)  # dequantised inputs are refused


def test_graying_curve_scores_grayed_images_with_the_full_dequantisation_noise():
    torch.manual_seed(0)
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=1, hidden=4).double().eval()
    x = torch.randint(0, L, (10, 1, 8, 8), generator=torch.Generator().manual_seed(1)).double()
    factors = (1.0, 0.5, 0.0)
    out = graying_curve(flow, {"test": x}, L, factors=factors)
    assert out["factors"] == list(factors) and set(out) == {"factors", "test"}
    # the fixed test-time noise (float32 draws of a generator seeded 0, as fixed_dequantize documents)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    for a, mean in zip(factors, out["test"]["mean"]):
        xa = torch.round(8.0 + a * (x - 8.0))
        with torch.no_grad():
            ref = bits_per_dim(flow, xa, levels=L, u=u)  # the metric of docs/METRICS.md with that noise
        assert mean == pytest.approx(float(ref.mean()), rel=1e-9)
    v0 = fixed_dequantize(gray_levels(x, L, 0.0), L)
    span = (v0 * L - 8.0).numpy()
    assert span.min() >= 0.0 and span.max() < 1.0 and np.ptp(span) > 0.9  # full-width noise at a = 0
