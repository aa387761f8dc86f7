"""Second-order analysis (paper 004 sec. 5): exact for an affine constant-volume Glow, right sign on
Gaussian data sets with equal means and different variances, paper Eq. 6 from the kernels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.functional import pixel_unshuffle

from stableflows.models import cv_glow
from stableflows.ood.second_order import curvature, paper_eq6, second_moments, second_order_prediction
from stableflows.transforms.coupling import AdditiveCoupling
from stableflows.transforms.linear import Invertible1x1
from stableflows.transforms.multiscale import MultiScale

SHAPE = (1, 8, 8)
D = 64
MEAN = 0.5


def _cv(seed: int, *, nonlinear: bool):
    torch.manual_seed(seed)
    f = cv_glow(shape=SHAPE, levels=2, steps_per_level=2, hidden=8).double()
    f.train()
    f.transform(MEAN + 0.2 * torch.randn(64, *SHAPE, dtype=torch.float64))  # ActNorm initialisation
    if nonlinear:  # non-zero shift networks: F is no longer affine
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for m in f.modules():
                if isinstance(m, AdditiveCoupling):
                    for p in m.parameters():
                        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return f.eval()


def _gauss(n, std, seed):
    g = torch.Generator().manual_seed(seed)
    return MEAN + std * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)


def test_second_moments():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    x0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # deviations (0, 1) and (2, -1): S = [[0 + 4, 0 - 2], [0 - 2, 1 + 1]] / 2
    assert torch.allclose(second_moments(x, x0), torch.tensor([[2.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))


def test_eq4_is_exact_for_an_affine_cv_glow():
    """Zero shift networks make F affine and log p quadratic: the expansion is an identity."""
    f = _cv(0, nonlinear=False)
    xp, xq = _gauss(300, 0.3, 1), _gauss(300, 0.15, 2) + 0.02  # slightly different means too
    r = second_order_prediction(f, xp, xq)
    # measured independently: log p = -||F(x)||^2 / 2 - D/2 log 2 pi + logdet, averaged
    with torch.no_grad():
        def mean_lp(x):
            z, ld = f(x)
            return float((-0.5 * z.pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi) + ld).mean())
        measured = mean_lp(xq) - mean_lp(xp)
    assert r["measured"] == pytest.approx(measured, abs=1e-9)
    assert r["eq4"] == pytest.approx(measured, abs=1e-8)
    # H = -J^T J exactly: the diagonal Hessian and Gauss-Newton predictions coincide
    assert r["eq5_diag"] == pytest.approx(r["gauss_newton_diag"], abs=1e-8)
    assert r["measured"] > 0  # q sits inside p


@pytest.mark.parametrize("seed,std_p,std_q", [(3, 0.3, 0.1), (4, 0.1, 0.3), (5, 0.25, 0.2)])
def test_sign_on_gaussians_with_equal_means(seed, std_p, std_q):
    """Nonlinear CV-Glow; p and q share the mean and differ in variance: the prediction has the sign
    of the measured gap, and the smaller-variance set gets the higher likelihood."""
    f = _cv(seed, nonlinear=True)
    xp, xq = _gauss(400, std_p, seed + 10), _gauss(400, std_q, seed + 20)
    xq = xq - xq.mean(0) + xp.mean(0)  # exactly equal sample means
    r = second_order_prediction(f, xp, xq)
    assert r["mean_gap_l2"] < 1e-12 and abs(r["gradient_term"]) < 1e-9
    for key in ("eq4", "eq5", "eq5_diag", "gauss_newton_diag"):
        assert np.sign(r[key]) == np.sign(r["measured"]), (key, r)
    assert np.sign(r["measured"]) == np.sign(std_p - std_q)


def test_curvature_reuse_matches_fresh():
    f = _cv(6, nonlinear=True)
    xp, xq = _gauss(100, 0.3, 1), _gauss(100, 0.2, 2)
    c = curvature(f, xp.mean(0))
    a = second_order_prediction(f, xp, xq, curv=c)
    b = second_order_prediction(f, xp, xq)
    assert a["eq5"] == pytest.approx(b["eq5"], rel=1e-12)
    # gamma = diag(J^T J) >= 0 (Gauss-Newton curvature of the constant-volume flow)
    assert bool((c["gamma"] >= 0).all())


def test_paper_eq6_from_the_kernels():
    f = _cv(7, nonlinear=True)
    xp, xq = _gauss(200, 0.3, 3), _gauss(200, 0.2, 4)
    r = paper_eq6(f, xp, xq)
    ms = next(m for m in f.modules() if isinstance(m, MultiScale))
    kernels = [m.weight_matrix().detach() for m in ms.level.modules() if isinstance(m, Invertible1x1)]
    assert len(kernels) == 2 and r["n_kernels"] == 2
    # gamma_c = (prod_k sum_j u_{k,c,j})^2 on the 4 channels of the squeezed first level
    gamma = (kernels[0].sum(1) * kernels[1].sum(1)) ** 2
    vp = pixel_unshuffle(xp, 2).var(0, unbiased=False)
    vq = pixel_unshuffle(xq, 2).var(0, unbiased=False)
    expected = -0.5 * float((gamma * (vq - vp).sum((1, 2))).sum())
    assert r["prediction"] == pytest.approx(expected, rel=1e-10)
    assert np.allclose(r["gamma_c"], gamma.numpy())
    assert r["prediction"] > 0  # smaller variances everywhere, gamma >= 0


def test_mismatched_shapes_rejected():
    f = _cv(8, nonlinear=False)
    with pytest.raises(ValueError, match="same event shape"):
        second_order_prediction(f, _gauss(10, 0.3, 1), torch.zeros(10, 64, dtype=torch.float64))
