"""PGD attack on the reconstruction error: it beats random search with the same budget on a
briefly trained affine Glow (digits), every attacked point lies in its constraint set, and the
reported error is the one of the model's converged inverse (recomputed here).
"""
import math
import warnings

import pytest
import torch

from stableflows.audit import as_invertible, audit, pgd_attack, random_search

LEVELS = 17


@pytest.fixture(scope="module")
def trained_glow():
    """An affine Glow (sigmoid scales, no logit) on digits in [0, 1], 150 Adam steps."""
    from stableflows.data.digits import load_digits_raw
    from stableflows.models import glow

    raw = load_digits_raw()
    xtr, xte = torch.from_numpy(raw.x_train), torch.from_numpy(raw.x_test)
    torch.manual_seed(0)
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=16, coupling="affine", scale="sigmoid",
                logit_alpha=0.0)
    opt = torch.optim.Adam(flow.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    flow.train()
    for _ in range(150):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        v = (xtr[idx] + torch.rand(64, 1, 8, 8, generator=g)) / LEVELS
        loss = -flow.log_prob(v).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    bpd = float(loss.detach()) / (64 * math.log(2)) + math.log2(LEVELS)
    assert bpd < 3.6  # it did learn something (uniform: 4.09)
    return flow, xte[:32]


def _ref_err(flow, x):
    with torch.no_grad():
        xh = flow.inverse(flow(x)[0])[0]
    e = torch.linalg.norm((xh.double() - x.double()).reshape(x.shape[0], -1), dim=1)
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


def _in_box(c, x, x0, x_int, eps, widen):
    """Membership of every attacked point in its constraint set, from the definitions."""
    if c == "cell":  # the dequantisation cell [x_int / L, (x_int + 1) / L)
        return (x >= x_int / LEVELS) & (x < (x_int + 1) / LEVELS)
    if c == "linf":  # ||x - x0||_inf <= eps within the data range [0, 1]
        return ((x - x0).abs() <= eps * (1 + 1e-6)) & (x >= 0) & (x <= 1)
    return (x >= -widen) & (x <= 1 + widen)  # [0, 1] widened by `widen` on each side


def test_pgd_beats_random_search_with_the_same_budget(trained_glow):
    flow, xi = trained_glow
    x0 = (xi + 0.5) / LEVELS
    m = as_invertible(flow)
    pgd = pgd_attack(m, x0, constraint="range", x_int=xi, levels=LEVELS, steps=20, seed=0)
    rnd = random_search(m, x0, constraint="range", x_int=xi, levels=LEVELS, points=pgd.evaluations, seed=0)
    assert rnd.evaluations == pgd.evaluations == 21
    # the errors the attack reports are those of the model's own round trip at the returned points
    assert torch.allclose(pgd.best_err, _ref_err(flow, pgd.best_x), rtol=1e-9)
    assert torch.allclose(rnd.best_err, _ref_err(flow, rnd.best_x), rtol=1e-9)
    assert torch.allclose(pgd.start_err, _ref_err(flow, x0), rtol=1e-9)
    p, r = pgd.best_err.nan_to_num(posinf=1e300), rnd.best_err.nan_to_num(posinf=1e300)
    assert float((p > r).double().mean()) >= 0.9, (p, r)
    assert float(p.median()) > 100 * float(r.median())
    assert float(p.median()) > 100 * float(pgd.start_err.median())
    # the same through audit(..., attack="pgd"): the report keeps both and the verdict fails
    rep = audit(flow, xi, levels=LEVELS, families="test", spectra_points=0, repeat=0, localize=False,
                attack="pgd", attack_kwargs=dict(constraints=("range",), examples=32, steps=20), tolerance=1e-3)
    a = rep.attacks["pgd:range"]
    assert a.random.evaluations == a.pgd.evaluations == 21
    assert float(a.pgd.best_err.median()) > 10 * float(a.random.best_err.median())
    assert rep.verdict["pgd:range"].status == "not invertible"
    assert rep.verdict["test"].status == "invertible"


def test_attacked_points_lie_in_their_constraint_sets(trained_glow):
    flow, xi = trained_glow
    xi = xi[:16]
    x0 = (xi + 0.5) / LEVELS
    m = as_invertible(flow)
    eps, widen = 0.03, 0.2
    for c in ("cell", "linf", "range"):
        for rs in (True, False):
            res = pgd_attack(m, x0, constraint=c, x_int=xi, levels=LEVELS, eps=eps, widen=widen, steps=6,
                             step_size=0.1, random_start=rs, seed=1)  # a large step: projection must act
            assert bool(_in_box(c, res.best_x, x0, xi, eps, widen).all()), (c, rs)
            assert res.settings["steps"] == 6 and res.settings["random_start"] is rs
        rnd = random_search(m, x0, constraint=c, x_int=xi, levels=LEVELS, eps=eps, widen=widen, points=5)
        assert bool(_in_box(c, rnd.best_x, x0, xi, eps, widen).all()), c


def test_fixed_point_cap_during_the_attack_and_converged_final_error():
    """Residual blocks: the attack may cap the fixed-point iterations; the reported error is
    measured with the block's own converged inverse (recomputed here)."""
    from stableflows.transforms.base import Compose
    from stableflows.transforms.coupling import AdditiveCoupling
    from stableflows.transforms.residual import ResidualBlock, mlp_lipschitz

    torch.manual_seed(0)
    a = AdditiveCoupling((4,), hidden=8)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    block = ResidualBlock(mlp_lipschitz(4, 16, coeff=0.9), estimator="exact")
    model = Compose(a, block).eval()
    x0 = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    calls = []
    orig = block._inverse

    def spy(z):
        calls.append(block.max_iter)
        return orig(z)

    block._inverse = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pgd_attack(as_invertible(model), x0, constraint="linf", eps=0.05, steps=4,
                             fixed_point_iterations=2)
    finally:
        del block._inverse
    assert 2 in calls and calls[-1] != 2  # capped during the steps, not for the final measurement
    assert block.max_iter != 2  # restored
    with torch.no_grad():
        xh = model.inverse(model(res.best_x)[0])[0]
    ref = torch.linalg.norm((xh - res.best_x).double(), dim=1)
    assert torch.allclose(res.best_err, ref, rtol=1e-9, atol=1e-15)
    assert float(ref.max()) < 1e-4  # the converged inverse reconstructs


def test_the_verdict_judges_the_worse_of_pgd_and_the_random_baseline():
    """A map whose inverse overflows only far from the data (any coordinate above 1.1, inside the
    widened range [-0.2, 1.2]) and is exact elsewhere: PGD sees a zero gradient and stays at its start
    near the data, the random baseline draws whole points from the box and finds the overflow. The
    attack's verdict must report it (before, it judged PGD's points alone and said invertible)."""
    def forward(x):
        return x.clone()

    def inverse(z):
        return torch.where((z > 1.1).any(dim=1, keepdim=True), torch.full_like(z, math.inf), z)

    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    rep = audit((forward, inverse), x, families="test", spectra_points=0, repeat=0, localize=False, shadow=False,
                attack="pgd", attack_kwargs=dict(constraints=("range",), examples=16, steps=20, widen=0.2,
                                                 data_range=(0.0, 1.0)), budget=None)
    a = rep.attacks["pgd:range"]
    assert bool(torch.isfinite(a.pgd.best_err).all()) and float(a.pgd.best_err.max()) == 0.0
    hit = ~torch.isfinite(a.random.best_err)
    assert int(hit.sum()) >= 8  # P(a draw misses) = (1.3 / 1.4) ** 4 per point, 21 points per example
    assert torch.equal(a.from_random, hit)
    assert rep.verdict["pgd:range"].status == "not invertible"
    assert rep.verdict["pgd:range"].n_nonfinite == int(hit.sum())
    assert rep.verdict["test"].status == "invertible"
    assert rep.to_dict()["attacks"]["pgd:range"]["n_from_random"] == int(hit.sum())
    assert any("random baseline found the worse point" in n for n in rep.notes)


def test_a_nan_reconstruction_is_a_success_of_the_attack_not_an_unevaluated_point():
    """An inverse that returns NaN (inf - inf) where the first coordinate exceeds 0.5: PGD must count
    those examples as non-finite (error inf, found at its first evaluation), not drop them as if
    they had never been evaluated (before: best error NaN, reported as outside the domain)."""
    def forward(x):
        return x.clone()

    def inverse(z):
        return torch.where(z[:, :1] > 0.5, torch.full_like(z, math.nan), z)

    x0 = torch.tensor([[0.9, 0.2], [0.8, 0.3], [0.1, 0.2], [0.2, 0.4]], dtype=torch.float64)
    m = as_invertible((forward, inverse))
    res = pgd_attack(m, x0, constraint="linf", eps=0.01, steps=5, seed=0)
    assert torch.isinf(res.best_err[:2]).all() and res.best_err[:2].gt(0).all()
    assert torch.equal(res.best_err[2:], torch.zeros(2, dtype=torch.float64))
    assert res.pct_nonfinite == 50.0
    assert bool((res.best_x[:2, 0] > 0.5).all())
