"""Finite-difference and flow-objective regularizers, checked against exact formulas: ||W d||^2 and
||W^-1 d||^2 on a linear map, ||J(x) d||^2 from an autograd Jacobian on a nonlinear flow, and the
gradients of the penalties through stored activations vs memory-saving chains (float64)."""
import math

import pytest
import torch

from stableflows.memory import memory_saving
from stableflows.models.factories import flow_step
from stableflows.regularizers import (AUTHORS_FD_WEIGHT, FiniteDifferenceRegularizer, FlowObjectiveRegularizer,
                                      fd_difference, fd_penalty, forward_fd_penalty, inverse_fd_penalty, jvp_penalty,
                                      log1p_penalty, nll_per_dim, robust_rows_mean, unit_directions)
from stableflows.transforms.base import Compose, Transform

torch.set_num_threads(1)


class Linear(Transform):
    """``z = W x + b`` with a known Jacobian ``W`` (test-local, independent of the library layers)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.b = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype))

    def _forward(self, x):
        return x @ self.w.T + self.b, torch.linalg.slogdet(self.w)[1].expand(x.shape[0])

    def _inverse(self, z):
        return torch.linalg.solve(self.w, (z - self.b).T).T, -torch.linalg.slogdet(self.w)[1].expand(z.shape[0])


def _w(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)) @ v.T  # singular values 0.1 .. 10


def test_unit_directions():
    d = unit_directions(torch.empty(7, 2, 3, 3, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert d.shape == (7, 2, 3, 3) and d.dtype == torch.float64
    torch.testing.assert_close(d.reshape(7, -1).norm(dim=1), torch.ones(7, dtype=torch.float64))
    # isotropic: the mean of d d^T over many draws is I / D
    many = unit_directions(torch.empty(20000, 3), torch.Generator().manual_seed(1))
    torch.testing.assert_close(many.T @ many / 20000, torch.eye(3) / 3, atol=0.01, rtol=0)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_fd_penalty_equals_jd_on_linear_map(eps):
    w = _w()
    lin = Linear(w)
    x = torch.randn(6, 5, dtype=torch.float64)
    d = unit_directions(x, torch.Generator().manual_seed(2))
    fwd = forward_fd_penalty(lin, x, eps=eps, d=d)
    torch.testing.assert_close(fwd, (d @ w.T).pow(2).sum(1), rtol=1e-8, atol=0)
    z = lin(x)[0]
    inv = inverse_fd_penalty(lin, z, eps=eps, d=d)
    torch.testing.assert_close(inv, (d @ torch.linalg.inv(w).T).pow(2).sum(1), rtol=1e-8, atol=0)
    # with a reused F(x) the forward penalty is the same
    torch.testing.assert_close(forward_fd_penalty(lin, x, eps=eps, d=d, z=z), fwd, rtol=1e-10, atol=0)


def test_expected_penalty_is_frobenius_over_dim():
    w = _w(4, seed=3)
    lin = Linear(w)
    x = torch.zeros(40000, 4, dtype=torch.float64)
    pen = forward_fd_penalty(lin, x, eps=1.0, generator=torch.Generator().manual_seed(4)).mean().detach()
    assert math.isclose(float(pen), float(w.pow(2).sum()) / 4, rel_tol=0.03)


def _flow(shape=(4,), coupling="affine", steps=3, seed=0):
    torch.manual_seed(seed)
    layers = []
    for k in range(steps):
        layers += flow_step(shape, k, hidden=8, coupling=coupling, scale="tanh_clamp", permutation="lu",
                            mask="channel", actnorm=True)
    flow = Compose(layers).double()
    flow(torch.randn(32, *shape, dtype=torch.float64))  # ActNorm initialisation
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def test_fd_penalty_approximates_jacobian_on_nonlinear_flow():
    flow = _flow()
    x = torch.randn(3, 4, dtype=torch.float64)
    d = unit_directions(x, torch.Generator().manual_seed(5))
    z = flow(x)[0].detach()
    for i in range(3):
        j = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])  # (4, 4)
        jinv = torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None])[0][0], z[i])
        exact_f = float((j @ d[i]).pow(2).sum())
        exact_i = float((jinv @ d[i]).pow(2).sum())
        for eps, tol in ((1e-3, 1e-2), (1e-5, 1e-4)):  # FD error is O(eps)
            with torch.no_grad():
                got_f = float(forward_fd_penalty(flow, x[i:i + 1], eps=eps, d=d[i:i + 1]))
                got_i = float(inverse_fd_penalty(flow, z[i:i + 1], eps=eps, d=d[i:i + 1]))
            assert math.isclose(got_f, exact_f, rel_tol=tol), (eps, got_f, exact_f)
            assert math.isclose(got_i, exact_i, rel_tol=tol), (eps, got_i, exact_i)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_fd_gradients_same_with_and_without_memory_saving(coupling):
    flow = _flow(coupling=coupling)
    ms = memory_saving(flow)
    params = list(flow.parameters())
    x = torch.randn(8, 4, dtype=torch.float64)
    reg = FiniteDifferenceRegularizer(weight_forward=0.7, weight_inverse=1.3, eps=0.1, every=1)
    grads = {}
    for name, t in (("stored", flow), ("saving", ms)):
        z = t(x)[0]
        pen, logs = reg(t, x, z=z, step=0, generator=torch.Generator().manual_seed(6))
        assert set(logs) == {"fd_forward", "fd_inverse", "fd_forward_nonfinite", "fd_inverse_nonfinite",
                             "fd_forward_dropped", "fd_inverse_dropped"}
        grads[name] = torch.autograd.grad(pen, params, allow_unused=True)
    # every parameter the Jacobian depends on gets a gradient; biases may not (J of a ReLU net
    # does not depend on its biases almost everywhere, nor on ActNorm's shift)
    weights = [p for n, p in flow.named_parameters() if not n.endswith("bias")]
    for side, (wf, wi) in (("forward", (1.0, 0.0)), ("inverse", (0.0, 1.0))):
        one = FiniteDifferenceRegularizer(weight_forward=wf, weight_inverse=wi, every=1)
        g = torch.autograd.grad(one(ms, x, step=0)[0], weights, allow_unused=True)
        reached = sum(1 for gi in g if gi is not None and float(gi.abs().max()) > 0)
        assert reached == len(weights), f"{side} FD gradient reaches {reached} of {len(weights)} weights"
    for a, b in zip(grads["saving"], grads["stored"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_fd_penalty_independent_reference_gradient():
    """d/dW of ||W d||^2 = 2 (W d) d^T: the autograd gradient through the penalty is right."""
    w = _w()
    lin = Linear(w)
    ms = memory_saving(Compose(lin))
    x = torch.randn(3, 5, dtype=torch.float64)
    d = unit_directions(x, torch.Generator().manual_seed(7))
    for t in (lin, ms):
        pen = fd_penalty(t, x, eps=0.5, d=d).sum()
        (g,) = torch.autograd.grad(pen, [lin.w])
        torch.testing.assert_close(g, 2 * (d @ w.T).T @ d, rtol=1e-8, atol=1e-12)


class ExplodingInverse(Transform):
    """``z = x`` forward; inverse ``x = z exp(w z_0^2)``: overflows to inf where ``|z_0|`` is large
    (a planted exploding inverse, with a parameter inside the overflow so its gradient is NaN there)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def _forward(self, x):
        return x.clone(), x.new_zeros(x.shape[0])

    def _inverse(self, z):
        return z * torch.exp(self.w * z[:, :1] ** 2), z.new_zeros(z.shape[0])


def test_inverse_fd_keeps_acting_on_finite_rows_where_some_explode():
    """Rows whose inverse overflows even at the example itself (so at every step) are the only rows
    left out; they are counted and the batch mean is still over all rows. The rest equals the
    closed form, and the gradient is finite."""
    t = ExplodingInverse()
    g = torch.Generator().manual_seed(3)
    z = 0.1 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    z[1, 0] = z[4, 0] = 40.0  # exp(1600) = inf in float64
    d = unit_directions(z, torch.Generator().manual_seed(9))
    naive = inverse_fd_penalty(t, z, eps=0.1, d=d)
    assert int((~torch.isfinite(naive)).sum()) == 2  # the planted failure is real
    reg = FiniteDifferenceRegularizer(weight_forward=0.0, weight_inverse=1.0, eps=0.1, every=1)
    pen, logs = reg(t, z, z=z, step=0, generator=torch.Generator().manual_seed(9))
    assert logs["fd_inverse_nonfinite"] == 2 and logs["fd_inverse_dropped"] == 2
    (grad,) = torch.autograd.grad(pen, [t.w])
    assert math.isfinite(float(pen.detach())) and math.isfinite(float(grad))
    keep = [0, 2, 3, 5]

    def closed_form(w):  # sum of ||F^-1(z + eps d) - F^-1(z)||^2 / eps^2 on the kept rows, over all 6
        zk, dk = z[keep], d[keep]
        m = zk + 0.1 * dk
        diff = m * torch.exp(w * m[:, :1] ** 2) - zk * torch.exp(w * zk[:, :1] ** 2)
        return (diff ** 2).sum(1).sum() / 0.01 / 6

    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    ref = closed_form(w)
    (ref_grad,) = torch.autograd.grad(ref, [w])
    assert math.isclose(float(pen.detach()), float(ref.detach()), rel_tol=1e-12)
    assert math.isclose(float(grad), float(ref_grad), rel_tol=1e-10)
    z[:, 0] = 40.0  # every row explodes: no penalty, all counted
    pen, logs = reg(t, z, z=z, step=0, generator=torch.Generator().manual_seed(9))
    assert float(pen) == 0.0 and logs["fd_inverse_nonfinite"] == 6 and logs["fd_inverse_dropped"] == 6


class WallInverse(Transform):
    """Inverse ``x = z exp(w z_0)`` for ``z_0 < 1`` and ``inf`` beyond: a planted wall just past the
    example, so the moved point at ``eps`` is non-finite while a smaller step is not."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def _forward(self, x):
        return x.clone(), x.new_zeros(x.shape[0])

    def _inverse(self, z):
        inside = z[:, :1] < 1.0
        return torch.where(inside, z * torch.exp(self.w * z[:, :1]), torch.full_like(z, math.inf)), \
            z.new_zeros(z.shape[0])


def test_exploding_row_enters_through_the_backtracked_log1p_surrogate():
    """Row 2 sits at z_0 = 0.96 and moves by 0.6 eps in z_0: non-finite at eps = 0.1 (1.02 > 1),
    finite at eps / 2 (0.99). It contributes log1p(R(eps / 2)); the others their exact penalty.
    Reference: the formula written out, differentiated by autograd."""
    t = WallInverse()
    z = torch.tensor([[0.1, 0.2], [-0.3, 0.5], [0.96, 0.0], [0.2, -0.4]], dtype=torch.float64)
    d = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]], dtype=torch.float64)
    assert not math.isfinite(float(inverse_fd_penalty(t, z[2:3], eps=0.1, d=d[2:3]).detach()))
    pen, counts = robust_rows_mean(lambda rows, eps: fd_difference(t.inverse, z[rows], eps=eps, d=d[rows]), 4, 0.1)
    assert counts == (1, 0)

    def written_out(w):
        def inv(v):
            return v * torch.exp(w * v[:, :1])

        def r(rows, eps):
            return ((inv(z[rows] + eps * d[rows]) - inv(z[rows])) ** 2).sum(1) / eps ** 2

        return (r([0, 1, 3], 0.1).sum() + torch.log1p(r([2], 0.05)).sum()) / 4

    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    ref = written_out(w)
    (g,) = torch.autograd.grad(pen, [t.w])
    (g_ref,) = torch.autograd.grad(ref, [w])
    assert math.isclose(float(pen.detach()), float(ref.detach()), rel_tol=1e-12)
    assert math.isclose(float(g), float(g_ref), rel_tol=1e-10)


def test_log1p_surrogate_is_finite_where_the_square_overflows():
    """float32 differences of 3e20 / 4e20: the squared norm overflows, log1p of it does not; the
    value equals the float64 log1p(||diff||^2 / eps^2)."""
    diff = torch.tensor([[3e20, 4e20], [3.0, 4.0]], dtype=torch.float32)
    assert not math.isfinite(float(diff[0].pow(2).sum()))
    got = log1p_penalty(diff, 0.1)
    ref = torch.log1p(diff.double().pow(2).sum(1) / 0.01)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_exact_jvp_penalty_on_a_linear_map():
    """mode='jvp': ||W d||^2 and ||W^-1 d||^2 exactly, and the gradient 2 (W d) d^T."""
    w = _w()
    lin = Linear(w)
    x = torch.randn(4, 5, dtype=torch.float64)
    d = unit_directions(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(jvp_penalty(lin, x, d), (d @ w.T).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    winv = torch.linalg.inv(w)
    torch.testing.assert_close(jvp_penalty(lin.inverse, x, d), (d @ winv.T).pow(2).sum(1), rtol=1e-8, atol=1e-12)
    (g,) = torch.autograd.grad(jvp_penalty(lin, x, d).sum(), [lin.w])
    torch.testing.assert_close(g, 2 * (d @ w.T).T @ d, rtol=1e-8, atol=1e-12)
    ms = memory_saving(Compose(lin))
    reg = FiniteDifferenceRegularizer(weight_forward=0.5, weight_inverse=0.0, every=1, mode="jvp")
    pen, logs = reg(ms, x, step=0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pen, 0.5 * (d @ w.T).pow(2).sum(1).mean(), rtol=1e-10, atol=1e-12)
    assert logs["fd_forward_nonfinite"] == 0
    with pytest.raises(ValueError, match="mode"):
        FiniteDifferenceRegularizer(mode="exact")


def test_authors_weight_conversion():
    """c eps D of the authors' CIFAR-10 command line (c = 1e-4, eps = 0.1, D = 3072)."""
    assert AUTHORS_FD_WEIGHT == pytest.approx(1e-4 * 0.1 * 3072) and AUTHORS_FD_WEIGHT == pytest.approx(0.0307, abs=1e-4)


def test_schedule_and_validation():
    reg = FiniteDifferenceRegularizer(every=10)
    lin = Linear(_w())
    x = torch.randn(2, 5, dtype=torch.float64)
    pen, logs = reg(lin, x, step=3)
    assert float(pen) == 0.0 and logs == {}
    pen, logs = reg(lin, x, step=20)
    assert float(pen.detach()) > 0 and "fd_forward" in logs
    with pytest.raises(ValueError):
        FiniteDifferenceRegularizer(eps=0.0)
    with pytest.raises(ValueError):
        FiniteDifferenceRegularizer(every=0)
    with pytest.raises(ValueError):
        fd_penalty(lin, x, d=torch.zeros(2, 4, dtype=torch.float64))


def test_flow_objective_regularizer_matches_formula():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ld = torch.randn(5, generator=g, dtype=torch.float64)
    log_p = -0.5 * z.pow(2).sum(1) - 3 * math.log(2 * math.pi) + ld
    torch.testing.assert_close(nll_per_dim(z, ld, None), -log_p / 6)
    bpd = -(log_p - 6 * math.log(17)) / (6 * math.log(2))
    torch.testing.assert_close(nll_per_dim(z, ld, 17), bpd)
    reg = FlowObjectiveRegularizer(weight=0.25, every=2)
    pen, logs = reg(z, ld, levels=17, step=4)
    torch.testing.assert_close(pen, 0.25 * bpd.mean())
    assert logs["nf_bpd"] == pytest.approx(float(bpd.mean()))
    assert float(reg(z, ld, levels=17, step=3)[0]) == 0.0
