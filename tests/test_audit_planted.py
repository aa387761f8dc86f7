"""Planted failures are found, named and measured; healthy flows raise no false alarm.

References are independent of the audit: the planted region is known by construction, Jacobians
come from ``torch.autograd.functional.jacobian`` + ``svdvals`` in float64, and reconstructions are
recomputed by hand.
"""
import math
import warnings

import pytest
import torch
from torch import nn

from stableflows.audit import audit
from stableflows.transforms.base import Compose
from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling
from stableflows.transforms.linear import Invertible1x1, Permutation
from stableflows.transforms.residual import ResidualBlock

D = 6
TINY_SCALE = 1e-12
TOL = 1e-3


class _RegionNet(nn.Module):
    """Conditioner of the planted coupling: where x_a[0] > 0.5 the scale is exp(log 1e-12) and the
    shift 0.5 (so x_b * 1e-12 drowns in the shift), elsewhere scale 1 and shift 0."""

    def forward(self, xa):  # (B, 3) -> (B, 2 * 3): [t, raw]
        inside = (xa[:, :1] > 0.5).to(xa.dtype).expand(-1, 3)
        return torch.cat([0.5 * inside, math.log(TINY_SCALE) * inside], dim=1)


def _planted_affine():
    torch.manual_seed(0)
    coupling = AffineCoupling((D,), scale="exp", hidden=8)
    coupling.net = _RegionNet()
    mix = AdditiveCoupling((D,), parity=1, hidden=8)
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_(0, 0.3)
    return Compose(Permutation((D,), kind="reverse"), coupling, mix), "layers.1"


def _brute_cond(model, x):
    """Condition numbers of dF/dx at each row of x, float64 autograd Jacobian + svdvals."""
    m64 = __import__("copy").deepcopy(model).double()
    out = []
    for xi in x.double():
        J = torch.autograd.functional.jacobian(lambda v: m64(v[None])[0][0], xi)
        s = torch.linalg.svdvals(J)
        out.append(float(s[0] / s[-1]))
    return torch.tensor(out, dtype=torch.float64)


def test_tiny_affine_scale_is_found_named_and_attributed_to_float_precision():
    model, name = _planted_affine()
    x = torch.rand(40, D, generator=torch.Generator().manual_seed(1))
    rep = audit(model, x, families="test", spectra_points=8, repeat=2)
    v = rep.verdict["test"]
    # the failing examples are exactly those in the planted region (computed from the input alone)
    region = x[:, D - 1] > 0.5  # the reverse permutation puts x[:, D - 1] first in the kept half
    errs = rep.families["test"].errors["l2"]
    assert bool((errs[region] > TOL).all()) and bool((errs[~region] <= TOL).all())
    assert v.status == "not invertible" and v.n_fail == int(region.sum())
    assert v.culprit == name, v.culprit_reason
    # float64: error 0.5 * 2^-53 / 1e-12 ~ 5e-5 per entry: within tolerance, so the cause is precision
    assert v.cause == "floating point"
    loc = rep.families["test"].localization
    assert loc.layer(name).stats_inverse["min_scale"] == pytest.approx(TINY_SCALE, rel=1e-6)
    assert loc.layer(name).gain > 1e11  # inverse divides by 1e-12
    # spectra: the audit's exact condition numbers agree with a brute-force float64 Jacobian
    sp = rep.families["test"].spectra
    ref = _brute_cond(model, x[sp.index])
    assert torch.allclose(sp.fwd_cond, ref, rtol=1e-6)
    assert float(sp.fwd_cond[region[sp.index]].min()) > 1e10


class _TailNet(nn.Module):
    """Conditioner whose scale is exp(-100) (a float32 subnormal) only where the kept input's first
    entry exceeds 2 (about 2 % of N(0, 1) codes): the planted coupling's inverse divides by it and
    overflows to inf on a rare tail of latents, as the trained 28x28 Glow's samples do."""

    def forward(self, xa):
        inside = (xa[:, :1] > 2.0).to(xa.dtype).expand(-1, 3)
        return torch.cat([torch.zeros_like(inside), -100.0 * inside], dim=1)


def test_latent_family_failing_on_a_rare_tail_is_localised_on_its_failing_codes():
    """The localisation of a latent family traces its failing codes, not its first ones: here the
    first ``k`` codes are healthy, and the planted layer must still be named by its inverse gain."""
    from stableflows.models.flow import Flow

    torch.manual_seed(0)
    mix = AdditiveCoupling((D,), parity=1, hidden=8)
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_(0, 0.3)
    tail = AffineCoupling((D,), scale="exp", hidden=8)
    tail.net = _TailNet()
    flow = Flow(Compose(mix, tail), (D,)).eval()  # the inverse applies `tail` first, to z itself
    k, n = 4, 256
    rep = audit(flow, None, families="samples_t1", n=n, localize_points=k, spectra_points=4, repeat=0)
    fam = rep.families["samples_t1"]
    # independent reference: the failing codes are those in the tail, read off z alone
    z = flow.sample_latent(n, 1.0, torch.Generator().manual_seed(0))
    region = z[:, 0] > 2.0
    assert 0 < int(region.sum()) < n // 10 and not bool(region[:k].any())  # the first k codes are healthy
    errs = fam.errors["l2"]
    assert bool((errs[region] > TOL).all()) and bool((errs[~region] <= TOL).all())
    v = rep.verdict["samples_t1"]
    assert v.status == "not invertible" and v.n_fail == int(region.sum())
    assert v.culprit == "transform.layers.1", v.culprit_reason
    assert fam.localization.layer("transform.layers.1").stats_inverse["min_scale"] < 1e-40


def _planted_linear():
    """A 4-d LU linear layer W = L U with det 1e-12 and cond ~1.6e12 (computed from its parameters)."""
    torch.manual_seed(0)
    lin = Invertible1x1((4,), lu=True)
    with torch.no_grad():
        lin.perm.copy_(torch.eye(4))
        lin.sign_s.fill_(1.0)
        lin.lower.zero_()
        lin.upper.zero_()
        lin.lower[1, 0] = 0.5
        lin.upper[0, 1] = 0.5
        lin.log_s.copy_(torch.tensor([0.0, math.log(TINY_SCALE), 0.0, 0.0]))
    a = AdditiveCoupling((4,), hidden=8)
    b = AdditiveCoupling((4,), parity=1, hidden=8)
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.normal_(0, 0.3)
    return Compose(a, lin, b), "layers.1", lin


def test_ill_conditioned_linear_layer_is_found_and_its_condition_number_measured():
    model, name, lin = _planted_linear()
    # reference condition number of W from its float32 parameters, in float64
    lower = lin.lower.detach().double().tril(-1) + torch.eye(4, dtype=torch.float64)
    upper = lin.upper.detach().double().triu(1) + torch.diag(lin.log_s.detach().double().exp())
    s = torch.linalg.svdvals(lower @ upper)
    cond_w = float(s[0] / s[-1])
    assert 1e12 < cond_w < 1e13
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(2))
    rep = audit(model, x, families="test", spectra_points=6, repeat=0)
    v = rep.verdict["test"]
    assert v.status == "not invertible"
    assert v.culprit == name, v.culprit_reason
    sp = rep.families["test"].spectra
    assert torch.allclose(sp.fwd_cond, _brute_cond(model, x[sp.index]), rtol=1e-3)
    assert float(sp.fwd_cond.min()) > 1e11
    # inverse spectra: sigma_max(J_F^-1) = 1 / sigma_min(J_F) for an exact float64 inverse
    assert torch.allclose(sp.inv_smax * sp.fwd_smin, torch.ones_like(sp.fwd_smin), rtol=1e-3)


class _Expansive(nn.Module):
    """g(x) = 1.5 Q x, Q orthogonal: Lip(g) = 1.5 > 1. F = I + 1.5 Q is invertible (|eig| = 1.5 != 1),
    but the fixed-point iteration x <- z - g(x) diverges."""

    def __init__(self, d):
        super().__init__()
        q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))[0]
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(1.5 * q)

    def forward(self, x):
        return self.lin(x)


def test_residual_block_with_lipschitz_above_one_is_found_and_blamed_on_the_model():
    torch.manual_seed(0)
    a = AdditiveCoupling((4,), hidden=8)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    block = ResidualBlock(_Expansive(4), estimator="exact", max_iter=200)
    model = Compose(a, block, Permutation((4,), kind="reverse"))
    x = torch.rand(24, 4, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = audit(model, x, families="test", spectra_points=4, repeat=0)
    v = rep.verdict["test"]
    assert v.status == "not invertible" and v.n_fail == 24
    assert v.culprit == "layers.1", v.culprit_reason
    assert v.cause == "model"  # float64 does not help a diverging fixed point
    st = rep.families["test"].localization.layer("layers.1").stats_inverse
    assert st["inverse_converged"] == 0.0
    # reference: the exact inverse (I + 1.5 Q)^-1 exists and reconstructs in float64
    w = block.g.lin.weight.detach().double()
    z = x.double() + x.double() @ w.T  # F(x) of the block alone
    back = torch.linalg.solve(torch.eye(4, dtype=torch.float64) + w, z.T).T
    assert torch.allclose(back, x.double(), atol=1e-12)


def _train(model, data, steps, lr=3e-3, seed=0):
    from stableflows.models.flow import standard_normal_log_prob

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=g)
        z, ld = model(data[idx])
        loss = -(standard_normal_log_prob(z) + ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def test_healthy_additive_flow_passes_on_its_training_data():
    from stableflows.data.digits import load_digits_raw
    from stableflows.models import nice

    raw = load_digits_raw()
    x_int = torch.from_numpy(raw.x_train[:512]).reshape(512, 64)
    torch.manual_seed(0)
    flow = nice(shape=(64,), steps_per_level=4, hidden=32)
    v = (x_int + torch.rand(x_int.shape, generator=torch.Generator().manual_seed(5))) / 17
    _train(flow.transform, v, 60)
    rep = audit(flow, x_int, levels=17, families="test", spectra_points=4, repeat=3)
    fv = rep.verdict["test"]
    assert fv.status == "invertible" and fv.n_fail == 0 and fv.culprit is None
    assert fv.max_error < 1e-4
    assert rep.families["test"].localization.culprit is None
    assert rep.verdict.invertible


def test_healthy_residual_flow_passes_on_its_training_data():
    from stableflows.data.toys import sample_toy
    from stableflows.transforms.normalization import ActNorm
    from stableflows.transforms.residual import mlp_lipschitz

    torch.manual_seed(0)
    data = torch.from_numpy(sample_toy("moons", 512, seed=0)[0])
    blocks = []
    for _ in range(2):
        blocks += [ResidualBlock(mlp_lipschitz(2, 32, coeff=0.9), estimator="exact"), ActNorm((2,))]
    model = Compose(blocks)
    model.train()
    model(data[:256])  # ActNorm initialisation
    _train(model, data, 60)
    rep = audit(model, data[:200], families="test", spectra_points=4, repeat=2)
    fv = rep.verdict["test"]
    assert fv.status == "invertible" and fv.culprit is None, rep.verdict.table()
    loc = rep.families["test"].localization
    blocks = [r for r in loc.layers if r.kind == "ResidualBlock"]
    assert blocks and all(r.stats_inverse["inverse_converged"] == 1.0 for r in blocks)
