"""Rational-quadratic spline coupling against independent references: knots interpolated exactly,
autograd derivatives in float64, the identity outside the interval, round trips with extreme
parameters (the inverse's quadratic root), and a Glow built with it."""
from __future__ import annotations

import pytest
import torch

from stableflows.transforms.splines import MIN_BIN, MIN_DERIVATIVE, SplineCoupling, rq_spline

K, N, BOUND = 5, 400, 3.0


def _params(scale: float, seed: int = 0, n: int = N, k: int = K):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(n, m, generator=g, dtype=torch.float64) for m in (k, k, k - 1))


def _knots(raw, bound):
    """Knot positions written out: sizes MIN_BIN + (1 - K MIN_BIN) softmax, cumulated over [-B, B]."""
    size = MIN_BIN + (1 - MIN_BIN * raw.shape[-1]) * torch.softmax(raw, -1)
    return torch.cat([torch.full_like(raw[..., :1], -bound), -bound + 2 * bound * torch.cumsum(size, -1)], -1)


def test_spline_passes_through_its_knots_with_their_derivatives():
    w, h, d = _params(1.5)
    xk, yk = _knots(w, BOUND), _knots(h, BOUND)
    inner = xk[:, 1:-1]  # (N, K - 1): inner knots
    x = inner.clone().requires_grad_()
    y, logd = rq_spline(x, w[:, None].expand(-1, K - 1, -1), h[:, None].expand(-1, K - 1, -1),
                        d[:, None].expand(-1, K - 1, -1), bound=BOUND)
    assert torch.allclose(y, yk[:, 1:-1], atol=1e-12, rtol=0)
    slope = MIN_DERIVATIVE + torch.nn.functional.softplus(d + torch.log(torch.expm1(torch.tensor(1 - MIN_DERIVATIVE,
                                                                                                  dtype=d.dtype))))
    assert torch.allclose(logd.exp(), slope, rtol=1e-9, atol=0)


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.0])
def test_log_derivative_matches_autograd_and_the_inverse_undoes_it(scale):
    w, h, d = _params(scale, seed=1)
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(N, generator=g, dtype=torch.float64) * 2 - 1) * (BOUND + 1)  # inside and both tails
    xg = x.clone().requires_grad_()
    y, logd = rq_spline(xg, w, h, d, bound=BOUND)
    (dydx,) = torch.autograd.grad(y.sum(), xg)
    assert torch.allclose(logd, dydx.log(), atol=1e-10, rtol=0)
    assert bool((dydx > 0).all())
    x_back, logd_inv = rq_spline(y.detach(), w, h, d, bound=BOUND, inverse=True)
    # float64 rounding of y, amplified by the inverse's slope dx/dy = 1 / (dy/dx)
    assert bool(((x_back - x).abs() <= 1e-12 * (1 + 1 / dydx)).all())
    assert torch.allclose(logd_inv, -logd.detach(), atol=1e-9, rtol=0)  # slopes down to e^-15 at scale 4
    outside = x.abs() > BOUND
    assert outside.any() and torch.equal(y[outside].detach(), x[outside]) and bool((logd[outside] == 0).all())
    if scale == 0.0:  # zero conditioner output: the identity
        assert float((y.detach() - x).abs().max()) < 1e-12


def test_extreme_parameters_stay_finite_and_invertible():
    w, h, d = (t[:1].expand(N, -1) for t in _params(25.0, seed=3))  # one spline; bins and slopes at their limits
    x = torch.linspace(-BOUND - 0.5, BOUND + 0.5, N, dtype=torch.float64)
    y, logd = rq_spline(x, w, h, d, bound=BOUND)
    assert bool(torch.isfinite(y).all() and torch.isfinite(logd).all())
    assert bool((y[1:] > y[:-1]).all())  # strictly monotone
    x_back, _ = rq_spline(y, w, h, d, bound=BOUND, inverse=True)
    inv_slope = torch.exp(-logd)  # dx/dy: how much the inverse amplifies a rounding error of y
    assert bool(((x_back - x).abs() <= 1e-12 * (1 + inv_slope)).all())
    # float32: finite everywhere, and never worse than rounding y (eps * |y|) times the inverse's slope
    y32, _ = rq_spline(x.float(), w.float(), h.float(), d.float(), bound=BOUND)
    back32, _ = rq_spline(y32, w.float(), h.float(), d.float(), bound=BOUND, inverse=True)
    eps32 = torch.finfo(torch.float32).eps
    assert bool(torch.isfinite(back32).all())
    assert bool(((back32.double() - x).abs() <= 8 * eps32 * (BOUND + 1) * (1 + inv_slope)).all())


def test_bad_arguments_are_refused():
    w, h, d = _params(1.0)
    with pytest.raises(ValueError, match="derivatives"):
        rq_spline(torch.zeros(N, dtype=torch.float64), w, h, d[:, :-1])
    with pytest.raises(ValueError, match="bound"):
        rq_spline(torch.zeros(N, dtype=torch.float64), w, h, d, bound=0.0)
    with pytest.raises(ValueError, match="2 bins"):
        SplineCoupling((4,), bins=1)
    with pytest.raises(ValueError, match="bound"):
        SplineCoupling((4,), bound=float("inf"))


def test_spline_glow_density_against_a_brute_force_jacobian():
    from stableflows.models import glow
    from stableflows.transforms.base import LOG_2PI

    torch.manual_seed(0)
    flow = glow(shape=(1, 4, 4), levels=2, steps_per_level=1, hidden=4, coupling="spline").double()
    v = 0.05 + 0.9 * torch.rand(3, 1, 4, 4, dtype=torch.float64)
    flow.train()
    with torch.no_grad():
        flow.log_prob(v)  # ActNorm initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow.eval()
    lp = flow.log_prob(v)
    for i in range(v.shape[0]):
        f = lambda t: flow(t.view(1, 1, 4, 4))[0].reshape(-1)  # noqa: E731
        j = torch.autograd.functional.jacobian(f, v[i].reshape(-1))
        z = f(v[i].reshape(-1))
        ref = -0.5 * float(z.pow(2).sum()) - 0.5 * z.numel() * LOG_2PI + float(torch.linalg.slogdet(j)[1])
        assert float(lp[i]) == pytest.approx(ref, abs=1e-8)
    x_back, _ = flow.inverse(flow(v)[0])
    assert float((x_back - v).abs().max()) < 1e-10
