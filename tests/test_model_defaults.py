"""Defaults that must not depend on the way a model is built.

The logit pre-transform's alpha: one value (``DEFAULT_LOGIT_ALPHA``, chosen from measurements
written next to it in ``stableflows/config.py``) for every factory and the CLI.

The invertible classifier has one default coupling, the same from Python, from a config and from
the command line: additive (poster 001: Lip(F) and Lip(F^-1) of additive blocks are bounded
globally, of affine blocks only locally; in the supervised table affine without regulariser is the
row that is not invertible). ``coupling = None`` (not given) is the model's own default; flows keep affine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stableflows.cli import build_parser
from stableflows.commands.options import config_from_args
import inspect

from stableflows.config import DEFAULT_LOGIT_ALPHA, ModelConfig, RunConfig
from stableflows.models import build_model, classifier, glow, hybrid, iresnet, nice, realnvp, resflow
from stableflows.transforms.elementwise import Logit
from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling

ROOT = Path(__file__).resolve().parents[1]


def _couplings(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (AdditiveCoupling, AffineCoupling))}


def _cli_config(*argv: str) -> RunConfig:
    args = build_parser().parse_args(["train", *argv])
    return config_from_args(args)


def test_python_config_and_cli_classifiers_agree_on_additive():
    small = dict(levels=1, steps_per_level=2, hidden=4)
    assert _couplings(classifier(shape=(1, 4, 4), **small)) == {AdditiveCoupling}
    cfg = ModelConfig(model="classifier", **small)
    assert cfg.coupling is None
    assert _couplings(build_model(cfg, (1, 4, 4))) == {AdditiveCoupling}
    cli = _cli_config("--model", "classifier", "--levels", "1", "--steps-per-level", "2", "--hidden", "4")
    assert _couplings(build_model(cli.model, (1, 4, 4))) == {AdditiveCoupling}


def test_explicit_coupling_and_flow_defaults_are_kept():
    small = dict(levels=1, steps_per_level=2, hidden=4)
    cli = _cli_config("--model", "classifier", "--coupling", "affine", "--levels", "1", "--steps-per-level", "2")
    assert cli.model.coupling == "affine"
    assert _couplings(build_model(cli.model, (1, 4, 4))) == {AffineCoupling}
    # Glow keeps its affine default, from Python and from the CLI
    assert _couplings(glow(shape=(1, 4, 4), **small)) == {AffineCoupling}
    g = _cli_config("--model", "glow", "--levels", "1", "--steps-per-level", "2", "--hidden", "4")
    assert _couplings(build_model(g.model, (1, 4, 4))) == {AffineCoupling}
    # a stored config with an explicit coupling (every checkpoint before None meant "not given") rebuilds as stored
    old = RunConfig.from_dict({"model": {"model": "classifier", "coupling": "affine", **small}})
    assert _couplings(build_model(old.model, (1, 4, 4))) == {AffineCoupling}


def test_cli_help_names_the_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "additive for classifier" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_cli_trained_classifier_is_additive(tmp_path):
    """What a user runs: ``stableflows train --model classifier ...`` stores an additive classifier."""
    out = tmp_path / "clf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "stableflows", "train", "--model", "classifier", "--objective",
                        "classification", "--data", "digits", "--logit-alpha", "0", "--levels", "1",
                        "--steps-per-level", "1", "--hidden", "4", "--steps", "2", "--eval-every", "2",
                        "--no-progress", "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from stableflows.train import load_flow

    model, ckpt = load_flow(out)
    assert ckpt["config"]["model"]["coupling"] is None
    assert _couplings(model) == {AdditiveCoupling}


def test_logit_alpha_default_is_one_value_everywhere():
    assert DEFAULT_LOGIT_ALPHA == 0.003 and ModelConfig().logit_alpha is None  # None: the model's own
    for fn in (glow, realnvp, nice, resflow, iresnet, hybrid):
        assert inspect.signature(fn).parameters["logit_alpha"].default == DEFAULT_LOGIT_ALPHA, fn.__name__
    cli = _cli_config("--model", "glow", "--levels", "1", "--steps-per-level", "1", "--hidden", "4")
    for flow in (glow(shape=(1, 4, 4), levels=1, steps_per_level=1, hidden=4), build_model(cli.model, (1, 4, 4))):
        (logit,) = [m for m in flow.modules() if isinstance(m, Logit)]
        assert logit.alpha == 0.003
    # the reproduced tables keep the alpha their README figures were measured with
    from stableflows.experiments import glow_design, hybrid as hybrid_exp

    assert glow_design.LOGIT_ALPHA == hybrid_exp.LOGIT_ALPHA == 0.05
    flow, cfg = glow_design.build_variant(glow_design.CONTROL, glow_design.QUICK)
    assert cfg.logit_alpha == 0.05 and [m.alpha for m in flow.modules() if isinstance(m, Logit)] == [0.05]
