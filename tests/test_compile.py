"""``torch.compile`` (issue 16): ``log_prob`` and the inverse of every coupling, spline, CV-Glow and
Glow model trace as one graph (``torch._dynamo.explain``: zero graph breaks); compiled code gives the
eager values and gradients; residual flows break only where their estimator must; the audit and
``stableflows train --compile`` work on a compiled model.

Compilation is slow on a small CPU: models are tiny, and the numerical checks use the ``aot_eager``
backend (Dynamo + AOTAutograd, the graphs the Inductor backend would compile, run by eager kernels).
"""
import collections
import copy
import functools
import math

import pytest
import torch
from torch import nn

from stableflows.models import Flow, cv_glow, glow, nice, realnvp, resflow
from stableflows.transforms.base import Compose, trace

pytestmark = pytest.mark.slow

S = (1, 4, 4)
COUPLING_MODELS = {
    "glow_affine": lambda: glow(shape=S, levels=2, steps_per_level=1, hidden=4),
    "glow_additive_shuffle": lambda: glow(shape=S, levels=1, steps_per_level=1, hidden=4, coupling="additive",
                                          permutation="shuffle"),
    "glow_spline": lambda: glow(shape=S, levels=1, steps_per_level=1, hidden=4, coupling="spline"),
    "realnvp_checkerboard": lambda: realnvp(shape=S, levels=2, steps_per_level=1, hidden=4),
    "nice_vec": lambda: nice(shape=(4,), steps_per_level=2, hidden=4),
    "cv_glow": lambda: cv_glow(shape=S, levels=2, steps_per_level=1, hidden=4),
}
RESIDUAL_BREAK = "torch.compiler.disable"  # every residual block runs eagerly (transforms/residual.py)


def _initialised(build, n=8):
    torch.manual_seed(0)
    flow = build()
    x = 0.05 + 0.9 * torch.rand(n, *flow.shape)
    flow.train()
    with torch.no_grad():
        flow.log_prob(x)  # ActNorm's data-dependent initialisation, eagerly
    return flow, x


def test_coupling_models_trace_without_graph_breaks():
    for name, build in COUPLING_MODELS.items():
        flow, x = _initialised(build)
        fwd = torch._dynamo.explain(flow.log_prob)(x)  # training mode: what compiled training runs
        flow.eval()
        inv = torch._dynamo.explain(flow.inverse)(torch.randn(4, *flow.latent_shape))
        reasons = [str(b.reason) for b in fwd.break_reasons + inv.break_reasons]
        assert (fwd.graph_count, fwd.graph_break_count, inv.graph_count, inv.graph_break_count) == (1, 0, 1, 0), \
            (name, reasons)


def test_compiled_values_and_gradients_equal_eager():
    flow, x = _initialised(COUPLING_MODELS["glow_affine"])
    ref = copy.deepcopy(flow)
    lp = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    out = lp(x)
    out.sum().backward()
    expected = ref.log_prob(x)
    expected.sum().backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(flow.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    flow.eval(), ref.eval()
    z = torch.randn(5, *flow.latent_shape)
    inv = torch.compile(flow.inverse, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        x_c, ld_c = inv(z)
        x_e, ld_e = ref.inverse(z)
    assert torch.allclose(x_c, x_e, rtol=1e-5, atol=1e-6) and torch.allclose(ld_c, ld_e, rtol=1e-5, atol=1e-5)


def test_residual_flow_breaks_once_per_block_and_trains_compiled():
    """A residual block runs eagerly under torch.compile (its estimator differentiates g twice, which
    AOTAutograd does not support, and the roulette sets the series length on the host): one break
    per block, the rest of the model compiles, and a compiled training step equals the eager one."""
    build = lambda: resflow(shape=(4,), levels=1, steps_per_level=3, hidden=8)  # noqa: E731
    flow, x = _initialised(build)
    ex = torch._dynamo.explain(flow.log_prob)(x)
    reasons = {str(b.reason).splitlines()[0] for b in ex.break_reasons}
    assert ex.graph_break_count == 3 and all(RESIDUAL_BREAK in r for r in reasons), reasons
    ref = copy.deepcopy(flow)
    compiled = torch.compile(flow.log_prob, backend="aot_eager")
    torch.manual_seed(1)
    a = compiled(x)
    a.sum().backward()
    torch.manual_seed(1)  # the same probes and roulette draws: the same estimate
    b = ref.log_prob(x)
    b.sum().backward()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for p, q in zip(flow.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


class _TinyScaleNet(nn.Module):
    """A conditioner planting a scale of 1e-12 where x_a[0] > 0.5 (as tests/test_audit_planted.py)."""

    def forward(self, xa):
        inside = (xa[:, :1] > 0.5).to(xa.dtype).expand(-1, 3)
        return torch.cat([0.5 * inside, math.log(1e-12) * inside], dim=1)


def test_audit_of_a_compiled_flow_equals_the_eager_audit():
    from stableflows.audit import audit
    from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling
    from stableflows.transforms.linear import Permutation

    torch.manual_seed(0)
    coupling = AffineCoupling((6,), scale="exp", hidden=8)
    coupling.net = _TinyScaleNet()
    mix = AdditiveCoupling((6,), parity=1, hidden=8)
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_(0, 0.3)
    eager = Flow(Compose(Permutation((6,), kind="reverse"), coupling, mix), (6,))
    compiled = copy.deepcopy(eager).compile(backend="aot_eager")
    assert compiled.is_compiled and not copy.deepcopy(compiled).is_compiled  # copies are plain
    x = torch.rand(40, 6, generator=torch.Generator().manual_seed(1))
    reports = [audit(m, x, families="test", spectra_points=0, repeat=0) for m in (eager, compiled)]
    v0, v1 = (r.verdict["test"] for r in reports)
    assert v1.status == v0.status == "not invertible" and v1.n_fail == v0.n_fail > 0
    assert v1.culprit == v0.culprit == "transform.layers.1"
    e0, e1 = (r.families["test"].errors["l2"] for r in reports)
    assert torch.allclose(e0, e1, rtol=1e-6, atol=1e-12)
    stats = reports[1].families["test"].localization.layer("transform.layers.1").stats_inverse
    assert stats["min_scale"] == pytest.approx(1e-12, rel=1e-5)
    with trace(compiled) as t:  # traced calls run eagerly: every layer is recorded
        compiled(x[:4])
    assert [r.name for r in t.leaves()] == ["transform.layers.0", "transform.layers.1", "transform.layers.2"]


def test_train_compile_runs_the_compiled_model_and_saves_a_plain_checkpoint(tmp_path, monkeypatch):
    from stableflows.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from stableflows.models.registry import build_model
    from stableflows.train import train
    from stableflows.train.checkpoint import load_checkpoint

    compiled, runs = [], collections.Counter()
    real = torch.compile

    def aot_eager(fn, **kw):  # the Inductor compile takes minutes on 2 cores
        name = getattr(fn, "__name__", type(fn).__name__)
        compiled.append(name)
        c = real(fn, backend="aot_eager", **kw)

        def run(*args):
            runs[name] += 1
            return c(*args)
        return run

    monkeypatch.setattr(torch, "compile", aot_eager)
    cfg = RunConfig(model=ModelConfig(model="glow", hidden=8, levels=2, steps_per_level=1),
                    data=DataConfig(name="digits"),
                    train=TrainConfig(steps=6, eval_every=6, batch_size=32, out_dir=str(tmp_path), progress=False,
                                      compile=True, threads=1))
    result = train(cfg)
    assert compiled == ["Compose", "inverse", "_log_prob"]  # forward, inverse, log_prob of the live model
    assert runs["_log_prob"] == 6  # every training step ran the compiled log_prob (evaluation: the EMA copy)
    assert math.isfinite(result.test) and result.nonfinite_steps == 0
    ckpt = load_checkpoint(tmp_path / "best.pt")
    fresh = build_model(cfg.model, (1, 8, 8))
    fresh.load_state_dict(ckpt["model"])  # nothing of the compiled code in the state
    assert not fresh.is_compiled


def test_compile_flag_reaches_the_config():
    import argparse

    from stableflows.commands.options import add_config_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert config_from_args(p.parse_args(["--compile"])).train.compile is True
    assert config_from_args(p.parse_args([])).train.compile is False
