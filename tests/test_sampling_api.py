"""The sampling API a torch.distributions / zuko / normflows user expects from a :class:`Flow`:
``sample`` (no gradient), ``rsample`` (differentiable), ``sample_and_log_prob`` /
``rsample_and_log_prob``, sample shapes (``n``, ``(4,)``, ``torch.Size([2, 3])``, ``()``).

References: the closed-form standard-normal density written out here and ``slogdet`` of the
autograd Jacobian of the inverse (float64); a flow trained by reverse KL against a Gaussian target
is checked against the target's closed-form density and moments."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from stableflows.models import classifier, glow, realnvp

IMG = (1, 4, 4)


def _prepared(flow, shape, dtype=torch.float64, seed=0):
    """``flow`` in ``dtype``, ActNorm initialised on data, parameters perturbed (no identity maps), eval mode."""
    g = torch.Generator().manual_seed(seed)
    flow = flow.to(dtype).train()
    with torch.no_grad():
        flow(0.1 + 0.8 * torch.rand(64, *shape, generator=g, dtype=dtype))
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return flow.eval()


@pytest.fixture(scope="module")
def img_flow():
    torch.manual_seed(0)
    return _prepared(glow(shape=IMG, levels=2, steps_per_level=2, hidden=8), IMG)


@pytest.mark.parametrize("shape, expect", [(4, (4,)), ((4,), (4,)), (torch.Size([2, 3]), (2, 3)), ((), ()),
                                           ([1, 2], (1, 2))])
def test_sample_shapes(img_flow, shape, expect):
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x = img_flow.sample(shape, generator=g())
    assert x.shape == (*expect, *IMG) and not x.requires_grad
    xr = img_flow.rsample(shape, generator=g())
    xs, lp = img_flow.sample_and_log_prob(shape, generator=g())
    xr2, lpr = img_flow.rsample_and_log_prob(shape, generator=g())
    assert xr.shape == xs.shape == xr2.shape == x.shape and lp.shape == lpr.shape == expect
    # one generator stream: the same draws whatever the shape, and in every method
    flat = img_flow.sample(math.prod(expect), generator=g())
    for t in (x, xr, xs, xr2):
        assert torch.equal(t.detach().reshape(flat.shape), flat)
    assert img_flow.sample_latent(shape, generator=g()).shape == (*expect, *img_flow.latent_shape)


def test_gradients_only_where_asked(img_flow):
    x = img_flow.sample(3)
    xs, lp = img_flow.sample_and_log_prob(3)
    assert not (x.requires_grad or xs.requires_grad or lp.requires_grad)
    xr, lpr = img_flow.rsample_and_log_prob(3)
    assert xr.requires_grad and lpr.requires_grad
    img_flow.zero_grad()
    (xr.sum() + lpr.sum()).backward()
    grads = [p.grad for p in img_flow.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    img_flow.zero_grad()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), ((3, 0), ValueError), (2.0, TypeError),
                                        (True, TypeError), ("4", TypeError), ((2, 1.5), TypeError)])
def test_bad_sample_shapes_are_named(img_flow, bad, error):
    for method in (img_flow.sample, img_flow.rsample, img_flow.sample_and_log_prob, img_flow.sample_latent):
        with pytest.raises(error, match="sample"):
            method(bad)
    with pytest.raises(ValueError, match="temperature"):
        img_flow.sample(2, temperature=-1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_and_log_prob_against_jacobian(img_flow, temperature):
    """log p(x) = log N(z; 0, I) - log|det dF^-1/dz| at the sampled z: the model's (T = 1) density."""
    x, lp = img_flow.sample_and_log_prob(4, temperature=temperature, generator=torch.Generator().manual_seed(1))
    z = img_flow.sample_latent(4, temperature, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z.std(), torch.tensor(temperature, dtype=z.dtype), rtol=0.5)
    d = z[0].numel()
    for b in range(4):
        jac = jacobian(lambda v: img_flow.inverse(v.reshape(1, -1))[0].reshape(-1), z[b], vectorize=True)
        ref = -0.5 * float(z[b].pow(2).sum()) - 0.5 * d * math.log(2 * math.pi) - float(torch.linalg.slogdet(jac)[1])
        assert float(lp[b]) == pytest.approx(ref, abs=1e-9)
    assert torch.allclose(lp, img_flow.log_prob(x), rtol=0, atol=1e-9)


def test_classifier_sample_accepts_shapes():
    clf = classifier(shape=IMG, levels=1, steps_per_level=1, hidden=4).eval()
    assert clf.sample((2, 3)).shape == (2, 3, *IMG)


# ----------------------------------------------------------------------------- reverse KL
TARGET_MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
TARGET_CHOL = torch.tensor([[1.0, 0.0], [0.9, 0.5]], dtype=torch.float64)  # Sigma = L L^T


def _target_log_prob(x):
    """Closed form: log N(x; m, L L^T) = -|L^-1 (x - m)|^2 / 2 - sum log L_ii - log(2 pi)  (D = 2)."""
    u = torch.linalg.solve_triangular(TARGET_CHOL.to(x.dtype), (x - TARGET_MEAN.to(x.dtype)).T, upper=False).T
    return -0.5 * u.pow(2).sum(1) - torch.log(torch.diagonal(TARGET_CHOL)).sum().to(x.dtype) - math.log(2 * math.pi)


def _kl(flow, n=4096):
    """Monte-Carlo KL(q || p) = E_q[log q(x) - log p(x)] on fixed draws."""
    x, lq = flow.sample_and_log_prob(n, generator=torch.Generator().manual_seed(2))
    return float((lq - _target_log_prob(x.double())).mean())


@pytest.mark.parametrize("build", [
    lambda: glow(shape=(2,), levels=1, steps_per_level=2, hidden=16, logit_alpha=0.0),
    lambda: realnvp(shape=(2,), levels=1, steps_per_level=4, hidden=16, logit_alpha=0.0),
], ids=["glow", "realnvp"])
def test_reverse_kl_training_reaches_a_closed_form_target(build):
    """Variational training with ``rsample_and_log_prob`` only (no data): minimise E_q[log q - log p]."""
    torch.manual_seed(0)
    flow = build()
    sigma = TARGET_CHOL @ TARGET_CHOL.T
    kl0 = _kl(flow)
    assert kl0 > 1.0  # the untrained flow (N(0, I)) is far from the target: the test can fail
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x, log_q = flow.rsample_and_log_prob(256, generator=g)
        loss = (log_q - _target_log_prob(x.double()).float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert _kl(flow) < 0.01
    probe = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a forward on data in training mode must not re-initialise the trained ActNorm
        before = flow.eval().log_prob(probe)
        flow.train().log_prob(probe)
        assert torch.equal(flow.eval().log_prob(probe), before)
        s = flow.sample(20000, generator=torch.Generator().manual_seed(4)).double()
        xs = TARGET_MEAN + torch.randn(4096, 2, generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64) @ TARGET_CHOL.T
        gap = (flow.log_prob(xs.float()).double() - _target_log_prob(xs)).abs()
    assert torch.allclose(s.mean(0), TARGET_MEAN, atol=0.04)
    assert torch.allclose(torch.cov(s.T), sigma, atol=0.05)
    assert float(gap.median()) < 0.05  # the learned density is the target's where the target has its mass
