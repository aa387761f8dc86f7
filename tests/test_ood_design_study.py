"""Glow design-choice study (paper 003) and prior refit (paper 000 App. I): variants, randomized
splits, the coupling probed after each split, clipped z = 0 samples, refit maths, a quick run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stableflows.experiments import glow_design as G
from stableflows.experiments import prior_refit as P
from stableflows.transforms.base import trace
from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling
from stableflows.transforms.linear import Invertible1x1, Permutation
from stableflows.transforms.multiscale import MultiScale, SplitPrior
from stableflows.transforms.normalization import ActNorm
from stableflows.transforms.scales import BiasedSigmoidScale, BoundedScale, ExpScale, SigmoidScale

SIZE = G.QUICK


def _init(flow, seed=0):
    flow.train()
    flow.log_prob(0.1 + 0.8 * torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))
    return flow.eval()


def test_variants_build_what_they_say():
    kinds = {"affine_exp": ExpScale, "affine_sigmoid": SigmoidScale, "biased_sigmoid": BiasedSigmoidScale,
             "biased_sigmoid_eps0.05": BiasedSigmoidScale, "bounded": BoundedScale,
             "randomized_splits": SigmoidScale, "affine_sigmoid_kept": SigmoidScale}
    for name in G.VARIANTS:
        flow, cfg = G.build_variant(name, SIZE)
        couplings = [m for m in flow.modules() if isinstance(m, (AffineCoupling, AdditiveCoupling))]
        assert len(couplings) == SIZE.levels * SIZE.steps_per_level
        if name == "additive":
            assert all(isinstance(c, AdditiveCoupling) for c in couplings)
        else:
            assert all(isinstance(c.scale, kinds[name]) for c in couplings)
        if name.startswith("biased_sigmoid"):
            assert all(c.scale.eps == (0.05 if name.endswith("0.05") else 0.5) for c in couplings)
        n_perm = sum(isinstance(m, Permutation) for m in flow.modules())
        assert n_perm == (SIZE.levels - 1 if name == "randomized_splits" else 0)  # one per split
        assert sum(isinstance(m, Invertible1x1) for m in flow.modules()) == len(couplings)  # LU 1x1 kept
        # Daniels' arrangement: the last coupling before a split is conditioned on the factored-out half
        ms = next(m for m in flow.modules() if isinstance(m, MultiScale))
        last = [m for m in ms.level.modules() if isinstance(m, (AffineCoupling, AdditiveCoupling))][-1]
        assert last.parity == (0 if name == "affine_sigmoid_kept" else 1)
        assert cfg.split_condition == ("kept" if name == "affine_sigmoid_kept" else "factored")
    with pytest.raises(ValueError, match="unknown variant"):
        G.build_variant("nope", SIZE)


def test_randomized_splits_permute_at_the_split_boundary():
    """The shuffle sits between a level's last coupling and its split (not in front of ActNorm / the
    1x1 conv, which would absorb it), and sends channels of both coupling halves into the split."""
    flow, _ = G.build_variant("randomized_splits", G.DesignSize(**{**SIZE.__dict__, "steps_per_level": 2}))
    _init(flow)
    ms = next(m for m in flow.modules() if isinstance(m, MultiScale))
    layers = list(ms.level.layers)
    assert isinstance(layers[-1], Permutation) and isinstance(layers[-2], AffineCoupling)
    for i, layer in enumerate(layers):
        if isinstance(layer, ActNorm):
            assert not isinstance(layers[i - 1], Permutation)
    perm = layers[-1].perm
    c = perm.numel()
    out = perm[c - c // 2:]
    assert (out < c // 2).any() and (out >= c // 2).any()
    x = 0.1 + 0.8 * torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        z, ld = flow(x)
        xr, ldi = flow.inverse(z)
    assert torch.allclose(xr, x, atol=1e-5) and torch.allclose(ld, -ldi, atol=1e-4)


def test_feasible_levels():
    assert G.feasible_levels((1, 8, 8), 3) == 3 and G.feasible_levels((1, 28, 28), 3) == 2


def test_first_coupling_after_split_is_the_first_one_the_generative_pass_meets():
    flow, _ = G.build_variant("affine_sigmoid", G.DesignSize(**{**SIZE.__dict__, "levels": 3, "steps_per_level": 2}))
    _init(flow)
    targets = G.first_couplings_after_splits(flow)
    assert len(targets) == 2  # 3 levels, 2 splits
    modules = dict(flow.named_modules())
    with torch.no_grad(), trace(flow) as tr:
        flow.inverse(torch.randn(2, 64))
    order = [r.name for r in tr.records if r.direction == "inverse"]  # post-order: a prior before its level's layers
    for name, _ in targets:
        # the first coupling recorded after each split prior's inverse is the target
        i = order.index(name)
        prior_idx = max(j for j in range(i) if isinstance(modules[order[j]], SplitPrior))
        between = [n for n in order[prior_idx + 1:i] if isinstance(modules[n], AffineCoupling)]
        assert between == []


def test_clipped_z0_sample_stays_within_the_threshold():
    flow, _ = G.build_variant("affine_exp", SIZE)
    _init(flow)
    with torch.no_grad():  # shift t = 1, raw scale s = -8: the inverse (y - t) / exp(-8) explodes
        for m in flow.modules():
            if isinstance(m, AffineCoupling):
                last = m.net.net[-1]  # GlowCNN's zero-initialised output conv: (t, s) channel blocks
                cb = last.out_channels // 2
                last.bias[:cb] = 1.0
                last.bias[cb:] = -8.0
    rows = G.sample_at_zero(flow, (None, 10.0))
    free, clipped = rows
    assert clipped["max_activation"] <= 10.0 + 1e-6 and clipped["finite"]
    assert free["max_activation"] > 10.0 and clipped["clamped"] > 0


def test_scale_distribution_collects_every_scale_of_the_target():
    flow, _ = G.build_variant("affine_sigmoid", SIZE)
    _init(flow)
    d = G.scale_distribution(flow, (1.0, 0.0), 5)
    (name, coupling), = G.first_couplings_after_splits(flow)
    per_sample = coupling.trans_idx.numel() * 16  # transformed channels x 4 x 4 positions
    assert d[1.0][name].shape == (5 * per_sample,) and d[0.0][name].shape == (per_sample,)
    assert d[0.0]["samples"]["n"] == 1
    assert np.all((d[1.0][name] > 0) & (d[1.0][name] < 1))  # sigmoid(s + 2)


def test_refit_closed_form_and_gradient_path():
    torch.manual_seed(0)
    flow, _ = G.build_variant("affine_sigmoid", SIZE)
    _init(flow)
    v = 0.1 + 0.8 * torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    r = P.refit_prior_variance(flow, v, epochs=300, lr=0.01, batch_size=300)  # full-batch Adam
    with torch.no_grad():
        z = flow(v)[0].double()
    assert torch.allclose(r["closed_form"], 0.5 * torch.log((z ** 2).mean(0)), atol=1e-12)
    assert torch.allclose(r["epochs"][-1], r["closed_form"], atol=5e-3)  # Adam reaches the optimum
    assert all(r["nll_closed_form"] <= n + 1e-9 for n in r["nll"])  # the optimum is the best
    assert r["nll"][-1] < r["nll"][0]
    # the refitted model: log N(z; 0, diag sigma^2) + logdet, checked against torch.distributions
    ls = r["closed_form"]
    with torch.no_grad():
        zz, ld = flow(v[:4])
    ref = torch.distributions.Normal(0.0, torch.exp(ls)).log_prob(zz.double()).sum(1) + ld.double()
    assert torch.allclose(P.log_prob_with_prior(flow, v[:4], ls), ref, atol=1e-6)
    assert torch.allclose(P.log_prob_with_prior(flow, v[:4], torch.zeros_like(ls)),
                          flow.log_prob(v[:4]).double(), atol=1e-4)
    # samples: the same eps, scaled by sigma
    eps = torch.randn((3, 64), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        expect = flow.inverse((torch.exp(ls) * eps).float())[0]
    assert torch.allclose(P.sample_with_prior(flow, 3, ls, seed=5), expect, atol=1e-5)


def test_quick_study_end_to_end(tmp_path):
    s = G.glow_design_choices(tmp_path, quick=True, variants=["affine_sigmoid"], verbose=False)
    row = s["variants"]["affine_sigmoid"]
    assert row["live"] is not None and isinstance(row["live"]["stable"], bool)  # live weights audited too
    (r,) = s["rows"]
    assert r["variant"] == "affine_sigmoid" and "stable_live" in r and s["levels"] == 17
    assert math.isfinite(row["test_bpd"]) and json.loads((tmp_path / "summary.json").read_text())["variants"]["affine_sigmoid"]["curve"]
    assert [z["clip"] for z in row["z0"]] == list(SIZE.clips)
    assert {"test", "samples_t0", "clipped_c10"} <= set(json.loads((tmp_path / "summary.json").read_text())["variants"]["affine_sigmoid"]["audit"])
    assert isinstance(row["stable"], bool) and s["statement"]
    assert all(c["reproduced"] in (True, False, None) and c["evidence"] for c in s["claims"])
    p = s["prior_refit"]
    assert p["train_bpd_after"] <= p["train_bpd_before"] + 1e-6  # maximum likelihood on the training split
    for f in ("summary.json", "table.md", "training_loss.png", "z0_clipping.png", "scale_distribution.png",
              "prior_refit.png"):
        assert (tmp_path / f).is_file(), f
    json.loads((tmp_path / "summary.json").read_text())
    assert "glow-design-choices" in G.EXPERIMENTS and "prior-refit" in P.EXPERIMENTS
