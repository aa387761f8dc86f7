"""Targeted checks of the coupling family and Glow layers against independent references."""
import math
import os
import tempfile
import threading

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stableflows.transforms import (
    SCALES, ActNorm, AdditiveCoupling, AffineCoupling, InputOutsideDomain, Invertible1x1, Logit, Permutation,
    ShapeError, Squeeze, make_scale,
)
from stableflows.transforms.base import collect_stats, read_stats



from conftest import perturb

pytestmark = pytest.mark.usefixtures("float64")


# ----------------------------------------------------------------------------- ActNorm
@pytest.mark.parametrize("shape", [(3,), (3, 4, 5)])
def test_actnorm_init_gives_zero_mean_unit_variance(shape):
    scale = torch.tensor([0.5, 3.0, 20.0]).view(1, 3, *[1] * (len(shape) - 1))
    x = 7.0 + scale * torch.randn(64, *shape)
    layer = ActNorm(shape).train()
    z, _ = layer(x)
    dims = [0, *range(2, z.dim())]
    mean = z.mean(dim=dims)
    var = z.var(dim=dims, unbiased=False)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-10)
    assert torch.allclose(var, torch.ones(3), atol=1e-5)  # std / (std + 1e-6)
    assert bool(layer.initialized)


def test_actnorm_does_not_init_in_eval_or_twice():
    x = 5.0 + 2.0 * torch.randn(32, 3)
    layer = ActNorm((3,)).eval()
    z, _ = layer(x)
    assert torch.equal(z, x) and not bool(layer.initialized)
    layer.train()
    layer(x)
    bias = layer.bias.clone()
    layer(x + 100.0)  # a second training batch must not re-initialise
    assert torch.equal(layer.bias, bias)


def test_actnorm_init_survives_state_dict_roundtrip():
    x = 3.0 + 4.0 * torch.randn(32, 2, 3, 3)
    layer = ActNorm((2, 3, 3)).train()
    layer(x)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "actnorm.pt")
        torch.save(layer.state_dict(), path)
        state = torch.load(path, weights_only=True)
    restored = ActNorm((2, 3, 3)).train()
    restored.load_state_dict(state)
    assert bool(restored.initialized)
    other = torch.randn(8, 2, 3, 3)  # a training-mode batch with other statistics
    assert torch.equal(restored(other)[0], layer(other)[0])
    fresh = ActNorm((2, 3, 3)).train()  # control: without the state it re-initialises on `other`
    assert not torch.allclose(fresh(other)[0], layer(other)[0])


class _ThreadRanks:
    """A stand-in for torch.distributed with one thread per rank: ``all_reduce`` (sum) really
    exchanges the tensors of all ranks, so the layer's pooling code runs unchanged."""

    def __init__(self, world):
        self.world, self.local = world, threading.local()
        self.barrier, self.slots = threading.Barrier(world), {}

    def all_reduce(self, t, op=None):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[r] for r in range(self.world))
        self.barrier.wait()
        t.copy_(total)

    def run(self, fn, *args):
        out, errors = {}, []

        def target(rank):
            self.local.rank = rank
            try:
                out[rank] = fn(rank, *args)
            except Exception as e:  # surfaced below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out


def test_actnorm_init_is_pooled_across_ranks(monkeypatch):
    # two ranks with different data and batch sizes must get the statistics of the pooled data
    data = [torch.randn(10, 3) * 2 + 1, torch.randn(6, 3) * 0.5 - 3]
    ranks = _ThreadRanks(2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", ranks.all_reduce)

    def init(rank):
        layer = ActNorm((3,)).train()
        layer(data[rank])
        return layer.bias.detach(), layer.logs.detach()

    out = ranks.run(init)
    pooled = torch.cat(data)
    mean, std = pooled.mean(0), pooled.std(0, unbiased=False)
    for rank in range(2):
        bias, logs = out[rank]
        assert torch.allclose(bias, -mean, atol=1e-12)
        assert torch.allclose(logs, -torch.log(std + 1e-6), atol=1e-12)
    assert not torch.allclose(out[0][0], -data[0].mean(0))  # not the local statistics


# ----------------------------------------------------------------------------- Logit
@pytest.mark.parametrize("bad", [1.2, -0.1, math.nan])
def test_logit_raises_outside_domain(bad):
    x = torch.full((2, 4), 0.5)
    x[1, 2] = bad
    with pytest.raises(InputOutsideDomain, match="found values in"):
        Logit(0.05)(x)


def test_logit_message_names_range_and_alpha0_endpoints():
    with pytest.raises(InputOutsideDomain, match=r"\[-0\.5, 2\]"):
        Logit(0.05)(torch.tensor([[-0.5, 0.3, 2.0]]))
    with pytest.raises(InputOutsideDomain):
        Logit(0.0)(torch.tensor([[0.0, 0.3]]))  # logit(0) = -inf
    z, ld = Logit(0.05)(torch.tensor([[0.0, 1.0]]))  # endpoints are fine when alpha > 0
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()


def test_logit_domain_is_the_image_of_its_inverse():
    """With alpha > 0 the inverse maps R onto (-a/(1-2a), (1-a)/(1-2a)), wider than [0, 1]: samples
    land there, and the forward pass must take them back (else every sample is a false alarm)."""
    a = 0.05
    lo, hi = -a / (1 - 2 * a), (1 - a) / (1 - 2 * a)
    assert Logit(a).domain() == pytest.approx((lo, hi), abs=1e-15)
    y = torch.tensor([[-12.0, -4.0, 0.0, 4.0, 12.0]], dtype=torch.float64)  # |y| >> 12: 1 - sigmoid(y) cancels
    x, _ = Logit(a).inverse(y)
    assert float(x.min()) < 0 and float(x.max()) > 1  # outside [0, 1], inside the domain
    y2, _ = Logit(a)(x)
    np.testing.assert_allclose(y2.numpy(), y.numpy(), rtol=1e-9, atol=1e-9)
    for bad in (lo, hi, lo - 1e-3, hi + 1e-3):  # open interval: the ends map to -inf / inf
        with pytest.raises(InputOutsideDomain, match="open interval"):
            Logit(a)(torch.tensor([[0.5, bad]], dtype=torch.float64))


def test_logit_matches_closed_form():
    a = 0.05
    x = torch.tensor([[0.0, 0.2, 0.5, 0.99]])
    z, ld = Logit(a)(x)
    u = a + (1 - 2 * a) * x.numpy()
    np.testing.assert_allclose(z.numpy(), np.log(u / (1 - u)), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(ld.numpy(), np.sum(np.log((1 - 2 * a) / (u * (1 - u))), axis=1), rtol=1e-13)
    with pytest.raises(ValueError):
        Logit(0.5)


# ----------------------------------------------------------------------------- Squeeze
def test_squeeze_matches_loop_reference():
    x = torch.randn(2, 3, 4, 6)
    z, ld = Squeeze(2)(x)
    ref = torch.empty(2, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                ref[:, c * 4 + i * 2 + j] = x[:, c, i::2, j::2]
    assert torch.equal(z, ref) and torch.equal(ld, torch.zeros(2))
    assert torch.equal(Squeeze(2).inverse(z)[0], x)


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (1, 1, 4, 3), (2, 8)])
def test_squeeze_raises_shape_error(shape):
    with pytest.raises(ShapeError):
        Squeeze(2)(torch.randn(*shape))


def test_squeeze_inverse_raises_on_bad_channels():
    with pytest.raises(ShapeError):
        Squeeze(2).inverse(torch.randn(1, 3, 2, 2))


# ----------------------------------------------------------------------------- Invertible 1x1
def _columns(layer, c):
    """The matrix of a linear layer on vectors, read off its action on the basis (independent of W)."""
    return layer(torch.eye(c))[0].T


def test_lu_matrix_is_plu_product_and_logdet_is_slogdet():
    c = 5
    layer = perturb(Invertible1x1((c,), lu=True), std=0.5)
    p = layer.perm.numpy()
    lower = np.tril(layer.lower.detach().numpy(), -1) + np.eye(c)
    upper = np.triu(layer.upper.detach().numpy(), 1) + np.diag(layer.sign_s.numpy() * np.exp(layer.log_s.detach().numpy()))
    w = p @ lower @ upper
    assert np.allclose(np.sort(p, axis=1)[:, -1], 1) and np.allclose(p.sum(0), 1)  # permutation matrix
    np.testing.assert_allclose(_columns(layer, c).detach().numpy(), w, atol=1e-13)
    _, ld = layer(torch.randn(3, c))
    np.testing.assert_allclose(ld.detach().numpy(), np.linalg.slogdet(w)[1], atol=1e-12)
    # the init is a random orthogonal matrix, factored as scipy's LU would
    fresh = Invertible1x1((c,), lu=True)
    w0 = _columns(fresh, c).detach().numpy()
    np.testing.assert_allclose(w0 @ w0.T, np.eye(c), atol=1e-12)
    p_ref, l_ref, u_ref = scipy.linalg.lu(w0)
    np.testing.assert_allclose(p_ref @ l_ref @ u_ref, w0, atol=1e-12)
    np.testing.assert_allclose(abs(np.linalg.slogdet(w0)[1]), 0.0, atol=1e-12)


@pytest.mark.parametrize("lu", [True, False])
def test_1x1_on_images_is_a_1x1_convolution(lu):
    layer = perturb(Invertible1x1((4, 3, 2), lu=lu), std=0.3)
    x = torch.randn(2, 4, 3, 2)
    z, ld = layer(x)
    w = layer.weight_matrix().detach()
    assert torch.allclose(z, F.conv2d(x, w.view(4, 4, 1, 1)), atol=1e-13)
    assert torch.allclose(ld, torch.full((2,), 6 * np.linalg.slogdet(w.numpy())[1]), atol=1e-11)
    assert torch.allclose(layer.inverse(z)[0], x, atol=1e-12)


def test_permutation_kinds():
    x = torch.arange(6.0).view(1, 6)
    assert torch.equal(Permutation((6,), kind="reverse")(x)[0], x.flip(1))
    a = Permutation((6,), kind="shuffle", seed=7)(x)[0]
    b = Permutation((6,), kind="shuffle", seed=7)(x)[0]
    assert torch.equal(a, b) and sorted(a[0].tolist()) == x[0].tolist()
    with pytest.raises(ValueError, match="reverse, shuffle"):
        Permutation((6,), kind="random")


# ----------------------------------------------------------------------------- couplings
def _kept_mask(shape, mask, parity):
    """Independent description of the kept entries (True = unchanged)."""
    if len(shape) == 1 or mask == "channel":
        n = shape[0]
        idx = np.arange(n)
        first = idx < n // 2 if mask == "channel" else idx % 2 == 0
        kept = first if parity == 0 else ~first
        return kept.reshape(-1, *[1] * (len(shape) - 1)) * np.ones(shape, dtype=bool)
    _, h, w = shape
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.broadcast_to((hh + ww + parity) % 2 == 0, shape)


@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling])
@pytest.mark.parametrize("shape", [(6,), (5,), (2, 4, 4), (3, 2, 2)])
@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
@pytest.mark.parametrize("parity", [0, 1])
def test_coupling_keeps_its_half_and_is_elementwise_in_the_other(cls, shape, mask, parity):
    layer = perturb(cls(shape, mask=mask, parity=parity, hidden=8), std=0.3)
    kept = torch.from_numpy(_kept_mask(shape, mask, parity).copy())
    x = torch.randn(4, *shape)
    y, _ = layer(x)
    assert torch.equal(y[:, kept], x[:, kept])
    assert (y[:, ~kept] - x[:, ~kept]).abs().min() > 0  # the other half is really transformed
    # changing one transformed entry changes only that output entry (triangular Jacobian)
    j = int(torch.nonzero(~kept.flatten())[0])
    x2 = x.clone().view(4, -1)
    x2[:, j] += 0.7
    y2, _ = layer(x2.view_as(x))
    diff = (y2 - y).view(4, -1).abs() > 0
    assert diff[:, j].all() and diff.sum() == 4


def test_affine_stats_match_measured_scales_and_shifts():
    layer = perturb(AffineCoupling((6,), hidden=8, scale="exp"), std=0.5)
    x = torch.randn(5, 6)
    layer(x)
    assert layer.stats == {}  # diagnostics only when asked (no device read otherwise)
    with collect_stats():
        y, _ = layer(x)
    stats = read_stats(layer)
    assert all(type(v) is float for v in stats.values())
    x2 = x.clone()
    x2[:, 3:] += 1.0  # same kept half -> same (s, t); y_b = x_b * scale + t
    y2, _ = layer(x2)
    scale = (y2 - y)[:, 3:]
    shift = y[:, 3:] - x[:, 3:] * scale
    assert math.isclose(stats["min_scale"], scale.min().item(), rel_tol=1e-10)
    assert math.isclose(stats["max_scale"], scale.max().item(), rel_tol=1e-10)
    assert math.isclose(stats["max_abs_shift"], shift.abs().max().item(), rel_tol=1e-9)


def test_couplings_start_as_known_maps():
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(AdditiveCoupling((2, 4, 4), hidden=8)(x)[0], x)
    assert torch.equal(AffineCoupling((2, 4, 4), hidden=8, scale="biased_sigmoid")(x)[0], x)
    y, ld = AffineCoupling((2, 4, 4), hidden=8, scale="sigmoid")(x)  # Glow: scale sigmoid(2)
    s = 1 / (1 + math.exp(-2.0))
    assert torch.allclose(y[:, 1], x[:, 1] * s, atol=1e-15) and torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(ld, torch.full((3,), 16 * math.log(s)), atol=1e-12)


def test_coupling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channel, checkerboard"):
        AffineCoupling((6,), mask="stripes")
    with pytest.raises(ValueError):
        AffineCoupling((6,), parity=2)
    with pytest.raises(ShapeError):
        AffineCoupling((1,))  # nothing to split
    with pytest.raises(ShapeError):
        AffineCoupling((4, 1, 1), mask="checkerboard")
    with pytest.raises(ShapeError):
        AffineCoupling((6,), hidden=8)(torch.randn(2, 5))


def test_unknown_scale_names_raise():
    with pytest.raises(ValueError, match="known scales: " + ", ".join(sorted(SCALES))):
        make_scale("softplus")
    with pytest.raises(ValueError, match="unknown scale"):
        AffineCoupling((6,), scale="Sigmoid")
    with pytest.raises(ValueError):
        make_scale("bounded", a=0.0, b=1.0)
    with pytest.raises(ValueError):
        make_scale("tanh_clamp", clamp=2.0)  # wrong parameter name


# ----------------------------------------------------------------------------- float32, as users run it
def test_float32_glow_like_stack_reconstructs_within_design_tolerance():
    from stableflows.transforms import Compose

    s = (8, 4, 4)
    flow = Compose(
        Logit(0.05), Squeeze(2),
        *[layer for k in range(3) for layer in (
            ActNorm(s), Invertible1x1(s), AffineCoupling(s, mask=("channel", "checkerboard")[k % 2], parity=k % 2,
                                                         hidden=16, scale="biased_sigmoid"))],
    ).float()
    x = torch.rand(16, 2, 8, 8, dtype=torch.float32)
    flow.train()
    flow(x)
    flow.eval()
    perturb(flow, std=0.1)
    z, ld = flow(x)
    x_rec, ld_inv = flow.inverse(z)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert (x_rec - x).abs().max() < 1e-4  # docs/METRICS.md: invertible within 1e-3 in float32 on [0, 1] data
    assert torch.allclose(ld_inv, -ld, rtol=1e-5, atol=1e-3)
