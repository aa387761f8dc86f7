"""Conditional flows (cINNs): the mathematics at fixed context against independent references,
the context API (sampling shapes, bound contexts, named errors), checkpoints and host syncs.

References: float64 autograd Jacobians + ``slogdet``, ``torch.distributions`` Gaussians whose
parameters are written out from the conditioner's weights, and hand-computed maps.
"""
import copy
import math

import pytest
import torch
from torch import nn

from stableflows.bench.syncs import eval_syncs, training_step_syncs
from stableflows.config import ModelConfig
from stableflows.models import build_model, cinn, glow, make_conditional, nice, one_hot
from stableflows.transforms.base import ContextError, Compose, bind_context, requires_context, validation
from stableflows.transforms.conditional import (ConditionalAdditiveCoupling, ConditionalAffineCoupling,
                                                ConditionalElementwiseAffine, ConditionalSplineCoupling)
from stableflows.train.objectives import Batch, ConditionalMaximumLikelihood

torch.set_default_dtype(torch.float32)


def _initialised(flow, x, c):
    """ActNorm initialised on (x, c), eval mode, parameters perturbed (conditioners non-trivial)."""
    flow.train()
    with torch.no_grad():
        flow.log_prob(x, context=c)
    flow.eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


# ----------------------------------------------------------------------------- mathematics
@pytest.mark.parametrize("coupling", ["affine", "additive", "spline"])
def test_log_prob_is_base_plus_slogdet_of_the_jacobian_in_x_at_fixed_context(coupling):
    torch.manual_seed(0)
    flow = cinn(shape=(1, 4, 4), context_features=3, levels=2, steps_per_level=2, hidden=8,
                coupling=coupling).double()
    x = 0.05 + 0.9 * torch.rand(8, 1, 4, 4, dtype=torch.float64)
    c = one_hot(torch.arange(8) % 3, 3, dtype=torch.float64)
    _initialised(flow, x, c)
    lp = flow.log_prob(x, context=c)
    for b in range(4):
        cb = c[b:b + 1]

        def f(v):
            return flow(v.reshape(1, 1, 4, 4), cb)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[b].reshape(-1))
        z = f(x[b].reshape(-1))
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + torch.linalg.slogdet(jac)[1]
        assert abs(float(lp[b]) - float(ref)) < 1e-9
        x_rec = flow.inverse(z[None], cb)[0]
        assert float((x_rec.reshape(-1) - x[b].reshape(-1)).abs().max()) < 1e-10


class _LinearNet(nn.Module):
    """Conditioner ``(x_a, c) -> (t, s) = (alpha x_a + beta c + gamma, kappa c)`` written out."""

    def __init__(self, alpha, beta, gamma, kappa):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.kappa = alpha, beta, gamma, kappa

    def forward(self, inp):  # (B, 2): [x_a, c] -> (B, 2): [t, raw scale]
        xa, c = inp[:, :1], inp[:, 1:]
        return torch.cat([self.alpha * xa + self.beta * c + self.gamma, self.kappa * c], dim=1)


def test_conditional_density_of_a_linear_conditioner_is_the_written_out_gaussian():
    """z_a = x_a, z_b = x_b e^{s(c)} + t(x_a, c) with z ~ N(0, I): then x | c is Gaussian with mean
    (0, -(beta c + gamma) e^{-s}) and covariance [[1, -alpha e^{-s}], [-alpha e^{-s}, (alpha^2 + 1) e^{-2s}]]."""
    alpha, beta, gamma, kappa = 0.7, -1.3, 0.4, 0.5
    layer = ConditionalAffineCoupling((2,), context_shape=1, hidden=4, scale="exp").double()
    layer.net = _LinearNet(alpha, beta, gamma, kappa)
    from stableflows.models.flow import Flow

    flow = Flow(Compose(layer), (2,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64) * 2
    c = torch.randn(50, 1, generator=g, dtype=torch.float64)
    lp = flow.log_prob(x, context=c)
    for i in range(50):
        s = kappa * float(c[i])
        e = math.exp(-s)
        mean = torch.tensor([0.0, -(beta * float(c[i]) + gamma) * e], dtype=torch.float64)
        cov = torch.tensor([[1.0, -alpha * e], [-alpha * e, (alpha ** 2 + 1) * e * e]], dtype=torch.float64)
        ref = torch.distributions.MultivariateNormal(mean, cov).log_prob(x[i])
        assert abs(float(lp[i]) - float(ref)) < 1e-10


def test_class_conditional_prior_is_the_gaussian_of_its_linear_map():
    layer = ConditionalElementwiseAffine((3, 2, 2), context_shape=4).double()
    with torch.no_grad():
        layer.linear.weight.normal_(0, 0.5)
        layer.linear.bias.normal_(0, 0.5)
    from stableflows.models.flow import Flow

    flow = Flow(layer, (3, 2, 2))
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    c = torch.randn(6, 4, dtype=torch.float64)
    w, b = layer.linear.weight.detach(), layer.linear.bias.detach()
    h = c @ w.T + b  # (6, 6): channel k has mu = h[:, 2k], logs = h[:, 2k + 1]
    mu, sigma = h[:, 0::2, None, None], h[:, 1::2, None, None].exp()
    ref = torch.distributions.Normal(mu, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(flow.log_prob(x, context=c), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: ConditionalAffineCoupling((4, 2, 2), context_shape=3, hidden=8, scale="exp"),
    lambda: ConditionalAffineCoupling((6,), context_shape=3, hidden=8, scale="biased_sigmoid"),
    lambda: ConditionalAdditiveCoupling((6,), context_shape=3, hidden=8),
    lambda: ConditionalSplineCoupling((4, 2, 2), context_shape=(2, 4, 4), hidden=8),
    lambda: ConditionalElementwiseAffine((6,), context_shape=3),
], ids=["affine_img", "affine_vec_biased", "additive", "spline_imgctx", "prior"])
def test_zero_initialised_layer_is_the_identity_for_every_context_and_context_matters_once_trained(make):
    layer = make().double()
    shape = layer.shape
    cs = layer.context_shape
    x = torch.randn(16, *shape, dtype=torch.float64)
    for _ in range(3):
        c = 3 * torch.randn(16, *cs, dtype=torch.float64)
        z, ld = layer(x, c)
        assert torch.allclose(z, x, rtol=0, atol=1e-6)  # exact but for the spline's rounding of equal bins
        assert float(ld.abs().max()) < 1e-6
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    c1, c2 = torch.randn(16, *cs, dtype=torch.float64), torch.randn(16, *cs, dtype=torch.float64)
    z1, z2 = layer(x, c1)[0], layer(x, c2)[0]
    assert float((z1 - z2).abs().max()) > 1e-3  # the output depends on the context
    assert float((layer.inverse(z1, c1)[0] - x).abs().max()) < 1e-10


def test_sigmoid_scale_starts_as_the_same_map_for_every_context():
    """Glow's sigma(s + 2) is not 1 at s = 0: a zero-initialised block is a fixed scaling, independent of c."""
    layer = ConditionalAffineCoupling((6,), context_shape=2, hidden=8)
    x = torch.randn(5, 6)
    z1, ld1 = layer(x, torch.randn(5, 2))
    z2, ld2 = layer(x, torch.randn(5, 2))
    assert torch.equal(z1, z2) and torch.equal(ld1, ld2)
    assert torch.allclose(z1[:, 3:], x[:, 3:] * torch.sigmoid(torch.tensor(2.0)))


# ----------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    f = cinn(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=8)
    x = 0.05 + 0.9 * torch.rand(40, 1, 8, 8)
    return _initialised(f, x, one_hot(torch.arange(40) % 10, 10))


def test_sampling_shapes_follow_the_context_batch(flow):
    c = one_hot(torch.tensor([1, 4, 7]), 10)
    assert flow.sample(context=c).shape == (3, 1, 8, 8)  # one per context row
    assert flow.sample(5, context=c).shape == (5, 3, 1, 8, 8)  # five per row
    assert flow.sample((2, 4), context=c).shape == (2, 4, 3, 1, 8, 8)
    assert flow.sample(6, context=c[0]).shape == (6, 1, 8, 8)  # a single context
    x, lp = flow.sample_and_log_prob(4, context=c, temperature=0.5)
    assert x.shape == (4, 3, 1, 8, 8) and lp.shape == (4, 3)
    rows = c.expand(4, 3, 10).reshape(12, 10)  # draw-major: sample i of context j is row 3 i + j
    assert torch.allclose(lp.reshape(12), flow.log_prob(x.reshape(12, 1, 8, 8), context=rows), atol=1e-4)


def test_samples_of_a_row_are_those_of_its_context(flow):
    c = one_hot(torch.tensor([2, 5]), 10)
    g = torch.Generator().manual_seed(3)
    both = flow.sample(3, context=c, generator=g)  # (3, 2, ...)
    z = flow.sample_latent(6, generator=torch.Generator().manual_seed(3))
    ref = flow.inverse(z, c.repeat(3, 1))[0].reshape(3, 2, 1, 8, 8)
    assert torch.equal(both, ref)


def test_rsample_is_differentiable_in_the_conditioners(flow):
    c = one_hot(torch.tensor([0, 3]), 10)
    x, lp = flow.rsample_and_log_prob(4, context=c)
    flow.zero_grad()
    (x.sum() + lp.sum()).backward()
    grads = [p.grad for m in flow.modules() if isinstance(m, ConditionalAffineCoupling) for p in m.net.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    flow.zero_grad()


def test_bound_context_is_the_given_one_and_leaves_nothing_behind(flow):
    x = 0.05 + 0.9 * torch.rand(7, 1, 8, 8)
    c = one_hot(torch.tensor(6), 10)
    keys = set(flow.state_dict())
    assert requires_context(flow)
    with bind_context(flow, c):
        assert not requires_context(flow)
        lp = flow.log_prob(x)  # no context needed inside
        shadow = copy.deepcopy(flow).double()  # copies carry the bound context, in their dtype
        lp64 = shadow.log_prob(x.double())
        assert set(flow.state_dict()) == keys
    assert torch.equal(lp, flow.log_prob(x, context=c.expand(7, 10)))
    assert torch.allclose(lp64, lp.double(), atol=1e-3)
    assert requires_context(flow) and set(flow.state_dict()) == keys
    with pytest.raises(ContextError, match="conditional: give context="):
        flow.log_prob(x)


@pytest.mark.parametrize("call, match", [
    (lambda f, x, c: f.log_prob(x), "this flow is conditional: give context= of shape \\(batch, 10\\)"),
    (lambda f, x, c: f(x), "this flow is conditional"),
    (lambda f, x, c: f.inverse(torch.randn(4, 64)), "this flow is conditional"),
    (lambda f, x, c: f.log_prob(x, context=c[:3]), "context has 3 rows but the input has 4 examples"),
    (lambda f, x, c: f.log_prob(x, context=c[:, :9]), "context must have shape \\(batch, 10\\), got \\(4, 9\\)"),
    (lambda f, x, c: f.log_prob(x, context=torch.arange(4)), "floating-point tensor, got dtype torch.int64"),
    (lambda f, x, c: f.log_prob(x, context=c.double()), "dtype torch.float64 but the model computes in torch.float32"),
    (lambda f, x, c: f.sample(3), "give context= of shape \\(10\\) or \\(batch, 10\\) to sample"),
    (lambda f, x, c: f.sample(3, context=torch.zeros(3, 4)), "context must have shape \\(\\*batch, 10\\)"),
    (lambda f, x, c: one_hot(torch.tensor([0, 10]), 10), "labels must lie in \\[0, 9\\]"),
    (lambda f, x, c: one_hot(c, 10), "labels must be an integer tensor"),
    (lambda f, x, c: [m for m in f.modules() if isinstance(m, ConditionalAffineCoupling)][0](
        torch.randn(4, 4, 4, 4)), "ConditionalAffineCoupling is conditional"),
])
def test_missing_or_mismatched_context_is_a_named_error(flow, call, match):
    x = 0.05 + 0.9 * torch.rand(4, 1, 8, 8)
    c = one_hot(torch.arange(4), 10)
    with pytest.raises(ContextError, match=match):
        call(flow, x, c)


def test_nonfinite_context_is_refused_by_the_density(flow):
    from stableflows.transforms.base import NonFiniteInputError

    x = 0.05 + 0.9 * torch.rand(4, 1, 8, 8)
    with pytest.raises(NonFiniteInputError, match="context contains 40 NaN"):
        flow.log_prob(x, context=one_hot(torch.arange(4), 10) * math.nan)


def test_unconditional_models_refuse_a_context():
    g = glow(shape=(1, 8, 8), levels=1, steps_per_level=1, hidden=4)
    x = 0.05 + 0.9 * torch.rand(2, 1, 8, 8)
    for call in (lambda: g.log_prob(x, context=torch.zeros(2, 3)), lambda: g.sample(2, context=torch.zeros(3)),
                 lambda: g.transform(x, torch.zeros(2, 3))):
        with pytest.raises(ContextError, match="not conditional"):
            call()
    with pytest.raises(ContextError, match="no conditional layer"):
        with bind_context(g, torch.zeros(3)):
            pass


def test_factory_and_config():
    with pytest.raises(ValueError, match="not both"):
        cinn(shape=(1, 8, 8), context_features=3, context_shape=(3,))
    with pytest.raises(TypeError, match="no coupling"):
        make_conditional(build_model(ModelConfig(model="resflow", hidden=4, levels=1, steps_per_level=1,
                                                 estimator="exact"), (2,)), context_shape=2)
    f = build_model(ModelConfig(model="cinn", hidden=8, levels=1, steps_per_level=2, context_features=4), (1, 8, 8))
    assert f.context_shape == (4,) and f.config.context_features == 4
    g = build_model(ModelConfig(model="cinn", hidden=8, levels=1, steps_per_level=2, n_classes=7), (1, 8, 8))
    assert g.context_shape == (7,)
    g.load_state_dict(copy.deepcopy(g).state_dict())  # no bound-context or other stray entries
    n = make_conditional(nice(shape=(6,), hidden=8), context_shape=2)
    assert sum(isinstance(m, ConditionalAdditiveCoupling) for m in n.modules()) == 4
    assert sum(isinstance(m, ConditionalElementwiseAffine) for m in n.modules()) == 1


# ----------------------------------------------------------------------------- host syncs
def test_conditional_training_step_reads_the_device_once_and_evaluation_never(flow):
    f = copy.deepcopy(flow)
    x = 0.05 + 0.9 * torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    objective = ConditionalMaximumLikelihood(10, levels=17)

    def log_prob(v):  # the objective's own path: labels -> one-hot context -> log p(v | y)
        return objective.log_prob(f, Batch(x=v, raw=v, y=y, levels=17))

    assert training_step_syncs(f, log_prob, x) == 1  # the loop's finiteness check
    assert eval_syncs(f, log_prob, x) == 0
    with validation(False):
        assert torch.equal(log_prob(x), f.log_prob(x, context=one_hot(y, 10)))


def test_readme_conditional_snippet_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "cinn(" in b]
    env: dict = {}
    exec(compile(block, "README.md (cinn)", "exec"), env)
    assert env["report"].verdict.invertible and len(env["report"].families) == 40  # 4 families x 10 classes
