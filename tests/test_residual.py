"""Residual blocks: fixed-point inverse accuracy, reporting of non-contractive / unconverged inverses,
implicit inverse gradients against unrolled autograd, structure of the residual branches."""
import math
import warnings

import pytest
import torch
from torch import nn

from stableflows.transforms.activations import LipSwish
from stableflows.transforms.base import InverseNotConverged, NonFiniteInputError, collect_stats, read_stats
from stableflows.transforms.lipschitz import LipschitzConv2d, SpectralLinear, lipschitz_bound, refresh_normalization
from stableflows.transforms.residual import (
    InverseNotConvergedWarning,
    NotContractiveError,
    ResidualBlock,
    conv_lipschitz,
    mlp_lipschitz,
)

D64 = torch.float64


def _saturated(g, factor=4.0):
    """Scale every weight up so that the normalisation is active: Lip bound = c ** n_layers exactly."""
    g = g.double()
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("weight"):
                p.mul_(factor)
    refresh_normalization(g)
    return g


def _forward_map(block, x):
    return x + block.g(x)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fixed_point_inverse_reaches_1e8_at_c09(kind):
    if kind == "mlp":
        g, x = mlp_lipschitz(6, 32, coeff=0.9, n_layers=2), 2.0 * torch.randn(16, 6, dtype=D64)
    else:
        g, x = conv_lipschitz(2, 8, coeff=0.9, input_shape=(4, 4)), 2.0 * torch.randn(8, 2, 4, 4, dtype=D64)
    g = _saturated(g)
    block = ResidualBlock(g, estimator="exact", inverse_atol=1e-10, inverse_rtol=0.0, max_iter=1000).eval()
    assert block.lipschitz_bound() == pytest.approx(0.9 ** (2 if kind == "mlp" else 3), rel=1e-6)
    with torch.no_grad():
        z, ld = block(x)
        x_rec, _ = block.inverse(z)
        assert "inverse_residual" not in block.stats  # a device value: only when asked
        with collect_stats():
            x_rec, ld_inv = block.inverse(z)
        residual = (_forward_map(block, x_rec) - z).abs().max()
    assert (x_rec - x).abs().max() <= 1e-8
    assert residual <= 1e-8
    stats = read_stats(block)
    assert stats["inverse_converged"] == 1.0 and stats["inverse_diverged"] == 0.0
    assert 1 < stats["inverse_iterations"] < 1000
    assert stats["inverse_residual"] <= 1e-10 and stats["contractive"] == 1.0
    assert block.last_inverse_residual.shape == (x.shape[0],)
    assert torch.allclose(ld_inv, -ld, atol=1e-10)


def _expanding_block(**kw):
    """g(x) = W x with ||W|| = 1.5 (W = 3 I normalised to coeff 1.5): Lip(g) > 1, iteration diverges."""
    lin = SpectralLinear(3, 3, bias=False, coeff=1.5).double()
    with torch.no_grad():
        lin.weight.copy_(3.0 * torch.eye(3, dtype=D64))
    lin.refresh_norm()
    return ResidualBlock(nn.Sequential(lin), estimator="exact", max_iter=200, **kw).eval()


def test_non_contractive_block_is_reported_not_silently_inverted():
    block = _expanding_block()
    assert block.lipschitz_bound() == pytest.approx(1.5)
    z = torch.randn(4, 3, dtype=D64)
    with pytest.warns(InverseNotConvergedWarning, match="diverged"):
        with torch.no_grad():
            block.inverse(z)
    assert block.stats["inverse_converged"] == 0.0
    assert block.stats["inverse_diverged"] == 1.0
    assert block.stats["contractive"] == 0.0
    assert block.stats["inverse_iterations"] < 200  # stopped as soon as it diverged
    strict = _expanding_block(strict=True)
    with pytest.raises(NotContractiveError):
        strict.inverse(z)
    with pytest.raises(NotContractiveError):
        strict(z)


class _Scale(nn.Module):
    """A residual branch without a certificate (no normalised layers): g(x) = s * x."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return self.s * x


def test_divergence_is_detected_without_a_certificate():
    block = ResidualBlock(_Scale(-1.2), estimator="exact", strict=True)
    assert block.lipschitz_bound() is None
    with pytest.raises(InverseNotConverged, match="diverged") as err:
        block.inverse(torch.randn(5, 2, dtype=D64))
    assert 1 <= err.value.iterations < block.max_iter
    assert math.isnan(block.stats["contractive"])


def test_unconverged_inverse_warns_and_strict_raises():
    g = _saturated(mlp_lipschitz(4, 16, coeff=0.95, n_layers=2))
    z = 3.0 * torch.randn(6, 4, dtype=D64)
    block = ResidualBlock(g, estimator="exact", inverse_atol=1e-14, inverse_rtol=0.0, max_iter=2).eval()
    with pytest.warns(InverseNotConvergedWarning, match="did not converge"):
        with torch.no_grad():
            block.inverse(z)
    assert block.stats["inverse_converged"] == 0.0 and block.stats["inverse_diverged"] == 0.0
    assert block.stats["inverse_iterations"] == 2.0 and block.stats["inverse_residual"] > 1e-14
    block.strict = True
    with pytest.raises(InverseNotConverged) as err:
        with torch.no_grad():
            block.inverse(z)
    assert err.value.iterations == 2 and err.value.residual > 1e-14


def test_non_finite_inverse_input_is_rejected():
    block = ResidualBlock(mlp_lipschitz(3, 4), estimator="exact")
    with pytest.raises(NonFiniteInputError):
        block.inverse(torch.tensor([[0.0, math.nan, 1.0]]))


def test_inverse_parameter_gradients_match_unrolled_autograd():
    """Implicit-function gradients of x = F^-1(z) against autograd through 200 unrolled iterations."""
    g = _saturated(mlp_lipschitz(3, 8, coeff=0.9, n_layers=2), factor=2.0)
    block = ResidualBlock(g, estimator="exact", inverse_atol=1e-13, inverse_rtol=0.0).eval()
    z = torch.randn(4, 3, dtype=D64, requires_grad=True)
    w = torch.randn(4, 3, dtype=D64)
    params = list(g.parameters())

    x, _ = block.inverse(z)
    grads = torch.autograd.grad((w * x).sum(), [z, *params])

    x_unrolled = z
    for _ in range(200):
        x_unrolled = z - g(x_unrolled)
    ref = torch.autograd.grad((w * x_unrolled).sum(), [z, *params])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    assert block.stats["inverse_grad_iterations"] >= 1


def test_inverse_does_not_update_power_iteration_and_eval_is_deterministic():
    g = mlp_lipschitz(4, 8, coeff=0.9)
    block = ResidualBlock(g, estimator="exact").double().train()
    x = torch.randn(5, 4, dtype=D64)
    with torch.no_grad():
        z, _ = block(x)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.05)
    vectors = [(n, t) for n, t in g.named_buffers() if n.endswith((".u", ".v"))]
    before = [t.clone() for _, t in vectors]
    with torch.no_grad():
        block.inverse(z)
    assert len(vectors) == 6 and all(torch.equal(a, b) for a, (_, b) in zip(before, vectors))
    block.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(block(x), block(x)))


@pytest.mark.parametrize("estimator", ["exact", "series", "roulette"])
def test_inference_mode_and_no_grad(estimator):
    """Values (no graph) under torch.no_grad / torch.inference_mode, equal to those with autograd."""
    block = ResidualBlock(mlp_lipschitz(3, 8, coeff=0.9), estimator=estimator).double().eval()
    x = torch.randn(4, 3, dtype=D64)
    results = []
    for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        torch.manual_seed(1)
        with ctx():
            z, ld = block(x)
            x_rec, _ = block.inverse(z)
        assert not ld.requires_grad or ctx is torch.enable_grad
        results.append((z.detach().clone(), ld.detach().clone(), x_rec.detach().clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_branch_structures():
    g = conv_lipschitz(3, 7, coeff=0.9, input_shape=(4, 4))
    kinds = [type(m) for m in g]
    assert kinds == [LipSwish, LipschitzConv2d, LipSwish, LipschitzConv2d, LipSwish, LipschitzConv2d]
    assert [m.kernel_size for m in g if isinstance(m, LipschitzConv2d)] == [(3, 3), (1, 1), (3, 3)]
    assert [(m.in_channels, m.out_channels) for m in g if isinstance(m, LipschitzConv2d)] == [(3, 7), (7, 7), (7, 3)]
    assert lipschitz_bound(g) <= 0.9 ** 3 + 1e-6
    mlp = mlp_lipschitz(5, 11, n_layers=4, activation="elu", preact=True, norm="inf", coeff=0.5)
    assert len(mlp) == 8 and mlp[1].in_features == 5 and mlp[-1].out_features == 5
    assert all(m.norm == "inf" for m in mlp if isinstance(m, nn.Linear))
    assert lipschitz_bound(mlp) <= 0.5 ** 4 + 1e-12


def test_block_state_dict_round_trip_with_lazy_conv():
    torch.manual_seed(3)
    block = ResidualBlock(conv_lipschitz(2, 4), estimator="exact").double()
    x = torch.randn(2, 2, 3, 5, dtype=D64)
    block.train()
    with torch.no_grad():
        block(x)
    fresh = ResidualBlock(conv_lipschitz(2, 4), estimator="exact").double()
    fresh.load_state_dict(block.state_dict())
    block.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], block(x)[0])


def test_bad_block_arguments():
    with pytest.raises(TypeError):
        ResidualBlock(lambda t: t)
    with pytest.raises(ValueError):
        ResidualBlock(nn.Identity(), estimator="magic")
    with pytest.raises(ValueError):
        ResidualBlock(nn.Identity(), inverse_atol=0.0, inverse_rtol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ResidualBlock(nn.Identity(), estimator="roulette", dist="poisson", p=3.0)


def test_squeeze_first_runs_every_block_at_half_resolution_and_checks_its_shapes():
    """002's ImageNet architecture (Image -> Squeeze -> Logit -> blocks): on 1x28x28 every conv block of
    the first scale sees 4x14x14 and the second 16x7x7 (without it: 1x28x28 and 4x14x14)."""
    from stableflows.models.residual import resflow
    from stableflows.transforms.base import ShapeError

    seen = set()

    def shapes(model):
        hooks = [b.register_forward_pre_hook(lambda m, a: seen.add(tuple(a[0].shape[1:])))
                 for b in model.modules() if isinstance(b, ResidualBlock)]
        x = torch.rand(2, 1, 28, 28) * 0.9 + 0.05
        with torch.no_grad():
            model.eval()
            z = model.transform(x)[0]
        for h in hooks:
            h.remove()
        out = set(seen)
        seen.clear()
        return out, z

    fast, z = shapes(resflow(shape=(1, 28, 28), levels=2, steps_per_level=1, hidden=4, squeeze_first=True))
    assert fast == {(4, 14, 14), (16, 7, 7)} and z.shape == (2, 784)
    full, _ = shapes(resflow(shape=(1, 28, 28), levels=2, steps_per_level=1, hidden=4))
    assert full == {(1, 28, 28), (4, 14, 14)}
    with pytest.raises(ShapeError, match="squeeze 2 times .one of them squeeze_first.*divisible by 4"):
        resflow(shape=(1, 6, 6), levels=2, squeeze_first=True)
    with pytest.raises(ValueError, match="squeeze_first squeezes images"):
        resflow(shape=(8,), squeeze_first=True)
