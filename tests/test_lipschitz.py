"""Lipschitz-normalised layers and activations, checked against dense operators built independently
(autograd Jacobians of the layer, exact singular values / row sums in float64)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from stableflows.transforms.activations import ELU, LipSwish, Softplus, make_activation
from stableflows.transforms.base import ShapeError
from stableflows.transforms.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    SpectralConv2d,
    SpectralLinear,
    compute_lipschitz_exact,
    frozen_normalization,
    lipschitz_bound,
    refresh_normalization,
)

TIGHT = dict(rtol=1e-10, atol=0.0, max_iter=3000)  # power iteration run to convergence
BOUND_TOL = 1e-3


def _dense(layer, in_shape):
    """Jacobian of the (affine) layer in eval mode: its matrix, (out_dim, in_dim)."""
    layer.eval()
    x0 = torch.zeros(math.prod(in_shape), dtype=torch.float64)
    return jacobian(lambda t: layer(t.reshape(1, *in_shape)).reshape(-1), x0)


def _scaled(layer, factor):
    with torch.no_grad():
        layer.weight.mul_(factor)
    return layer


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (12, 12)])
def test_spectral_linear_bound(shape):
    c = 0.9
    layer = _scaled(SpectralLinear(*shape, coeff=c, **TIGHT).double(), 5.0)
    layer.train()
    layer(torch.randn(2, shape[0], dtype=torch.float64))  # adaptive iteration after the weight change
    sv = torch.linalg.svdvals(_dense(layer, (shape[0],)))
    assert sv[0] <= c + BOUND_TOL
    assert sv[0] >= c - BOUND_TOL  # the normalisation was active (sigma >> c), so it is tight
    assert compute_lipschitz_exact(layer) == pytest.approx(float(sv[0]), abs=1e-10)


def test_soft_normalisation_leaves_small_weights_alone():
    layer = _scaled(SpectralLinear(5, 4, coeff=0.9, **TIGHT).double(), 1e-2)
    layer.refresh_norm()
    assert torch.allclose(layer.normalized_weight(), layer.weight, rtol=0, atol=0)
    assert torch.allclose(_dense(layer, (5,)), layer.weight.detach(), atol=1e-14)


@pytest.mark.parametrize("stride,hw", [(1, (4, 4)), (1, (5, 4)), (2, (7, 6))])
def test_spectral_conv_bound_is_the_operator_norm(stride, hw):
    c = 0.8
    layer = _scaled(SpectralConv2d(3, 4, 3, stride=stride, coeff=c, **TIGHT).double(), 5.0)
    layer.train()
    layer(torch.randn(2, 3, *hw, dtype=torch.float64))  # lazy initialisation at this size
    assert layer.input_shape == hw
    dense = _dense(layer, (3, *hw))
    sv = torch.linalg.svdvals(dense)[0]
    assert c - BOUND_TOL <= sv <= c + BOUND_TOL
    assert compute_lipschitz_exact(layer) == pytest.approx(float(sv), abs=1e-10)


def test_reshaped_kernel_norm_would_not_bound_the_convolution():
    """Why the operator norm is needed: a kernel scaled to reshaped-matrix norm c is not c-Lipschitz."""
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    c, hw = 0.9, (8, 8)
    w_reshaped = w * c / torch.linalg.matrix_norm(w.reshape(4, -1), ord=2)
    d = 3 * hw[0] * hw[1]
    basis = torch.eye(d, dtype=torch.float64).reshape(d, 3, *hw)
    op = F.conv2d(basis, w_reshaped, padding=1).reshape(d, -1).t()
    assert torch.linalg.svdvals(op)[0] > c + 0.1


def test_conv_input_size_is_fixed_and_state_dict_restores_lazy_buffers():
    layer = SpectralConv2d(2, 3, 3, coeff=0.9).double()
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    layer.train()
    layer(x)
    with pytest.raises(ShapeError):
        layer(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    fresh = SpectralConv2d(2, 3, 3, coeff=0.9).double()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.input_shape == (4, 5)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("norm", ["inf", "one"])
def test_exact_induced_norms_linear(norm):
    c = 0.7
    layer = _scaled(LipschitzLinear(6, 4, coeff=c, norm=norm).double(), 3.0)
    dense = _dense(layer, (6,))
    value = dense.abs().sum(dim=1).max() if norm == "inf" else dense.abs().sum(dim=0).max()
    assert value == pytest.approx(c, abs=1e-12)


@pytest.mark.parametrize("norm", ["inf", "one"])
def test_exact_induced_norms_conv(norm):
    c = 0.7
    layer = _scaled(LipschitzConv2d(2, 3, 3, coeff=c, norm=norm).double(), 3.0)
    dense = _dense(layer, (2, 4, 4))  # 4x4 >= kernel: the interior sees the whole kernel, so it is exact
    value = dense.abs().sum(dim=1).max() if norm == "inf" else dense.abs().sum(dim=0).max()
    assert value == pytest.approx(c, abs=1e-12)


def test_adaptive_power_iteration_is_amortised_and_eval_is_frozen():
    layer = _scaled(SpectralLinear(10, 10, coeff=0.9, rtol=1e-10, atol=0.0, max_iter=1000).double(), 4.0)
    x = torch.randn(3, 10, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    layer(x)
    first = layer.stats["power_iterations"]
    layer(x)
    second = layer.stats["power_iterations"]
    assert first > 2 and second <= 2  # the persisted vectors were already converged
    u, v = layer.u.clone(), layer.v.clone()
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2) and torch.equal(layer.u, u) and torch.equal(layer.v, v)
    layer.train()
    with frozen_normalization(layer):
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
        layer(x)
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)


def test_fixed_iteration_count_without_tolerances():
    layer = SpectralLinear(6, 6, n_power_iter=3, atol=None, rtol=None)
    layer.train()
    layer(torch.randn(2, 6))
    assert layer.stats["power_iterations"] == 3


def test_gradient_flows_through_the_norm():
    """d/dW of the normalised layer (sigma = u^T W v with fixed vectors) matches finite differences."""
    layer = _scaled(SpectralLinear(4, 3, coeff=0.5, **TIGHT).double(), 4.0)
    layer.refresh_norm()
    layer.eval()
    x = torch.randn(2, 4, dtype=torch.float64)

    def out(w):
        return torch.func.functional_call(layer, {"weight": w, "bias": layer.bias}, (x,))

    assert torch.autograd.gradcheck(out, (layer.weight.detach().clone().requires_grad_(),))


def test_lipschitz_bound_of_a_sequential():
    from torch import nn

    c = 0.8
    net = nn.Sequential(_scaled(SpectralLinear(3, 5, coeff=c), 4.0), LipSwish(), _scaled(SpectralLinear(5, 3, coeff=c), 4.0))
    refresh_normalization(net)
    assert lipschitz_bound(net) == pytest.approx(c * c, rel=1e-5)
    assert lipschitz_bound(nn.Sequential(SpectralLinear(3, 3), nn.ReLU())) is None  # no certificate for ReLU here
    assert lipschitz_bound(nn.Sequential(SpectralLinear(3, 3), LipschitzLinear(3, 3, norm="inf"))) is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        SpectralLinear(3, 3, coeff=-1.0)
    with pytest.raises(ValueError):
        LipschitzLinear(3, 3, norm="fro")
    with pytest.raises(ShapeError):
        SpectralConv2d(2, 2, 3, input_shape=(3, 4, 4))
    with pytest.raises(ValueError):
        make_activation("relu")


# ----------------------------------------------------------------------------- activations
GRID = torch.linspace(-30, 30, 60001, dtype=torch.float64)


def _derivative(act, x):
    x = x.clone().requires_grad_()
    (d,) = torch.autograd.grad(act(x).sum(), x)
    return d


@pytest.mark.parametrize("beta", [0.01, 0.5, 1.0, 5.0, 100.0])
def test_lipswish_is_1_lipschitz_and_not_much_less(beta):
    act = LipSwish(beta).double()
    assert float(act.beta.detach()) == pytest.approx(beta, rel=1e-6)
    d = _derivative(act, GRID / beta)  # d/dx depends on beta * x only
    assert d.abs().max() <= 1.0
    assert d.abs().max() >= 0.99  # max of swish' is 1.0998 / 1.1
    x = GRID[::100]
    assert torch.allclose(act(x), x * torch.sigmoid(beta * x) / 1.1, atol=1e-12)


def test_lipswish_beta_is_learnable():
    act = LipSwish().double()
    act(torch.randn(5, dtype=torch.float64)).sum().backward()
    assert act.beta_raw.grad is not None and act.beta_raw.grad != 0


@pytest.mark.parametrize("act,ref", [(ELU(), F.elu), (Softplus(), F.softplus), (Softplus(beta=3.0),
                                                                              lambda t: F.softplus(t, beta=3.0))])
def test_elu_softplus(act, ref):
    assert act.lipschitz == 1.0
    d = _derivative(act, GRID)
    assert d.abs().max() <= 1.0
    assert torch.equal(act(GRID), ref(GRID))


# ----------------------------------------------------------------------------- induced mixed norms (002 app. D)
def _brute_mixed_norm(w: torch.Tensor, p: float, q: float) -> float:
    """``max_{||x||_p = 1} ||W x||_q`` by brute force (independent of the power method): a dense grid on
    the p-sphere of R^2 or R^3, refined by Nelder-Mead from the best grid points."""
    import numpy as np
    from scipy.optimize import minimize

    a = w.double().numpy()
    n = a.shape[1]

    def value(x):
        x = np.asarray(x, dtype=np.float64)
        nx = np.sum(np.abs(x) ** p) ** (1 / p)
        return np.sum(np.abs(a @ (x / nx)) ** q) ** (1 / q) if nx > 0 else 0.0

    if n == 2:
        t = np.linspace(0, 2 * np.pi, 200001)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:
        th, ph = np.meshgrid(np.linspace(0, np.pi, 301), np.linspace(0, 2 * np.pi, 601), indexing="ij")
        pts = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    pts = pts / (np.sum(np.abs(pts) ** p, 1, keepdims=True) ** (1 / p))
    vals = np.sum(np.abs(pts @ a.T) ** q, 1) ** (1 / q)
    best = float(vals.max())
    for i in np.argsort(vals)[-5:]:
        res = minimize(lambda x: -value(x), pts[i], method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-14,
                                                                                   "maxiter": 5000})
        best = max(best, -float(res.fun))
    return best


@pytest.mark.parametrize("shape", [(4, 2), (3, 3), (2, 3)])
@pytest.mark.parametrize("p,q", [(1.5, 2.5), (2.5, 1.5), (2.0, 2.0), (1.7, 1.7), (2.3, 1.9)])
def test_mixed_norm_matches_brute_force(shape, p, q):
    torch.manual_seed(hash((shape, p, q)) % 1000)
    layer = LipschitzLinear(shape[1], shape[0], norm="mixed", coeff=100.0, domain=p, codomain=q).double()
    layer.refresh_norm()
    got = float(layer.operator_norm().detach())
    ref = _brute_mixed_norm(layer.weight.detach(), p, q)
    assert got <= ref * (1 + 1e-7)  # the power method never overestimates
    assert got == pytest.approx(ref, rel=1e-5)
    if p == q == 2.0:
        assert got == pytest.approx(float(torch.linalg.matrix_norm(layer.weight.detach(), 2)), rel=1e-10)


def test_mixed_norm_normalises_and_orders_learn():
    """W_eff has mixed norm <= c (brute force); the differentiable estimate gives the orders gradients."""
    torch.manual_seed(3)
    layer = LipschitzLinear(2, 3, norm="mixed", coeff=0.5).double()
    with torch.no_grad():
        layer.domain.raw.fill_(0.8)
        layer.codomain.raw.fill_(-0.6)
    layer.refresh_norm()
    p, q = float(layer.domain()), float(layer.codomain())
    assert 1.5 < q < 2.0 < p < 2.5
    w_eff = layer.normalized_weight().detach()
    assert _brute_mixed_norm(w_eff, p, q) <= 0.5 * (1 + 1e-6)
    sigma = layer.operator_norm()
    sigma.backward()
    assert layer.domain.raw.grad is not None and layer.domain.raw.grad.abs() > 0
    assert layer.codomain.raw.grad is not None and layer.codomain.raw.grad.abs() > 0
    with pytest.raises(ValueError):
        LipschitzConv2d(2, 2, 3, norm="mixed")
    with pytest.raises(ValueError):
        LipschitzLinear(2, 2, norm="spectral", domain=1.5)


def test_chained_mixed_branch_is_lipschitz_in_its_own_norm():
    """g = L3 o phi o L2 o phi o L1 with orders chained p0 -> p1 -> p2 -> p0: the certified bound
    prod c_l bounds ||g(x) - g(y)||_{p0} / ||x - y||_{p0} on many random pairs; unchained: no bound."""
    from stableflows.transforms.lipschitz import chain_orders, orders_chained

    torch.manual_seed(5)
    dims = [2, 3, 3, 2]
    layers = [LipschitzLinear(a, b, norm="mixed", coeff=0.9) for a, b in zip(dims[:-1], dims[1:])]
    g = torch.nn.Sequential(layers[0], ELU(), layers[1], ELU(), layers[2]).double()
    assert lipschitz_bound(g) is None and not orders_chained(g)
    with torch.no_grad():
        for layer, s in zip(layers, (0.9, -0.7, 0.4)):
            layer.domain.raw.fill_(s)
    chain_orders(g)
    assert orders_chained(g)
    g.eval()
    bound = lipschitz_bound(g)
    assert bound is not None and bound <= 0.9 ** 3 + 1e-9
    p0 = float(layers[0].domain())
    x, y = torch.randn(20000, 2, dtype=torch.float64), torch.randn(20000, 2, dtype=torch.float64)
    y = x + 10 ** torch.empty(20000, 1, dtype=torch.float64).uniform_(-3, 0) * (y - x)
    with torch.no_grad():
        num = (g(x) - g(y)).abs().pow(p0).sum(1).pow(1 / p0)
    den = (x - y).abs().pow(p0).sum(1).pow(1 / p0)
    ratio = float((num / den).max())
    assert ratio <= bound * (1 + 1e-6)
    assert ratio >= 0.3 * bound  # the bound is not vacuous
