"""Log-det estimators of residual blocks against independent references.

References: per-example autograd Jacobians + ``slogdet`` (float64), matrix powers, scipy's Poisson
tail. Statistical checks average many seeded estimates and compare within standard errors; each
has a negative control (a deliberately wrong estimator that the same check rejects), so none of
them can pass trivially.
"""
import copy
import gc
import math
import weakref

import pytest
import scipy.stats
import torch
from torch import nn
from torch.autograd.functional import jacobian

from stableflows.estimators import (
    ExactEstimator,
    Geometric,
    Poisson,
    RouletteEstimator,
    SeriesEstimator,
    make_estimator,
    power_series_logdet,
    sample_probe,
)
from stableflows.transforms.activations import LipSwish
from stableflows.transforms.base import collect_stats, read_stats
from stableflows.transforms.lipschitz import SpectralLinear
from stableflows.transforms.residual import conv_lipschitz, mlp_lipschitz

D64 = torch.float64
Z_MAX = 3.0  # "within 3 standard errors"


# ----------------------------------------------------------------------------- blocks and references
def _orth(d):
    return torch.linalg.qr(torch.randn(d, d, dtype=D64))[0]


def _nonlinear_g(d=6, a=0.8, b=0.8, bias=2.0):
    """``g = W2 LipSwish(W1 x + 2) `` with ``W1 = a Q``, ``W2 = b Q^T diag(+-1)``: a sizeable,
    nearly symmetric Jacobian (eigenvalues ~ +-0.64), so that the series tail matters."""
    l1 = SpectralLinear(d, d, coeff=0.9).double()
    l2 = SpectralLinear(d, d, coeff=0.9).double()
    q = _orth(d)
    signs = torch.tensor([(-1.0) ** i for i in range(d)], dtype=D64)
    with torch.no_grad():
        l1.weight.copy_(a * q)
        l1.bias.fill_(bias)
        l2.weight.copy_(b * q.t() @ torch.diag(signs))
        l2.bias.normal_()
    l1.refresh_norm(), l2.refresh_norm()
    return nn.Sequential(l1, LipSwish().double(), l2).eval()


def _linear_g(eigs, coeff=0.99):
    """``g(x) = W_eff x + b`` with ``W = Q diag(eigs) Q^T`` normalised to spectral norm <= coeff."""
    d = len(eigs)
    layer = SpectralLinear(d, d, coeff=coeff).double()
    q = _orth(d)
    with torch.no_grad():
        layer.weight.copy_(q @ torch.diag(torch.tensor(eigs, dtype=D64)) @ q.t())
        layer.bias.normal_()
    layer.refresh_norm()
    return nn.Sequential(layer).eval()


def _exact_ref(g, x, create_graph=False):
    """``log|det(I + J_g(x_b))|`` per example from autograd Jacobians of single examples."""
    out = []
    for xb in x:
        jac = jacobian(lambda t: g(t.unsqueeze(0))[0].reshape(-1), xb, create_graph=create_graph)
        jac = jac.reshape(xb.numel(), xb.numel())
        out.append(torch.linalg.slogdet(torch.eye(xb.numel(), dtype=D64) + jac)[1])
    return torch.stack(out)


def _repeated(est, g, x, reps=32, calls=150, training=True):
    """Mean and standard error per point of ``calls`` independent estimates, each the average of
    ``reps`` copies of the point in one batch (one count draw per call, one probe per copy)."""
    xb = x.repeat_interleave(reps, dim=0)
    means = []
    for _ in range(calls):
        with torch.no_grad():
            _, ld = est(g, xb, training=training)
        means.append(ld.reshape(x.shape[0], reps).mean(dim=1))
    means = torch.stack(means)  # (calls, P)
    return means.mean(dim=0), means.std(dim=0) / math.sqrt(calls)


class _NoReweighting(RouletteEstimator):
    """Negative control: drops the 1 / P(N >= j) weights (biased)."""

    def coefficients(self, training):
        return [1.0] * len(super().coefficients(training))


BLOCKS = {"nonlinear": (_nonlinear_g, 6), "linear": (lambda: _linear_g([-0.65, -0.6, 0.5, 0.3]), 4)}


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("dist", ["geometric", "poisson"])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_roulette_is_unbiased(block, dist):
    make_g, d = BLOCKS[block]
    g = make_g()
    x = 0.5 * torch.randn(3, d, dtype=D64)
    exact = _exact_ref(g, x)
    mean, se = _repeated(make_estimator("roulette", n_exact_terms=1, dist=dist), g, x)
    assert ((mean - exact).abs() <= Z_MAX * se).all(), ((mean - exact) / se, se)
    # the tail beyond the exact term is large compared with the standard error
    first = make_estimator("series", n_series_terms=1)
    mean1, se1 = _repeated(first, g, x, calls=20)
    assert ((mean1 - exact).abs() > 5 * (se + se1)).all()


def test_negative_control_without_reweighting_is_rejected():
    g = _nonlinear_g()
    x = 0.5 * torch.randn(3, 6, dtype=D64)
    mean, se = _repeated(_NoReweighting(n_exact_terms=1), g, x)
    assert ((mean - _exact_ref(g, x)).abs() > Z_MAX * se).all()


def test_unbiased_with_rademacher_probes_and_several_counts():
    g = _linear_g([-0.65, -0.6, 0.5, 0.3])
    x = torch.randn(2, 4, dtype=D64)
    est = make_estimator("roulette", n_exact_terms=1, n_samples=3, probe="rademacher")
    mean, se = _repeated(est, g, x)
    assert ((mean - _exact_ref(g, x)).abs() <= Z_MAX * se).all()


def test_evaluation_mode_uses_20_exact_terms_plus_the_tail():
    g = _nonlinear_g()
    x = 0.5 * torch.randn(2, 6, dtype=D64)
    est = make_estimator("roulette")
    with torch.no_grad():
        est(g, x, training=False)
    assert est.stats["logdet_terms"] >= 21
    with torch.no_grad():
        est(g, x, training=True)
    assert est.stats["logdet_terms"] >= 3
    mean, se = _repeated(est, g, x, calls=40, training=False)
    assert ((mean - _exact_ref(g, x)).abs() <= Z_MAX * se).all()


def test_truncated_series_is_biased_when_c_is_high():
    x = torch.randn(2, 4, dtype=D64)
    series = make_estimator("series", n_series_terms=5)
    g_high = _linear_g([-3.0, 2.0, -1.0, 0.5], coeff=0.99)  # normalised: eigenvalues -0.99, 0.66, ...
    mean, se = _repeated(series, g_high, x, calls=60)
    bias = (mean - _exact_ref(g_high, x)).abs()
    assert (bias > 10 * se).all() and (bias > 1.0).all()  # the dropped tail: ~ sum_{k>5} 0.99^k / k
    g_low = _linear_g([-3.0, 2.0, -1.0, 0.5], coeff=0.5)
    mean, se = _repeated(series, g_low, x, calls=60)
    assert ((mean - _exact_ref(g_low, x)).abs() <= Z_MAX * se).all()


# ----------------------------------------------------------------------------- gradients
def _flat_grads(loss, inputs):
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return torch.cat([(torch.zeros_like(i) if gr is None else gr).reshape(-1) for gr, i in zip(grads, inputs)])


def _gradient_z_scores(est, g, x, reps=16, calls=150):
    """z-scores of the mean estimated gradient of sum_b logdet_b (w.r.t. x and the parameters of g)
    against the exact one, projected on the exact direction and on three random directions."""
    params = list(g.parameters())
    x_leaf = x.clone().requires_grad_()
    exact = _flat_grads(_exact_ref(g, x_leaf, create_graph=True).sum(), [x_leaf, *params])
    samples = []
    for _ in range(calls):
        x_leaf = x.clone().requires_grad_()
        _, ld = est(g, x_leaf.repeat_interleave(reps, dim=0), training=True)
        samples.append(_flat_grads(ld.sum() / reps, [x_leaf, *params]))
    samples = torch.stack(samples)
    gen = torch.Generator().manual_seed(7)
    dirs = torch.cat([exact[None] / exact.norm(), torch.randn(3, exact.numel(), generator=gen, dtype=D64)])
    proj = samples @ dirs.t()  # (calls, 4)
    return (proj.mean(0) - dirs @ exact) / (proj.std(0) / math.sqrt(calls))


@pytest.mark.parametrize("in_forward", [True, False])
def test_neumann_gradient_matches_the_exact_gradient_in_expectation(in_forward):
    g = _nonlinear_g()
    x = 0.5 * torch.randn(3, 6, dtype=D64)
    est = make_estimator("roulette", n_exact_terms=1, neumann_grad=True, grad_in_forward=in_forward)
    z = _gradient_z_scores(est, g, x)
    assert (z.abs() <= Z_MAX).all(), z
    control = _gradient_z_scores(make_estimator("series", n_series_terms=1), g, x, calls=20)
    assert control[0].abs() > 10  # the one-term gradient tr(dJ) misses (I + J)^-1: rejected


def _run(g, est_kwargs, weights, in_forward, seed=11):
    """Gradients of sum_b w_b logdet_b + 0.3 |g(x)|^2 w.r.t. x and g's parameters with fixed draws."""
    g = copy.deepcopy(g)  # identical power-iteration state for every run
    x = torch.linspace(-1, 1, 5 * 4, dtype=D64).reshape(5, 4).requires_grad_()
    torch.manual_seed(seed)
    est = make_estimator(grad_in_forward=in_forward, **est_kwargs)
    gx, ld = est(g, x, training=True)
    loss = (weights * ld).sum() + 0.3 * gx.pow(2).sum()
    return _flat_grads(loss, [x, *g.parameters()])


@pytest.mark.parametrize("per_sample", [False, True], ids=["uniform", "per_sample"])
@pytest.mark.parametrize("est_kwargs", [dict(name="roulette", neumann_grad=True),
                                        dict(name="roulette", neumann_grad=False),
                                        dict(name="series", n_series_terms=4, neumann_grad=True)],
                         ids=["roulette_neumann", "roulette_plain", "series_neumann"])
def test_backward_in_forward_equals_plain_backprop(est_kwargs, per_sample):
    g = mlp_lipschitz(4, 8, coeff=0.9).double().train()  # training mode: power iteration inside g
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=D64) if per_sample else torch.full((5,), 0.2, dtype=D64)
    in_forward = _run(g, est_kwargs, weights, True)
    plain = _run(g, est_kwargs, weights, False)
    assert torch.allclose(in_forward, plain, rtol=1e-10, atol=1e-12)


def test_per_sample_weights_are_not_the_scalar_shortcut():
    """The published code's shortcut (mean weight x gradient of the batch sum) gives another answer."""
    g = mlp_lipschitz(4, 8, coeff=0.9).double()
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=D64)
    kwargs = dict(name="roulette", neumann_grad=True)
    correct = _run(g, kwargs, weights, True)
    shortcut = _run(g, kwargs, torch.full((5,), float(weights.mean()), dtype=D64), True)
    assert not torch.allclose(correct, shortcut, rtol=1e-3, atol=1e-6)


def test_memory_does_not_grow_with_the_number_of_terms():
    """Saved tensors still referenced by the graph after forward (what backward will need)."""

    class _Holder:
        __slots__ = ("t", "__weakref__")

    def retained(n_terms, **kw):
        g = mlp_lipschitz(8, 16, coeff=0.9).double()
        x = torch.randn(4, 8, dtype=D64, requires_grad=True)
        live = weakref.WeakSet()

        def pack(t):
            h = _Holder()
            h.t = t
            live.add(h)
            return h

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
            out = SeriesEstimator(n_terms=n_terms, **kw)(g, x, training=True)
        gc.collect()
        total = sum(h.t.numel() for h in live)
        del out
        return total

    for kw in (dict(neumann_grad=True, grad_in_forward=True), dict(neumann_grad=True, grad_in_forward=False)):
        assert retained(20, **kw) == retained(2, **kw)
    plain = dict(neumann_grad=False, grad_in_forward=False)
    assert retained(20, **plain) > 4 * retained(2, **plain)
    # backward-in-forward keeps no more than the graph of g(x) itself
    assert retained(20, neumann_grad=True, grad_in_forward=True) < retained(2, neumann_grad=True, grad_in_forward=False)


# ----------------------------------------------------------------------------- exact values
def test_series_value_matches_matrix_powers():
    g = _linear_g([-0.7, 0.4, 0.2])
    a = g[0].normalized_weight().detach()  # J = A for a linear branch
    x = torch.randn(3, 3, dtype=D64)
    v = torch.randn(3, 3, dtype=D64)
    coeffs = [1.0, 1.0, 2.0, 4.0, 0.5]
    ref = torch.zeros(3, dtype=D64)
    power = torch.eye(3, dtype=D64)
    for k, c in enumerate(coeffs, start=1):
        power = power @ a
        ref += c * (-1) ** (k + 1) / k * torch.einsum("bi,ij,bj->b", v, power, v)  # v^T A^k v
    for neumann, in_forward in [(True, True), (True, False), (False, False), (False, True)]:
        x_ = x.clone().requires_grad_()
        gx, value = power_series_logdet(g, x_, v, coeffs, neumann_grad=neumann, grad_in_forward=in_forward)
        assert torch.allclose(value, ref, rtol=1e-12, atol=1e-13)
        assert torch.allclose(gx, x @ a.t() + g[0].bias, atol=1e-13)


def test_exact_estimator_values_and_gradients():
    for g, shape in [(mlp_lipschitz(3, 8, coeff=0.9), (3,)), (conv_lipschitz(2, 3, coeff=0.9, input_shape=(2, 2)), (2, 2, 2))]:
        g = g.double().eval()
        params = list(g.parameters())
        x = torch.randn(3, *shape, dtype=D64, requires_grad=True)
        gx, ld = ExactEstimator()(g, x, training=True)
        ref = _exact_ref(g, x, create_graph=True)
        assert torch.allclose(ld, ref, atol=1e-12)
        assert torch.allclose(gx, g(x), atol=1e-14)
        assert torch.allclose(_flat_grads(ld.sum(), [x, *params]), _flat_grads(ref.sum(), [x, *params]), atol=1e-10)
        with torch.no_grad():
            _, ld_ng = ExactEstimator()(g, x, training=False)
        assert not ld_ng.requires_grad and torch.allclose(ld_ng, ref, atol=1e-12)


def test_exact_estimator_reports_nonpositive_determinants():
    class _Flip(nn.Module):
        def forward(self, x):
            return -2.0 * x  # I + J = -I: det = -1 in odd dimension

    est = ExactEstimator()
    est(_Flip(), torch.randn(4, 3, dtype=D64), training=False)
    assert "nonpositive_det" not in est.stats  # a device value: only when asked
    with collect_stats():
        _, ld = est(_Flip(), torch.randn(4, 3, dtype=D64), training=False)
    assert read_stats(est)["nonpositive_det"] == 4.0 and torch.allclose(ld, torch.zeros(4, dtype=D64))


# ----------------------------------------------------------------------------- counts and probes
def test_count_distributions():
    geo = Geometric(0.5)
    draws = torch.tensor(geo.sample(20000))
    assert draws.min() >= 1
    for j in range(1, 6):
        freq = (draws >= j).double().mean()
        se = math.sqrt(geo.survival(j) * (1 - geo.survival(j)) / len(draws)) + 1e-12
        assert abs(freq - geo.survival(j)) <= 4 * se
    poi = Poisson(2.0)
    for j in range(0, 40):
        assert poi.survival(j) == pytest.approx(scipy.stats.poisson.sf(j - 1, 2.0), rel=1e-9, abs=1e-300)
    assert min(poi.sample(1000)) == 0  # support includes N = 0


@pytest.mark.parametrize("dist,p", [("geometric", 0.3), ("poisson", 1.5)])
def test_roulette_weights_have_expectation_one(dist, p):
    est = RouletteEstimator(n_exact_terms=2, dist=dist, p=p, n_samples=2)
    m, calls = 5, 2000
    weights = torch.zeros(calls, m, dtype=D64)
    for i in range(calls):
        c = est.coefficients(training=True)
        assert c[:2] == [1.0, 1.0]
        tail = c[2:2 + m]
        weights[i, : len(tail)] = torch.tensor(tail, dtype=D64)
    mean, se = weights.mean(0), weights.std(0) / math.sqrt(calls)
    assert ((mean - 1.0).abs() <= 4 * se + 1e-12).all(), mean


def test_probes():
    like = torch.zeros(20000, 3, dtype=D64)
    r = sample_probe(like, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    for v in (r, sample_probe(like, "gaussian")):
        cov = v.t() @ v / v.shape[0]
        assert torch.allclose(cov, torch.eye(3, dtype=D64), atol=0.05)  # E[v v^T] = I


def test_bad_estimator_options():
    with pytest.raises(ValueError):
        make_estimator("exactish")
    with pytest.raises(ValueError):
        make_estimator("roulette", dist="binomial")
    with pytest.raises(ValueError):
        make_estimator("roulette", p=1.0)
    with pytest.raises(ValueError):
        make_estimator("series", probe="uniform")
    with pytest.raises(ValueError):
        SeriesEstimator(n_terms=0)
