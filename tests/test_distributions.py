"""Base distributions of flows (``stableflows.models.distributions``) and their wiring.

References, independent of the code under test: closed-form log-densities written out here in
float64, ``torch.distributions`` (``Normal`` / ``Independent`` / ``MixtureSameFamily``), the
closed-form moments of a Gaussian mixture, and for every Flow of the conformance registry the
``slogdet`` of the autograd Jacobian of ``F``."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributions as D
from torch.autograd.functional import jacobian

from registry import ENTRIES
from stableflows.config import ConfigError, ModelConfig, RunConfig
from stableflows.models import Flow, build_model, glow
from stableflows.models.distributions import DiagNormal, GaussianMixture, StandardNormal, make_base

ROOT = Path(__file__).resolve().parents[1]
EVENTS = [(5,), (2, 2, 2)]


def _perturbed(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = base.double()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return base


def _reference(base) -> D.Distribution:
    """The same distribution from torch.distributions, on flattened events."""
    d = base.dim
    if isinstance(base, StandardNormal):
        return D.Independent(D.Normal(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)), 1)
    if isinstance(base, DiagNormal):
        return D.Independent(D.Normal(base.loc.detach().reshape(d), base.log_scale.detach().exp().reshape(d)), 1)
    k = base.components
    comp = D.Independent(D.Normal(base.loc.detach().reshape(k, d), base.log_scale.detach().exp().reshape(k, d)), 1)
    return D.MixtureSameFamily(D.Categorical(logits=base.logits.detach()), comp)


def _closed_form(base, z) -> torch.Tensor:
    """log-density written out per example, float64 loops (no logsumexp helper, no vectorised code)."""
    zf = z.reshape(z.shape[0], -1)
    out = []
    for row in zf:
        if isinstance(base, StandardNormal):
            out.append(sum(-0.5 * float(v) ** 2 - 0.5 * math.log(2 * math.pi) for v in row))
            continue
        locs = base.loc.detach().reshape(-1, zf.shape[1])
        scales = base.log_scale.detach().exp().reshape(-1, zf.shape[1])
        w = [1.0] if isinstance(base, DiagNormal) else list(torch.softmax(base.logits.detach(), 0).tolist())
        dens = 0.0
        terms = []
        for k in range(locs.shape[0]):
            t = math.log(w[k]) + sum(-0.5 * ((float(v) - float(m)) / float(s)) ** 2 - math.log(float(s))
                                     - 0.5 * math.log(2 * math.pi) for v, m, s in zip(row, locs[k], scales[k]))
            terms.append(t)
        top = max(terms)
        dens = top + math.log(sum(math.exp(t - top) for t in terms))
        out.append(dens)
    return torch.tensor(out, dtype=torch.float64)


BASES = [lambda e: StandardNormal(e), lambda e: DiagNormal(e), lambda e: GaussianMixture(e, components=4)]


@pytest.mark.parametrize("event", EVENTS, ids=str)
@pytest.mark.parametrize("make", BASES, ids=["normal", "diag_normal", "mixture"])
def test_log_prob_against_closed_form_and_torch_distributions(make, event):
    torch.manual_seed(0)
    base = _perturbed(make(event))
    z = 1.5 * torch.randn(7, *event, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lp = base.log_prob(z)
    assert lp.shape == (7,)
    assert torch.allclose(lp, _closed_form(base, z), rtol=0, atol=1e-10)
    assert torch.allclose(lp, _reference(base).log_prob(z.reshape(7, -1)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("make", BASES[1:], ids=["diag_normal", "mixture"])
def test_sample_moments_match_closed_form(make, temperature):
    """E[z] = sum_k w_k mu_k, E[z^2] = sum_k w_k (mu_k^2 + T^2 sigma_k^2) per entry (K = 1: diagonal)."""
    torch.manual_seed(0)
    base = _perturbed(make((3,)))
    n = 40000
    z = base.rsample(n, temperature, torch.Generator().manual_seed(2)).detach()
    assert z.shape == (n, 3) and z.dtype == torch.float64
    loc = base.loc.detach().reshape(-1, 3)
    var = (temperature * base.log_scale.detach().exp().reshape(-1, 3)) ** 2
    w = torch.ones(1, dtype=torch.float64) if isinstance(base, DiagNormal) else torch.softmax(base.logits.detach(), 0)
    m1 = (w[:, None] * loc).sum(0)
    m2 = (w[:, None] * (loc ** 2 + var)).sum(0)
    sd = (m2 - m1 ** 2).sqrt()
    assert torch.all((z.mean(0) - m1).abs() < 5 * sd / math.sqrt(n))
    assert torch.allclose((z ** 2).mean(0), m2, rtol=0.03, atol=0.01)
    if isinstance(base, GaussianMixture):  # E_z[p(k | z)] = w_k when z is drawn from the mixture
        comp = D.Independent(D.Normal(loc, var.sqrt()), 1)
        resp = torch.softmax(comp.log_prob(z[:, None, :]) + torch.log(w), dim=1)  # (n, K)
        assert torch.allclose(resp.mean(0), w, atol=5 * 0.5 / math.sqrt(n))


def test_rsample_is_pathwise():
    """z = mu + T sigma eps: dz/dmu = 1, dz/dlog sigma = T sigma eps; the mixture's mu_k gets the count of k."""
    torch.manual_seed(0)
    base = _perturbed(DiagNormal((4,)))
    t = 0.8
    z = base.rsample(10, t, torch.Generator().manual_seed(3))
    eps = torch.randn(10, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(z, base.loc + t * base.log_scale.exp() * eps, atol=1e-12)
    z.sum().backward()
    assert torch.allclose(base.loc.grad, torch.full((4,), 10.0, dtype=torch.float64))
    assert torch.allclose(base.log_scale.grad, (t * base.log_scale.exp() * eps).sum(0).detach(), atol=1e-12)
    mix = _perturbed(GaussianMixture((2,), components=3))
    z = mix.rsample(50, 1.0, torch.Generator().manual_seed(4))
    z.sum().backward()
    counts = mix.loc.grad[:, 0]
    assert torch.allclose(mix.loc.grad[:, 1], counts) and float(counts.sum()) == 50.0
    assert mix.logits.grad is None  # the discrete choice has no pathwise gradient (documented)


def test_make_base_and_config_errors():
    assert isinstance(make_base("mixture", (3,), components=2), GaussianMixture)
    with pytest.raises(ConfigError, match="unknown base distribution 'gamma'; choose one of normal, diag_normal"):
        make_base("gamma", (3,))
    with pytest.raises(ConfigError, match="components >= 1"):
        make_base("mixture", (3,), components=0)
    with pytest.raises(ConfigError, match="applies to flows"):
        build_model(ModelConfig(model="classifier", levels=1, steps_per_level=1, hidden=4, base="mixture"), (1, 4, 4))
    flow = glow(shape=(4,), levels=1, steps_per_level=1, hidden=4)
    with pytest.raises(ValueError, match="does not fit the latent shape"):
        flow.with_base(DiagNormal((5,)))


def test_with_base_follows_dtype_and_records_config():
    flow = build_model(ModelConfig(model="glow", hidden=4, levels=1, steps_per_level=1), (4,)).double()
    assert isinstance(flow.base, StandardNormal) and not list(flow.base.parameters())
    flow.with_base("mixture", components=3)
    assert flow.base.loc.dtype == torch.float64 and flow.base.loc.shape == (3, 4)
    assert (flow.config.base, flow.config.base_components) == ("mixture", 3)
    assert {k for k in flow.state_dict() if k.startswith("base.")} == {"base.logits", "base.loc", "base.log_scale"}


# ----------------------------------------------------------------------------- every Flow of the registry
FLOW_ENTRIES = sorted(n for n, e in ENTRIES.items() if isinstance(e.build(), Flow))


@pytest.mark.parametrize("name", FLOW_ENTRIES)
def test_registry_flows_log_prob_is_base_density_plus_jacobian(name):
    """log p(x) = log p_Z(F(x)) + log|det dF/dx|: p_Z from torch.distributions, the log-det from the
    autograd Jacobian (float64); sample_and_log_prob agrees with log_prob at the samples."""
    entry = ENTRIES[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    flow = entry.build().double()
    assert isinstance(flow, Flow)
    g = torch.Generator().manual_seed(0)
    lo, hi = (0.05, 0.95) if entry.domain == "unit" else (-2.0, 2.0)
    x = lo + (hi - lo) * torch.rand(3, *entry.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        flow.train()(lo + (hi - lo) * torch.rand(16, *entry.shape, generator=g, dtype=torch.float64))
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    flow.eval()
    with torch.no_grad():
        lp = flow.log_prob(x)
        z = flow(x)[0]
    ref_base = _reference(flow.base)
    for b in range(3):
        jac = jacobian(lambda v: flow(v.reshape(1, *entry.shape))[0].reshape(-1), x[b].reshape(-1))
        ref = ref_base.log_prob(z[b].reshape(1, -1))[0] + torch.linalg.slogdet(jac)[1]
        assert abs(float(lp[b]) - float(ref)) < max(entry.logdet_atol, 1e-8), (float(lp[b]), float(ref))
    xs, lps = flow.sample_and_log_prob(3, temperature=0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(lps, flow.log_prob(xs), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints, CLI, audit
def test_old_checkpoints_without_the_base_fields_still_load(tmp_path):
    from stableflows.train import load_flow
    from stableflows.train.checkpoint import save_checkpoint

    cfg = RunConfig().replace("model", hidden=4, levels=1, steps_per_level=1).to_dict()
    for k in ("base", "base_components"):  # a checkpoint written before the fields existed
        cfg["model"].pop(k)
    flow = build_model(RunConfig.from_dict(cfg).model, (1, 8, 8))
    state = {k: v for k, v in flow.state_dict().items()}
    assert not any(k.startswith("base.") for k in state)
    save_checkpoint(tmp_path / "best.pt", {"kind": "best", "config": cfg, "shape": [1, 8, 8], "model": state})
    loaded, _ = load_flow(tmp_path)
    assert isinstance(loaded.base, StandardNormal)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.log_prob(x), flow.eval().log_prob(x))


@pytest.mark.slow
def test_cli_trains_stores_and_audits_a_mixture_base(tmp_path):
    """``stableflows train --base mixture --base-components 3``: the checkpoint rebuilds the trained
    mixture; its log-density and the audit's sample families use it."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "stableflows", "train", "--model", "glow", "--data", "digits",
                        "--hidden", "4", "--levels", "1", "--steps-per-level", "1", "--base", "mixture",
                        "--base-components", "3", "--steps", "3", "--eval-every", "3", "--no-progress",
                        "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from stableflows.audit import audit
    from stableflows.train import load_flow
    from stableflows.train.checkpoint import load_checkpoint

    flow, ckpt = load_flow(out)
    assert ckpt["config"]["model"]["base"] == "mixture" and isinstance(flow.base, GaussianMixture)
    assert flow.base.components == 3
    stored = load_checkpoint(out / "best.pt")["model"]
    assert torch.equal(flow.base.loc, stored["base.loc"])
    init = torch.zeros(3)  # training moved the mixture weights away from equal
    assert not torch.equal(stored["base.logits"], init)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, ld = flow(x)
        ref = _reference(_as_double(flow.base)).log_prob(z.double().reshape(6, -1)) + ld.double()
    assert torch.allclose(flow.log_prob(x).double(), ref, atol=1e-4)
    calls = []
    draw = flow.base.rsample
    flow.base.rsample = lambda n, *a, **k: calls.append(n) or draw(n, *a, **k)  # the audit's latents: the base's
    rep = audit(flow, x, families="test,samples", spectra_points=2, repeat=2)
    assert rep.verdict["test"].status == "invertible" and rep.verdict["samples_t1"].n == 6
    assert 6 in calls


def _as_double(base):
    import copy

    return copy.deepcopy(base).double()
