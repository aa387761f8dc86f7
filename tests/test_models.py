"""Model-level behaviour checked against independent computations."""
import math

import pytest
import torch

from stableflows.config import ConfigError, ModelConfig
from stableflows.metrics import bits_per_dim
from stableflows.models import Flow, build_model, cv_glow, glow, nice, realnvp
from stableflows.transforms.base import NonFiniteInputError, ShapeError



from conftest import perturb

pytestmark = pytest.mark.usefixtures("float64")


def _init(model, shape, n=32):
    model.train()
    with torch.no_grad():
        model(torch.rand(n, *shape) * 0.9 + 0.05)
    model.eval()


def test_cv_glow_logdet_is_constant_over_inputs():
    flow = cv_glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=8)
    _init(flow, (1, 8, 8))
    perturb(flow, 0.2)
    x = torch.rand(16, 1, 8, 8) * 3 - 1  # far from the data too
    _, ld = flow(x)
    assert torch.allclose(ld, ld[0].expand_as(ld), atol=1e-10)
    assert ld.abs().max() > 1e-3  # ActNorm / 1x1 conv make it non-trivial


def test_glow_logdet_depends_on_input():
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=8)
    _init(flow, (1, 8, 8))
    perturb(flow, 0.2)
    _, ld = flow(torch.rand(8, 1, 8, 8) * 0.9 + 0.05)
    assert ld.std() > 1e-4


def test_bits_per_dim_matches_definition():
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=1, hidden=8)
    _init(flow, (1, 8, 8))
    perturb(flow, 0.1)
    x = torch.randint(0, 17, (5, 1, 8, 8)).double()
    u = torch.rand(5, 1, 8, 8)
    v = (x + u) / 17
    z, ld = flow(v)
    # log N(z; 0, I) by hand, independent of the library helper
    logpz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    expected = -((logpz + ld) - 64 * math.log(17)) / (64 * math.log(2))
    assert torch.allclose(bits_per_dim(flow, x, 17, u=u), expected, atol=1e-10)


def test_uniform_model_scores_log2_levels():
    # a flow whose density on [0,1)^D is uniform: z = Phi^-1(v) (logit would not be uniform), so use
    # the definition directly: log p(v) = 0 gives bpd = log2 L.
    class Uniform(torch.nn.Module):
        def log_prob(self, v):
            return torch.zeros(v.shape[0])

    x = torch.randint(0, 17, (4, 64)).double()
    assert torch.allclose(bits_per_dim(Uniform(), x, 17), torch.full((4,), math.log2(17)))


def test_sample_shapes_and_temperature_zero():
    for flow, shape in [(glow(shape=(1, 8, 8), hidden=8, steps_per_level=1), (1, 8, 8)),
                        (realnvp(shape=(6,), levels=1, hidden=8), (6,)),
                        (nice(shape=(6,), hidden=8), (6,))]:
        _init(flow, shape)
        perturb(flow, 0.1)
        s = flow.sample(7, temperature=0.7)
        assert s.shape == (7, *shape) and torch.isfinite(s).all()
        s0 = flow.sample(3, temperature=0.0)
        x0, _ = flow.inverse(torch.zeros(1, *flow.latent_shape))
        assert torch.allclose(s0, x0.expand_as(s0))


def test_log_prob_rejects_bad_input():
    flow = glow(shape=(1, 8, 8), hidden=8, steps_per_level=1)
    with pytest.raises(ShapeError, match=r"\(batch, 1, 8, 8\)"):
        flow.log_prob(torch.rand(2, 64))
    bad = torch.rand(2, 1, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="1 NaN"):
        flow.log_prob(bad)
    with pytest.raises(ShapeError):
        flow.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.long))


def test_factory_argument_errors():
    with pytest.raises(ValueError, match="permutation"):
        glow(shape=(1, 8, 8), permutation="bogus")
    with pytest.raises(ValueError, match="coupling"):
        glow(shape=(1, 8, 8), coupling="bogus")
    with pytest.raises(ShapeError, match="divisible"):
        glow(shape=(1, 6, 6), levels=2)
    with pytest.raises(ShapeError):
        glow(shape=(1, 8))
    with pytest.raises(TypeError):
        glow((1, 8, 8))  # keyword-only


def test_build_model_from_config():
    flow = build_model(ModelConfig(model="glow", hidden=8, steps_per_level=1, levels=2), (1, 8, 8))
    assert isinstance(flow, Flow) and flow.config.hidden == 8
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(ModelConfig(model="nope"), (1, 8, 8))


def test_parameter_count_of_digits_glow_in_target_range():
    # the benchmark model of issue 2 (configs/demo.toml) is 200k-300k parameters
    from stableflows.config import load_config
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.toml")
    flow = build_model(cfg.model, (1, 8, 8))
    n = sum(p.numel() for p in flow.parameters())
    assert 200_000 <= n <= 300_000, n


def test_every_factory_is_importable_from_stableflows_models():
    """The README's import line: each name is the registered factory of its model."""
    from stableflows import models
    from stableflows.models import MODELS, classifier, cv_glow, glow, hybrid, iresnet, nice, realnvp, resflow

    for fn in (glow, realnvp, nice, cv_glow, resflow, iresnet, classifier, hybrid):
        assert MODELS[fn.__name__] is fn and fn.__name__ in models.__all__


def test_entry_validation_names_dtype_empty_batch_and_the_logit_domain():
    """Checked once at the model's entry (issue 17): a float32 input to a float64 model (and the
    reverse), an empty batch, and data outside the first layer's domain get named errors; nested
    layers are not re-checked, and ``validation(False)`` switches the checks off."""
    from stableflows.transforms.base import InputOutsideDomain, validation

    flow = glow(shape=(1, 8, 8), hidden=8, steps_per_level=1, logit_alpha=0.05)  # float64 (fixture)
    _init(flow, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8) * 0.9 + 0.05
    for call in (flow.log_prob, flow.forward):
        with pytest.raises(ShapeError, match=r"dtype torch\.float32 but the model computes in torch\.float64"):
            call(x.float())
        with pytest.raises(ShapeError, match="empty batch"):
            call(x[:0])
    with pytest.raises(ShapeError, match=r"dtype torch\.float32 but the model computes in torch\.float64"):
        flow.inverse(torch.randn(2, 64, dtype=torch.float32))
    with pytest.raises(ShapeError, match="empty batch"):
        flow.inverse(torch.randn(0, 64))
    bad = x.clone()
    bad[0, 0, 3, 3] = 1.5  # outside the Logit's domain (-a / (1 - 2a), (1 - a) / (1 - 2a)) for any alpha < 0.25
    with pytest.raises(InputOutsideDomain, match=r"Logit\(alpha=[0-9.e-]+\) needs inputs in the open interval"):
        flow.log_prob(bad)
    with validation(False):  # off: no check, the logit of a negative number is NaN
        assert torch.isnan(flow.log_prob(bad)[0]) and torch.isfinite(flow.log_prob(bad)[1:]).all()
    f32 = glow(shape=(1, 8, 8), hidden=8, steps_per_level=1).float()
    with pytest.raises(ShapeError, match="float64 but the model computes in torch.float32"):
        f32.log_prob(x)
    assert f32.log_prob(x.float()).dtype == torch.float32


def test_nested_layers_trust_the_checked_input():
    """Only the outermost call checks: a layer called on its own refuses a bad shape, the same layer
    inside a flow is not asked again (its check would see the model's valid input anyway)."""
    from stableflows.transforms import ActNorm

    layer = ActNorm((1, 8, 8))
    with pytest.raises(ShapeError, match=r"ActNorm input must have shape \(batch, 1, 8, 8\)"):
        layer(torch.rand(2, 1, 4, 4))
    flow = glow(shape=(1, 8, 8), hidden=8, steps_per_level=1)
    calls = []
    for m in flow.modules():
        if hasattr(m, "check_input") and m is not flow:
            m.check_input = lambda *a, _m=m, **k: calls.append(type(_m).__name__)
    flow.log_prob(torch.rand(2, 1, 8, 8) * 0.9 + 0.05)
    flow.inverse(torch.randn(2, 64))
    assert calls == []


def test_configs_of_earlier_checkpoints_rebuild_the_same_model():
    """Checkpoints written before issue 16 store power_atol = 1e-6, power_rtol = 1e-4 and no
    train.compile: they still parse, rebuild the adaptive power iteration they trained with, and
    their state dicts (unchanged layout) load strictly."""
    from stableflows.config import RunConfig
    from stableflows.transforms.lipschitz import LipschitzLinear

    old = RunConfig().to_dict()
    old["model"].update(model="resflow", hidden=8, levels=1, steps_per_level=2, power_atol=1e-6, power_rtol=1e-4)
    del old["train"]["compile"]
    cfg = RunConfig.from_dict(old)
    assert cfg.train.compile is False
    flow = build_model(cfg.model, (4,))
    lips = [m for m in flow.modules() if isinstance(m, LipschitzLinear)]
    assert lips and all(m.atol == 1e-6 and m.rtol == 1e-4 for m in lips)
    now = build_model(ModelConfig(model="resflow", hidden=8, levels=1, steps_per_level=2), (4,))
    assert all(m.atol is None and m.rtol is None for m in now.modules() if isinstance(m, LipschitzLinear))
    flow.load_state_dict(now.state_dict())  # strict: the same keys and shapes
