"""Where the factored-out noise of a Glow split goes in the sampling pass (issue 12, item 4).

``split_condition="kept"`` (Glow's code): the last coupling before a split transforms the half that
is factored out; perturbing that latent leaves the coupling's conditioner input exactly unchanged.
``"factored"`` (Daniels, paper 003 Fig. 2): the factored-out half is the conditioner input, so the
same perturbation changes it (and the scales ``s`` it computes). ``split_shuffle`` puts a
permutation after the last coupling that mixes both halves into the factored-out channels.
The reference is the definition: which latent entries the conditioner reads.
"""
from __future__ import annotations

import pytest
import torch

from stableflows.models import glow
from stableflows.transforms.coupling import AffineCoupling
from stableflows.transforms.linear import Permutation
from stableflows.transforms.multiscale import MultiScale


def _model(**kw):
    torch.manual_seed(0)
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=8, **kw).double()
    with torch.no_grad():
        flow.log_prob(torch.rand(16, 1, 8, 8, dtype=torch.float64))  # ActNorm initialisation
        for p in flow.parameters():  # leave the zero-initialised identity: every conditioner acts
            p.add_(0.05 * torch.randn_like(p))
    return flow.eval()


def _conditioner_inputs(flow, z):
    ms = next(m for m in flow.modules() if isinstance(m, MultiScale))
    last = [m for m in ms.level.modules() if isinstance(m, AffineCoupling)][-1]
    seen = {}
    hooks = [last.net.register_forward_hook(lambda mod, inp, out: seen.__setitem__("cond", inp[0].clone())),
             last.scale.register_forward_hook(lambda mod, inp, out: seen.__setitem__("s", out[0].clone()))]
    try:
        with torch.no_grad():
            flow.inverse(z)
    finally:
        for h in hooks:
            h.remove()
    return seen, ms.d_kept


@pytest.mark.parametrize("condition,changes", [("kept", False), ("factored", True)])
def test_factored_noise_reaches_the_conditioner_only_when_asked(condition, changes):
    flow = _model(split_condition=condition)
    z = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base, d_kept = _conditioner_inputs(flow, z)
    moved = z.clone()
    moved[:, d_kept:] += 1.0  # the level-1 factored-out latent
    after, _ = _conditioner_inputs(flow, moved)
    d_cond = (after["cond"] - base["cond"]).abs().max().item()
    d_s = (after["s"] - base["s"]).abs().max().item()
    if changes:
        assert d_cond > 1e-3 and d_s > 1e-6
    else:
        assert d_cond == 0.0 and d_s == 0.0


def test_split_shuffle_mixes_both_halves_into_the_split():
    flow = _model(split_shuffle=True)
    ms = next(m for m in flow.modules() if isinstance(m, MultiScale))
    perm = ms.level.layers[-1]
    assert isinstance(perm, Permutation) and isinstance(ms.level.layers[-2], AffineCoupling)
    c = perm.shape[0]
    out = perm.perm[c - c // 2:]  # coupling channels that are factored out
    assert (out < c // 2).any() and (out >= c // 2).any()
    # and it is a real bijection of the whole flow
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    z, ld = flow(x)
    x2, ld_inv = flow.inverse(z)
    assert torch.allclose(x2, x, atol=1e-10) and torch.allclose(ld, -ld_inv, atol=1e-10)
