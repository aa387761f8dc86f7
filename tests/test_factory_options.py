"""Every option of every model factory that is passed reaches the built layers, through a direct
call and through ``build_model(ModelConfig(...))`` (the CLI and config-file path).

The reference is the built module tree itself (layer classes, their stored settings), read
independently of the factory code. The regression this guards against (issue 12): ``iresnet()``
used to treat a value equal to the config default (``coeff = 0.98``, ``lipswish``, ``roulette``) as
"not given" and built its own default instead; "not given" is now an explicit None.

Each factory's table must list every keyword of its signature (``test_every_option_is_listed``),
so an option added without a check here fails.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from stableflows.config import ModelConfig
from stableflows.estimators import ExactEstimator, RouletteEstimator, SeriesEstimator
from stableflows.memory import MemorySavingCompose
from stableflows.models import classifier, cv_glow, glow, hybrid, iresnet, nice, realnvp, resflow
from stableflows.models.registry import build_model
from stableflows.transforms.activations import ELU, LipSwish, Softplus
from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling
from stableflows.transforms.elementwise import Logit
from stableflows.transforms.linear import Invertible1x1, Permutation
from stableflows.transforms.lipschitz import LipschitzConv2d, LipschitzLinear
from stableflows.transforms.multiscale import MultiScale, SplitPrior
from stableflows.transforms.nets import MLP, GlowCNN
from stableflows.transforms.normalization import ActNorm
from stableflows.transforms.reshape import Squeeze
from stableflows.transforms.residual import ResidualBlock
from stableflows.transforms.scales import BiasedSigmoidScale, BoundedScale, ExpScale, TanhClampScale
from stableflows.transforms.splines import SplineCoupling

FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
IMG = (1, 8, 8)
VEC = (8,)


def of(m, cls) -> list:
    return [x for x in m.modules() if isinstance(x, cls)]


def couplings(m) -> list:
    return of(m, Coupling) + of(m, SplineCoupling)


def last_before_split(m) -> Coupling:
    ms = of(m, MultiScale)[0]
    return [c for c in ms.level.modules() if isinstance(c, Coupling)][-1]


def widths(m) -> set:
    return {c.net.net[0].out_channels if isinstance(c.net, GlowCNN) else c.net[0].out_features
            for c in couplings(m) if isinstance(c.net, (GlowCNN, MLP))}


def logit_alpha(m):
    return [x.alpha for x in of(m, Logit)]


def acts(m) -> list:
    return of(m, (LipSwish, ELU, Softplus))


def lips(m) -> list:
    return of(m, (LipschitzLinear, LipschitzConv2d))


def ests(m) -> list:
    return [b.estimator for b in of(m, ResidualBlock)]


# option -> (value, shape, base kwargs, check on the built model)
GLOW = {
    "levels": (3, IMG, {}, lambda m: len(of(m, Squeeze)) == 3),
    "steps_per_level": (3, IMG, {"levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, IMG, {}, lambda m: widths(m) == {7}),
    "coupling": ("additive", IMG, {}, lambda m: all(isinstance(c, AdditiveCoupling) for c in couplings(m))),
    "scale": ("exp", IMG, {}, lambda m: all(isinstance(c.scale, ExpScale) for c in of(m, AffineCoupling))),
    "permutation": ("shuffle", IMG, {}, lambda m: of(m, Permutation) and not of(m, Invertible1x1)),
    "mask": ("checkerboard", IMG, {"levels": 1}, lambda m: all(c.mask == "checkerboard" for c in couplings(m))),
    "logit_alpha": (0.01, IMG, {}, lambda m: logit_alpha(m) == [0.01]),
    "split_prior": (False, IMG, {}, lambda m: all(not p.learned for p in of(m, SplitPrior))),
    "actnorm": (False, IMG, {}, lambda m: not of(m, ActNorm)),
    "split_condition": ("factored", IMG, {}, lambda m: last_before_split(m).parity == 1),
    "split_shuffle": (True, IMG, {}, lambda m: isinstance(of(m, MultiScale)[0].level.layers[-1], Permutation)),
    "scale_floor": (0.05, IMG, {"scale": "biased_sigmoid"},
                    lambda m: all(isinstance(c.scale, BiasedSigmoidScale) and c.scale.eps == 0.05
                                  for c in of(m, AffineCoupling))),
}
REALNVP = {
    "levels": (1, IMG, {}, lambda m: len(of(m, Squeeze)) == 1),
    "steps_per_level": (3, IMG, {"levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, VEC, {}, lambda m: widths(m) == {7}),
    "scale": ("tanh_clamp", IMG, {}, lambda m: all(isinstance(c.scale, TanhClampScale) for c in couplings(m))),
    "mask": ("channel", IMG, {}, lambda m: all(c.mask == "channel" for c in couplings(m))),
    "logit_alpha": (0.0, IMG, {}, lambda m: logit_alpha(m) == []),
    "actnorm": (False, IMG, {}, lambda m: not of(m, ActNorm)),
    "scale_floor": (0.3, IMG, {"scale": "bounded"},
                    lambda m: all(isinstance(c.scale, BoundedScale) and c.scale.a == 0.3 for c in couplings(m))),
}
NICE = {
    "levels": (2, IMG, {}, lambda m: len(of(m, Squeeze)) == 2),
    "steps_per_level": (3, VEC, {"levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, VEC, {}, lambda m: widths(m) == {7}),
    "mask": ("checkerboard", IMG, {}, lambda m: all(c.mask == "checkerboard" for c in couplings(m))),
    "logit_alpha": (0.2, VEC, {}, lambda m: logit_alpha(m) == [0.2]),
}
CV_GLOW = {
    "levels": (3, IMG, {}, lambda m: len(of(m, Squeeze)) == 3),
    "steps_per_level": (3, IMG, {"levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, IMG, {}, lambda m: widths(m) == {7}),
    "permutation": ("conv1x1", IMG, {}, lambda m: all(not p.lu for p in of(m, Invertible1x1))),
}
TINY_RES = {"hidden": 6, "levels": 1, "steps_per_level": 2}
RESIDUAL = {  # for resflow and iresnet; values differ from both factories' defaults unless noted
    "levels": (2, IMG, {"hidden": 4, "steps_per_level": 1}, lambda m: len(of(m, Squeeze)) == 1),
    "steps_per_level": (3, VEC, {"hidden": 6, "levels": 1}, lambda m: len(of(m, ResidualBlock)) == 3),
    "hidden": (5, VEC, {"levels": 1, "steps_per_level": 1}, lambda m: {l.out_features for l in lips(m)} == {5, 8}),
    "logit_alpha": (0.01, VEC, TINY_RES, lambda m: logit_alpha(m) == [0.01]),
    "actnorm": (False, VEC, TINY_RES, lambda m: not of(m, ActNorm)),
    "coeff": (0.7, VEC, TINY_RES, lambda m: all(l.coeff == 0.7 for l in lips(m))),
    "activation": ("softplus", VEC, TINY_RES, lambda m: acts(m) and all(isinstance(a, Softplus) for a in acts(m))),
    "norm": ("inf", VEC, TINY_RES, lambda m: all(l.norm == "inf" for l in lips(m))),
    "estimator": ("exact", VEC, TINY_RES, lambda m: all(isinstance(e, ExactEstimator) for e in ests(m))),
    "n_exact_terms": (7, VEC, {**TINY_RES, "estimator": "roulette"}, lambda m: all(e.n_exact_terms == 7 for e in ests(m))),
    "eval_exact_terms": (11, VEC, {**TINY_RES, "estimator": "roulette"},
                         lambda m: all(e.eval_exact_terms == 11 for e in ests(m))),
    "n_samples": (3, VEC, {**TINY_RES, "estimator": "roulette"}, lambda m: all(e.n_samples == 3 for e in ests(m))),
    "dist": ("poisson", VEC, {**TINY_RES, "estimator": "roulette"}, lambda m: all(e.dist == "poisson" for e in ests(m))),
    "p": (0.3, VEC, {**TINY_RES, "estimator": "roulette"}, lambda m: all(e.p == 0.3 for e in ests(m))),
    "probe": ("rademacher", VEC, {**TINY_RES, "estimator": "series"}, lambda m: all(e.probe == "rademacher" for e in ests(m))),
    "n_series_terms": (9, VEC, {**TINY_RES, "estimator": "series"}, lambda m: all(e.n_terms == 9 for e in ests(m))),
    "neumann_grad": (False, VEC, {**TINY_RES, "estimator": "series"}, lambda m: all(not e.neumann_grad for e in ests(m))),
    "grad_in_forward": (False, VEC, {**TINY_RES, "estimator": "series"},
                        lambda m: all(not e.grad_in_forward for e in ests(m))),
    "n_power_iter": (3, VEC, TINY_RES, lambda m: all(l.n_power_iter == 3 for l in lips(m))),
    "power_atol": (1e-3, VEC, TINY_RES, lambda m: all(l.atol == 1e-3 for l in lips(m))),
    "power_rtol": (1e-2, VEC, TINY_RES, lambda m: all(l.rtol == 1e-2 for l in lips(m))),
    "max_power_iter": (7, VEC, TINY_RES, lambda m: all(l.max_iter == 7 for l in lips(m))),
    "fc_blocks": (2, IMG, {"hidden": 4, "steps_per_level": 1},
                  lambda m: sum(isinstance(b.g[-1], LipschitzLinear) for b in of(m, ResidualBlock)) == 2),
    "fc_hidden": (5, IMG, {"hidden": 4, "steps_per_level": 1, "fc_blocks": 1},
                  lambda m: any(isinstance(l, LipschitzLinear) and l.out_features == 5 for l in lips(m))),
    "factor_out": (True, IMG, {"hidden": 4, "steps_per_level": 1}, lambda m: bool(of(m, MultiScale))),
    "squeeze_first": (True, IMG, {"hidden": 4, "steps_per_level": 1}, lambda m: len(of(m, Squeeze)) == 2),
    "mlp_layers": (2, VEC, TINY_RES, lambda m: len(lips(m)) == 2 * len(of(m, ResidualBlock))),
    "inverse_atol": (1e-3, VEC, TINY_RES, lambda m: all(b.inverse_atol == 1e-3 for b in of(m, ResidualBlock))),
    "inverse_rtol": (1e-2, VEC, TINY_RES, lambda m: all(b.inverse_rtol == 1e-2 for b in of(m, ResidualBlock))),
    "inverse_max_iter": (17, VEC, TINY_RES, lambda m: all(b.max_iter == 17 for b in of(m, ResidualBlock))),
    "strict": (True, VEC, TINY_RES, lambda m: all(b.strict for b in of(m, ResidualBlock))),
}
# the regression of issue 12: values equal to the Residual Flow's defaults given to an i-ResNet
IRESNET_AT_RESFLOW_VALUES = {
    "coeff": (0.98, lambda m: all(l.coeff == 0.98 for l in lips(m))),
    "activation": ("lipswish", lambda m: all(isinstance(a, LipSwish) for a in acts(m))),
    "estimator": ("roulette", lambda m: all(isinstance(e, RouletteEstimator) for e in ests(m))),
}
CLF = {
    "n_classes": (3, IMG, {}, lambda m: m.n_classes == 3 and m.head[-1].out_features == 3),
    "levels": (1, IMG, {}, lambda m: len(of(m, Squeeze)) == 1),
    "steps_per_level": (3, IMG, {"levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, IMG, {}, lambda m: widths(m) == {7}),
    "coupling": ("affine", IMG, {}, lambda m: couplings(m) and all(isinstance(c, AffineCoupling) for c in couplings(m))),
    "scale": ("exp", IMG, {"coupling": "affine"}, lambda m: all(isinstance(c.scale, ExpScale) for c in couplings(m))),
    "permutation": ("reverse", IMG, {}, lambda m: of(m, Permutation) and not of(m, Invertible1x1)),
    "mask": ("checkerboard", IMG, {}, lambda m: all(c.mask == "checkerboard" for c in couplings(m))),
    "actnorm": (False, IMG, {}, lambda m: not of(m, ActNorm)),
    "head": ("mlp", IMG, {}, lambda m: len(of(m.head, torch.nn.Linear)) == 2),
    "head_hidden": (9, IMG, {"head": "mlp"}, lambda m: m.head[1].out_features == 9),
    "logit_alpha": (0.05, IMG, {}, lambda m: logit_alpha(m) == [0.05]),
    "memory_saving": (True, IMG, {}, lambda m: isinstance(m.flow, MemorySavingCompose) and m.flow.enabled),
}
HYB_RES = {"block": "residual", "hidden": 4, "levels": 1, "steps_per_level": 1}
HYBRID = {
    "n_classes": (3, IMG, {"block": "coupling"}, lambda m: m.head[-1].out_features == 3),
    "block": ("coupling_1x1", IMG, {}, lambda m: bool(of(m, Invertible1x1)) and not of(m, ResidualBlock)),
    "lam": (0.25, IMG, {"block": "coupling"}, lambda m: m.lam == 0.25),
    "levels": (1, IMG, {"block": "coupling"}, lambda m: len(of(m, Squeeze)) == 1),
    "steps_per_level": (3, IMG, {"block": "coupling", "levels": 1}, lambda m: len(couplings(m)) == 3),
    "hidden": (7, IMG, {"block": "coupling"}, lambda m: widths(m) == {7}),
    "coupling": ("additive", IMG, {"block": "coupling"}, lambda m: all(isinstance(c, AdditiveCoupling) for c in couplings(m))),
    "scale": ("exp", IMG, {"block": "coupling"}, lambda m: all(isinstance(c.scale, ExpScale) for c in couplings(m))),
    "actnorm": (False, IMG, {"block": "coupling"}, lambda m: not of(m, ActNorm)),
    "head": ("mlp", IMG, {"block": "coupling"}, lambda m: len(of(m.head, torch.nn.Linear)) == 2),
    "head_hidden": (9, IMG, {"block": "coupling", "head": "mlp"}, lambda m: m.head[1].out_features == 9),
    "logit_alpha": (0.0, IMG, {"block": "coupling"}, lambda m: logit_alpha(m) == []),
    "memory_saving": (True, IMG, {"block": "coupling"}, lambda m: m.flow.enabled),
    "coeff": (0.7, IMG, HYB_RES, lambda m: all(l.coeff == 0.7 for l in lips(m))),
    "activation": ("elu", IMG, HYB_RES, lambda m: acts(m) and all(isinstance(a, ELU) for a in acts(m))),
    "estimator": ("series", IMG, HYB_RES, lambda m: all(isinstance(e, SeriesEstimator) for e in ests(m))),
    "n_exact_terms": (6, IMG, HYB_RES, lambda m: all(e.n_exact_terms == 6 for e in ests(m))),
    "n_series_terms": (8, IMG, {**HYB_RES, "estimator": "series"}, lambda m: all(e.n_terms == 8 for e in ests(m))),
    "n_power_iter": (2, IMG, HYB_RES, lambda m: all(l.n_power_iter == 2 for l in lips(m))),
    "neumann_grad": (False, IMG, HYB_RES, lambda m: all(not e.neumann_grad for e in ests(m))),
    "grad_in_forward": (False, IMG, HYB_RES, lambda m: all(not e.grad_in_forward for e in ests(m))),
    "norm": ("inf", IMG, HYB_RES, lambda m: all(l.norm == "inf" for l in lips(m))),
}
TABLES = {"glow": (glow, GLOW), "realnvp": (realnvp, REALNVP), "nice": (nice, NICE), "cv_glow": (cv_glow, CV_GLOW),
          "resflow": (resflow, RESIDUAL), "iresnet": (iresnet, RESIDUAL), "classifier": (classifier, CLF),
          "hybrid": (hybrid, HYBRID)}
CASES = [(name, opt) for name, (_, table) in TABLES.items() for opt in table]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_option_is_listed(name):
    factory, table = TABLES[name]
    params = set(inspect.signature(factory).parameters) - {"shape", "config"}
    assert params == set(table), f"{name}: options without a check {sorted(params - set(table))}, " \
                                 f"stale checks {sorted(set(table) - params)}"


@pytest.mark.parametrize("name,option", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_option_reaches_the_layers(name, option):
    factory, table = TABLES[name]
    value, shape, base, check = table[option]
    torch.manual_seed(0)
    m = factory(shape=shape, **{**base, option: value})
    assert check(m), f"{name}({option}={value!r}) did not reach the built layers"
    if option in FIELDS:  # the same through the config (CLI / config files / checkpoints)
        m = build_model(ModelConfig(model=name, **{**base, option: value}), shape)
        assert check(m), f"ModelConfig(model={name!r}, {option}={value!r}) did not reach the built layers"


@pytest.mark.parametrize("option", sorted(IRESNET_AT_RESFLOW_VALUES))
def test_iresnet_takes_values_equal_to_the_config_default(option):
    value, check = IRESNET_AT_RESFLOW_VALUES[option]
    assert check(iresnet(shape=VEC, **TINY_RES, **{option: value}))
    assert check(build_model(ModelConfig(model="iresnet", **TINY_RES, **{option: value}), VEC))


@pytest.mark.parametrize("name,expected", [
    ("resflow", (0.98, LipSwish, RouletteEstimator, 1)),
    ("iresnet", (0.9, ELU, SeriesEstimator, 1)),
    ("hybrid", (0.98, LipSwish, RouletteEstimator, 5)),
])
def test_not_given_means_the_model_default(name, expected):
    """None ("not given") in a direct call and an unset ModelConfig field give the model's default."""
    coeff, act, est, n_iter = expected
    kw = HYB_RES if name == "hybrid" else TINY_RES
    shape = IMG if name == "hybrid" else VEC
    for m in (TABLES[name][0](shape=shape, **kw, coeff=None, activation=None, estimator=None, n_power_iter=None),
              build_model(ModelConfig(model=name, **kw), shape)):
        assert {l.coeff for l in lips(m)} == {coeff} and {l.n_power_iter for l in lips(m)} == {n_iter}
        assert all(isinstance(a, act) for a in acts(m)) and all(isinstance(e, est) for e in ests(m))


def test_residual_toys_default_without_actnorm():
    """2-D toy vectors get no ActNorm unless asked for; other shapes get it."""
    assert not of(resflow(shape=(2,), **TINY_RES), ActNorm)
    assert of(resflow(shape=(2,), **TINY_RES, actnorm=True), ActNorm)
    assert of(resflow(shape=VEC, **TINY_RES), ActNorm)
    assert not of(build_model(ModelConfig(model="resflow", **TINY_RES), (2,)), ActNorm)


def test_bad_split_options_are_refused():
    with pytest.raises(ValueError, match="split_condition"):
        glow(shape=IMG, split_condition="noise")
    with pytest.raises(ValueError, match="mask='channel'"):
        glow(shape=IMG, mask="checkerboard", split_condition="factored")
    with pytest.raises(ValueError, match="levels >= 2"):
        glow(shape=VEC, split_shuffle=True)
    with pytest.raises(ValueError, match="scale_floor"):
        glow(shape=IMG, scale="sigmoid", scale_floor=0.1)
