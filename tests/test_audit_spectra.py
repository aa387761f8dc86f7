"""Jacobian spectra: exact (batched) singular values vs ``torch.linalg.svdvals`` of a brute-force
autograd Jacobian in float64; Lanczos (JVP/VJP only) within 5% of the exact values on a model
small enough for both; analytic vs numerical log-det mismatch.
"""
import copy
import math

import pytest
import torch
from torch import nn

from stableflows.audit import as_invertible, audit
from stableflows.audit.spectra import spectra


def _glow_small():
    from stableflows.models import glow

    torch.manual_seed(0)
    flow = glow(shape=(1, 4, 4), levels=2, steps_per_level=2, hidden=8, coupling="affine")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        flow.train()(torch.rand(64, 1, 4, 4, generator=g) * 0.9 + 0.05)  # ActNorm initialisation
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return flow.eval()


def _brute(fn64, x):
    """Per point: descending singular values and log|det| of the float64 Jacobian of ``fn64``."""
    sv, ld = [], []
    for xi in x.double():
        J = torch.autograd.functional.jacobian(lambda v: fn64(v[None])[0], xi)
        J = J.reshape(xi.numel(), xi.numel())
        sv.append(torch.linalg.svdvals(J))
        ld.append(torch.linalg.slogdet(J)[1])
    return torch.stack(sv), torch.stack(ld)


def test_exact_spectra_match_svdvals_of_an_autograd_jacobian():
    flow = _glow_small()
    f64 = copy.deepcopy(flow).double()
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    rep = audit(flow, x, families="test", spectra_points=6, spectra_method="exact", repeat=0)
    sp = rep.families["test"].spectra
    assert sp.method == "exact" and sp.dtype == "float64" and sp.index.numel() == 6
    xs = x[sp.index]
    sv, ld = _brute(lambda t: f64(t)[0], xs)
    assert torch.allclose(sp.fwd_smax, sv[:, 0], rtol=1e-9)
    assert torch.allclose(sp.fwd_smin, sv[:, -1], rtol=1e-9)
    assert torch.allclose(sp.fwd_cond, sv[:, 0] / sv[:, -1], rtol=1e-9)
    assert torch.allclose(sp.logdet_numeric, ld, atol=1e-9)
    # the inverse at z = F(x), from the flow's own inverse
    with torch.no_grad():
        z = f64(xs.double())[0]
    svi, _ = _brute(lambda t: f64.inverse(t)[0], z)
    assert torch.allclose(sp.inv_smax, svi[:, 0], rtol=1e-9)
    assert torch.allclose(sp.inv_smin, svi[:, -1], rtol=1e-9)
    assert float((sv[:, 0] / sv[:, -1]).min()) > 1.5  # a non-trivial spectrum


def test_lanczos_agrees_with_exact_within_five_percent():
    """A 64-dimensional RealNVP (digits-sized vectors): both methods are affordable. Lanczos uses
    fewer steps than the dimension (32 < 64), so this is not exact arithmetic in disguise."""
    from stableflows.models import realnvp

    torch.manual_seed(0)
    flow = realnvp(shape=(64,), steps_per_level=4, hidden=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        flow.train()(torch.rand(128, 64, generator=g) * 0.9 + 0.05)
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    flow.eval()
    x = torch.rand(6, 64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    m = as_invertible(flow).shadow(torch.float64)
    exact = spectra(m, x.double(), torch.arange(6), method="exact")
    it = spectra(m, x.double(), torch.arange(6), method="iterative", steps=32, seed=0)
    assert it.method == "iterative"
    sv, _ = _brute(lambda t: m.forward(t), x)  # the independent reference
    assert torch.allclose(exact.fwd_smax, sv[:, 0], rtol=1e-9)
    assert float((sv[:, 0] / sv[:, -1]).min()) > 3  # far from an isometry
    for name in ("fwd_smax", "fwd_smin", "inv_smax", "inv_smin", "fwd_cond", "inv_cond"):
        e, i = getattr(exact, name), getattr(it, name)
        assert torch.allclose(i, e, rtol=0.05), (name, i, e)
    assert torch.allclose(it.fwd_smin, sv[:, -1], rtol=0.05)
    # through the audit too
    rep = audit(flow, x, families="test", spectra_points=6, spectra_method="iterative", lanczos_steps=32,
                repeat=0, localize=False)
    sp = rep.families["test"].spectra
    ref = sv[sp.index]
    assert torch.allclose(sp.fwd_smax, ref[:, 0], rtol=0.05) and torch.allclose(sp.fwd_smin, ref[:, -1], rtol=0.05)


class _LinearWithWrongLogdet(nn.Module):
    """z = A x; the claimed log-det is log|det A| + OFFSET (a planted bug)."""

    OFFSET = 0.3

    def __init__(self, d=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = nn.Parameter(torch.eye(d) + 0.4 * torch.randn(d, d, generator=g))

    def fwd(self, x):
        return x @ self.A.T

    def inv(self, z):
        return torch.linalg.solve(self.A, z.T).T

    def logdet(self, x):
        return torch.linalg.slogdet(self.A)[1].expand(x.shape[0]) + self.OFFSET


def test_logdet_mismatch_finds_a_wrong_analytic_logdet():
    lin = _LinearWithWrongLogdet()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
    rep = audit((lin.fwd, lin.inv, lin.logdet), x, families="test", spectra_points=4, repeat=0)
    sp = rep.families["test"].spectra
    true_ld = float(torch.linalg.slogdet(lin.A.detach().double())[1])
    assert torch.allclose(sp.logdet_numeric, torch.full((4,), true_ld, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sp.logdet_mismatch, torch.full((4,), lin.OFFSET, dtype=torch.float64), atol=1e-6)
    # a correct flow has no mismatch: the Glow's analytic log-det equals slogdet of its Jacobian
    flow = _glow_small()
    xg = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.05
    rep = audit(flow, xg, families="test", spectra_points=3, repeat=0, localize=False)
    sp = rep.families["test"].spectra
    _, ld = _brute(lambda t: copy.deepcopy(flow).double()(t)[0], xg[sp.index])
    with torch.no_grad():
        analytic = copy.deepcopy(flow).double()(xg[sp.index].double())[1]
    assert torch.allclose(sp.logdet_analytic, analytic, atol=1e-10)
    assert torch.allclose(sp.logdet_analytic, ld, atol=1e-8)
    assert float(sp.logdet_mismatch.max()) < 1e-8


def test_lanczos_sigma_min_below_float32_resolution_comes_from_the_inverse_never_zero():
    """float32 z = diag(d) x with sigma_min = 1e-6, sigma_max = 1: lambda_min(J^T J) = 1e-12 lies
    far below float32's resolution (~1e-7 lambda_max), so the forward Ritz value is rounding; the
    reported sigma_min must be 1 / sigma_max(J^-1) = 1e-6 (exact inverse), not 0 or noise."""
    from stableflows.audit.spectra import RITZ_FLOOR_ULPS, lanczos_gram_extremes

    d = torch.logspace(0, -6, 12)  # 1 ... 1e-6, float32

    def fwd(x):
        return x * d

    def inv(z):
        return z / d

    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    lam_max, lam_min = lanczos_gram_extremes(fwd, x, steps=12, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lam_max, torch.ones(5, dtype=torch.float64), rtol=1e-5)
    # no value at or below the rounding floor survives as a "bound"
    floor = RITZ_FLOOR_ULPS * torch.finfo(torch.float32).eps
    assert bool((torch.isnan(lam_min) | (lam_min > floor)).all())
    sp = spectra(as_invertible((fwd, inv)), x, torch.arange(5), method="iterative", steps=12)
    assert torch.allclose(sp.fwd_smax, torch.ones(5, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(sp.fwd_smin, torch.full((5,), 1e-6, dtype=torch.float64), rtol=1e-3)
    assert torch.allclose(sp.inv_smax, torch.full((5,), 1e6, dtype=torch.float64), rtol=1e-3)


def test_an_overflowed_or_missing_inverse_estimate_reads_unresolved_not_zero():
    from stableflows.audit.spectra import _reciprocal

    r = _reciprocal(torch.tensor([4.0, math.inf, 0.0, math.nan, -1.0], dtype=torch.float64))
    assert r[0] == 0.25 and bool(torch.isnan(r[1:]).all())
    # a well-conditioned float32 map keeps the forward Lanczos bound: sigma in [0.5, 2]
    d = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    sp = spectra(as_invertible((lambda t: t * d, lambda t: t * math.inf)), x, torch.arange(3),
                 method="iterative", steps=8)
    assert torch.allclose(sp.fwd_smin, torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(sp.fwd_smax, torch.full((3,), 2.0, dtype=torch.float64), rtol=1e-5)
