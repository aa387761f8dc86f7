"""The classifier's logit alpha: one default from Python, a config and the command line.

``ModelConfig.logit_alpha = None`` means "not given": each factory's own default applies, 0.003
(``DEFAULT_LOGIT_ALPHA``) for the density models and 0 (no logit) for ``classifier``, whose
finite-difference regulariser moves inputs by ``eps = 0.1`` out of ``[0, 1]`` and so out of a logit's
domain. Before, ``classifier()`` had no logit while ``--model classifier`` got ModelConfig's 0.003.
"""
from __future__ import annotations

import math

import pytest
import torch

from stableflows.cli import build_parser
from stableflows.commands.options import config_from_args
from stableflows.config import DEFAULT_LOGIT_ALPHA, ConfigError, ModelConfig, RunConfig
from stableflows.models import build_model, classifier
from stableflows.train.validation import validate_config
from stableflows.transforms.elementwise import Logit

SMALL = dict(levels=1, steps_per_level=1, hidden=4)
SHAPE = (1, 4, 4)


def _alphas(model) -> list[float]:
    return [m.alpha for m in model.modules() if isinstance(m, Logit)]


def _cli(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_python_config_and_cli_classifiers_have_no_logit():
    assert ModelConfig().logit_alpha is None
    assert _alphas(classifier(shape=SHAPE, **SMALL)) == []
    assert _alphas(classifier(shape=SHAPE, logit_alpha=None, **SMALL)) == []
    assert _alphas(build_model(ModelConfig(model="classifier", **SMALL), SHAPE)) == []
    cli = _cli("--model", "classifier", "--levels", "1", "--steps-per-level", "1", "--hidden", "4")
    assert cli.model.logit_alpha is None
    assert _alphas(build_model(cli.model, SHAPE)) == []


def test_given_alpha_reaches_every_model_and_flows_keep_theirs():
    cli = _cli("--model", "classifier", "--logit-alpha", "0.01", "--levels", "1", "--steps-per-level", "1")
    assert _alphas(build_model(cli.model, SHAPE)) == [0.01]
    assert _alphas(classifier(shape=SHAPE, logit_alpha=0.02, **SMALL)) == [0.02]
    for name in ("glow", "hybrid"):
        assert _alphas(build_model(ModelConfig(model=name, **SMALL), SHAPE)) == [DEFAULT_LOGIT_ALPHA], name
        assert _alphas(build_model(ModelConfig(model=name, logit_alpha=0.0, **SMALL), SHAPE)) == [], name
    # a stored config with an explicit alpha (every checkpoint before None meant "not given") rebuilds as stored
    old = RunConfig.from_dict({"model": {"model": "classifier", "logit_alpha": 0.05, **SMALL}})
    assert _alphas(build_model(old.model, SHAPE)) == [0.05]


def test_fd_moves_border_pixels_out_of_the_logits_domain():
    """Why the classifier has no logit by default: x + eps d with eps = 0.1 and a unit direction d
    leaves Logit(0.003)'s domain (-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha)) at the
    black pixels of a digit (written-out bound), and the forward refuses it."""
    alpha, eps = DEFAULT_LOGIT_ALPHA, 0.1
    lo = -alpha / (1 - 2 * alpha)
    x = torch.zeros(1, *SHAPE)  # a black image
    d = torch.full_like(x, -1.0 / math.sqrt(x[0].numel()))  # unit direction
    moved = x + eps * d
    assert float(moved.min()) == pytest.approx(-eps / 4) and float(moved.min()) < lo
    flow = build_model(ModelConfig(model="glow", **SMALL), SHAPE)
    with pytest.raises(ValueError, match="needs inputs in the open interval"):
        flow.log_prob(moved)
    assert torch.isfinite(classifier(shape=SHAPE, **SMALL).eval()(moved)).all()


def test_fd_classifier_without_alpha_passes_validation_hybrid_does_not():
    fd = ("--objective", "classification", "--fd-forward", "1e-3", "--data", "digits")
    validate_config(_cli("--model", "classifier", *fd))
    with pytest.raises(ConfigError, match="logit"):
        validate_config(_cli("--model", "classifier", "--logit-alpha", "0.01", *fd))
    with pytest.raises(ConfigError, match="logit_alpha = 0.003"):
        validate_config(_cli("--model", "hybrid", "--objective", "hybrid", "--fd-forward", "1e-3", "--data", "digits"))
