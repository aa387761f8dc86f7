"""Likelihood decomposition: log p(x) = log p(z) + log-det per example, per layer and per scale,
checked against an independent float64 reference (autograd Jacobian + slogdet, Gaussian density
written out); constant-volume Glow has the same log-det for every input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stableflows.models import cv_glow, glow
from stableflows.ood.decompose import STATUS_DOMAIN, STATUS_OK, decompose, likelihood_terms, scale_layout
from stableflows.transforms.linear import Invertible1x1
from stableflows.transforms.normalization import ActNorm

SHAPE = (1, 8, 8)
D = 64


def _perturb(flow, scale: float, seed: int) -> None:
    """Random non-zero conditioner weights (zero-initialised last layers would make couplings identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ready(flow, seed: int = 0, scale: float = 0.05):
    flow = flow.double()
    x = torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flow.train()
    flow.log_prob(0.1 + 0.8 * x)  # ActNorm data-dependent initialisation
    _perturb(flow, scale, seed)
    return flow.eval()


def _reference_log_prob(flow, x: torch.Tensor) -> tuple[float, float]:
    """(log N(F(x); 0, I), log|det dF/dx|) of one example by brute force in float64."""
    def f(v):
        return flow.transform(v.reshape(1, *SHAPE))[0].reshape(-1)

    v = x.reshape(-1).double()
    jac = torch.autograd.functional.jacobian(f, v)  # (D, D)
    z = f(v).detach().numpy()
    log_pz = float(-0.5 * np.sum(z ** 2) - 0.5 * D * math.log(2 * math.pi))
    return log_pz, float(torch.linalg.slogdet(jac)[1])


@pytest.fixture(scope="module")
def nvp_glow():
    torch.manual_seed(0)
    return _ready(glow(shape=SHAPE, levels=2, steps_per_level=2, hidden=8, logit_alpha=0.05))


def test_terms_match_brute_force_reference(nvp_glow):
    x = 0.05 + 0.9 * torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = likelihood_terms(nvp_glow, x)
    assert (t.status == STATUS_OK).all()
    for i in range(4):
        lpz, ld = _reference_log_prob(nvp_glow, x[i])
        assert t.log_pz[i] == pytest.approx(lpz, abs=1e-6)
        assert t.logdet[i] == pytest.approx(ld, abs=1e-6)
        assert t.log_px[i] == pytest.approx(lpz + ld, abs=1e-6)
    assert np.allclose(t.log_px, nvp_glow.log_prob(x).detach().numpy(), atol=1e-9, rtol=0)


def test_decomposition_adds_up_per_example(nvp_glow):
    x = 0.05 + 0.9 * torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dec = decompose(nvp_glow, x)
    ref = np.array([sum(_reference_log_prob(nvp_glow, x[i])) for i in range(6)])
    assert np.max(np.abs(dec.log_px - ref)) < 1e-6
    # layers add up to the log-det, scales to the log-det and to log p(z)
    assert np.max(np.abs(dec.layer_logdet.sum(0) - dec.logdet)) < 1e-6
    assert np.max(np.abs(dec.scale_logdet.sum(0) - dec.logdet)) < 1e-6
    assert np.max(np.abs(dec.scale_log_pz.sum(0) - dec.log_pz)) < 1e-6
    assert np.max(np.abs((dec.scale_logdet + dec.scale_log_pz).sum(0) - ref)) < 1e-6
    assert dec.scale_names == ["pre", "scale 1", "scale 2"]
    # every elementary layer is there once: Logit, 2 x (Squeeze, 2 x (ActNorm, 1x1, coupling)), prior, top, flatten
    assert dec.layer_types.count("Logit") == 1 and dec.layer_types.count("AffineCoupling") == 4
    assert dec.layer_types.count("SplitPrior") == 1
    # the pre-transform holds exactly the Logit's log-det, computed here from its formula
    a = 0.05
    u = a + (1 - 2 * a) * x.reshape(6, -1).numpy()
    logit_ld = np.sum(math.log(1 - 2 * a) - np.log(u) - np.log(1 - u), axis=1)
    assert np.allclose(dec.scale_logdet[0], logit_ld, atol=1e-9)
    assert np.all(dec.scale_log_pz[0] == 0)


def test_scale_layout_partitions_the_latent(nvp_glow):
    lay = scale_layout(nvp_glow)
    idx = np.concatenate([np.arange(D)[s.latent] for s in lay if s.latent is not None])
    assert sorted(idx.tolist()) == list(range(D))
    assert [s.latent.stop - s.latent.start for s in lay[1:]] == [32, 32]  # 2 x 4 x 4 factored out, then the rest
    # the latent entries of scale 1 are those of the first split: changing them changes only the level-1 part
    x = 0.05 + 0.9 * torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        z, _ = nvp_glow(x)
        z2 = z.clone()
        z2[:, lay[1].latent] += 0.1
        x2, _ = nvp_glow.inverse(z2)
        zz, _ = nvp_glow(x2)
    assert torch.allclose(zz[:, lay[2].latent], z[:, lay[2].latent], atol=1e-9)


def test_vector_flow_has_one_scale():
    torch.manual_seed(1)
    f = _ready_vec(glow(shape=(6,), levels=1, steps_per_level=3, hidden=8, logit_alpha=0.0))
    x = torch.randn(5, 6, dtype=torch.float64)
    dec = decompose(f, x)
    assert dec.scale_names == ["scale 1"]
    assert np.allclose(dec.scale_logdet[0], dec.logdet, atol=1e-12)
    assert np.allclose(dec.scale_log_pz[0], dec.log_pz, atol=1e-12)


def _ready_vec(flow):
    flow = flow.double().train()
    flow.log_prob(torch.randn(16, 6, dtype=torch.float64))
    _perturb(flow, 0.05, 2)
    return flow.eval()


def test_outside_domain_examples_are_flagged_not_dropped(nvp_glow):
    x = 0.05 + 0.9 * torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[2] = x[2] * 3.0  # beyond [0, 1]: the logit pre-transform refuses it
    t = likelihood_terms(nvp_glow, x, batch_size=4)
    assert list(t.status) == [STATUS_OK, STATUS_OK, STATUS_DOMAIN, STATUS_OK, STATUS_OK]
    assert np.isnan(t.log_px[2]) and np.isfinite(np.delete(t.log_px, 2)).all()
    ok = torch.tensor([0, 1, 3, 4])
    assert np.allclose(np.delete(t.log_px, 2), nvp_glow.log_prob(x[ok]).detach().numpy(), atol=1e-10)
    assert any("InputOutsideDomain" in m for m in t.messages)


def test_cv_glow_logdet_is_the_same_for_every_input():
    torch.manual_seed(2)
    f = _ready(cv_glow(shape=SHAPE, levels=2, steps_per_level=2, hidden=8), seed=7, scale=0.1)
    g = torch.Generator().manual_seed(8)
    inputs = torch.cat([torch.rand(8, *SHAPE, generator=g, dtype=torch.float64),  # uniform
                        0.5 + 3.0 * torch.randn(8, *SHAPE, generator=g, dtype=torch.float64),  # far outside [0, 1]
                        torch.full((2, *SHAPE), 0.3, dtype=torch.float64)])  # constant
    t = likelihood_terms(f, inputs)
    assert (t.status == STATUS_OK).all()
    assert np.ptp(t.logdet) < 1e-10
    # ... and equals sum over layers of H W log|det W_k| + H W sum(logs) of ActNorm, from the parameters
    expected = 0.0
    for m in f.modules():
        if isinstance(m, Invertible1x1):
            expected += m._positions * float(torch.linalg.slogdet(m.weight_matrix().detach())[1])
        elif isinstance(m, ActNorm):
            expected += m._positions * float(m.logs.detach().sum())
    assert t.logdet[0] == pytest.approx(expected, abs=1e-8)
    # brute force at two very different inputs agrees
    assert _reference_log_prob(f, inputs[0])[1] == pytest.approx(_reference_log_prob(f, inputs[9])[1], abs=1e-8)
    # the decomposition says so too: only ActNorm and 1x1 layers carry log-det, identical across examples
    dec = decompose(f, inputs)
    assert np.ptp(dec.layer_logdet, axis=1).max() < 1e-10


def test_flow_without_pre_transform_has_no_pre_scale():
    torch.manual_seed(3)
    f = _ready(cv_glow(shape=SHAPE, levels=2, steps_per_level=1, hidden=4), seed=9)
    dec = decompose(f, torch.rand(3, *SHAPE, dtype=torch.float64))
    assert dec.scale_names == ["scale 1", "scale 2"]
    assert np.allclose((dec.scale_logdet + dec.scale_log_pz).sum(0), dec.log_px, atol=1e-9)


# ----------------------------------------------------------------------------- learned base distributions
def _reference_base_log_prob(base, z: np.ndarray) -> tuple[float, np.ndarray | None]:
    """log p_Z(z) of one flat latent written out in float64 numpy, and its per-entry terms when the
    base factorises (diagonal Gaussian), from the base's parameters."""
    c = 0.5 * math.log(2 * math.pi)
    if base.kind == "diag_normal":
        mu, ls = base.loc.detach().reshape(-1).numpy(), base.log_scale.detach().reshape(-1).numpy()
        e = -0.5 * ((z - mu) / np.exp(ls)) ** 2 - ls - c
        return float(e.sum()), e
    w = base.logits.detach().numpy()
    logw = w - (np.log(np.sum(np.exp(w - w.max()))) + w.max())
    mu = base.loc.detach().reshape(base.components, -1).numpy()
    ls = base.log_scale.detach().reshape(base.components, -1).numpy()
    comp = logw + np.sum(-0.5 * ((z - mu) / np.exp(ls)) ** 2 - ls - c, axis=1)
    m = comp.max()
    return float(m + np.log(np.sum(np.exp(comp - m)))), None


@pytest.mark.parametrize("kind", ["diag_normal", "mixture"])
def test_terms_and_decomposition_use_the_flows_own_base(kind):
    """A flow with a learned base: log p(z) is the base's density (not N(0, I)); per scale it splits
    over the factored-out entries for a diagonal Gaussian and is left unsplit (NaN + note) for a mixture."""
    torch.manual_seed(1)
    flow = _ready(glow(shape=SHAPE, levels=2, steps_per_level=2, hidden=8, logit_alpha=0.05).with_base(kind,
                                                                                                      components=3))
    with torch.no_grad():
        for p in flow.base.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype))
    x = 0.05 + 0.9 * torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = likelihood_terms(flow, x)
    dec = decompose(flow, x)
    layout = [s for s in scale_layout(flow) if s.latent is not None]
    for i in range(4):
        z = flow.transform(x[i:i + 1])[0].reshape(-1).detach().numpy()
        ref, entries = _reference_base_log_prob(flow.base, z)
        _, ref_ld = _reference_log_prob(flow, x[i])
        assert t.log_pz[i] == pytest.approx(ref, abs=1e-8)
        assert t.log_px[i] == pytest.approx(ref + ref_ld, abs=1e-6)
        assert dec.log_pz[i] == pytest.approx(ref, abs=1e-8)
        scale_lpz = dict(zip(dec.scale_names, dec.scale_log_pz[:, i]))
        for s in layout:
            if entries is None:
                assert math.isnan(scale_lpz[s.name])
            else:
                assert scale_lpz[s.name] == pytest.approx(float(entries[s.latent].sum()), abs=1e-8)
    assert ("log_pz_note" in dec.summary()) == (kind == "mixture")


def test_second_order_uses_the_base_and_drops_the_forms_that_assume_a_standard_normal():
    from stableflows.ood.second_order import log_prob_derivatives, paper_eq6, second_order_prediction

    torch.manual_seed(2)
    flow = _ready(cv_glow(shape=SHAPE, levels=1, steps_per_level=1, hidden=4).with_base("diag_normal"))
    with torch.no_grad():
        flow.base.loc.add_(0.2)
        flow.base.log_scale.sub_(0.1)
    x0 = torch.full(SHAPE, 0.4, dtype=torch.float64)
    val, _, _ = log_prob_derivatives(flow, x0)
    z = flow.transform(x0.unsqueeze(0))[0].reshape(-1).detach().numpy()
    ref, _ = _reference_base_log_prob(flow.base, z)
    assert val == pytest.approx(ref + _reference_log_prob(flow, x0)[1], abs=1e-8)
    xp = 0.2 + 0.6 * torch.rand(16, *SHAPE, dtype=torch.float64)
    r = second_order_prediction(flow, xp, 0.5 + 0.0 * xp)
    assert r["gauss_newton_diag"] is None and "gauss_newton_diag" not in r["sign_agrees"]
    with pytest.raises(ValueError, match="N\\(0, sigma\\^2 I\\)"):
        paper_eq6(flow, xp, 0.5 + 0.0 * xp)
