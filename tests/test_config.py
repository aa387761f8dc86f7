"""Config files (TOML, YAML) and the flags generated from the config dataclasses."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from stableflows.cli import build_parser, main
from stableflows.commands.options import HELP, SECTIONS, add_config_arguments, config_from_args, flag_for
from stableflows.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, load_config

TOML = """
[model]
model = "realnvp"
hidden = 32
split_prior = false
[data]
name = "moons"
val_size = 0.2
[train]
steps = 123
time_budget = 9.5
lr = 0.002
"""
YAML = """
model: {model: realnvp, hidden: 32, split_prior: false}
data: {name: moons, val_size: 0.2}
train: {steps: 123, time_budget: 9.5, lr: 0.002}
"""
EXPECTED = RunConfig(ModelConfig(model="realnvp", hidden=32, split_prior=False), DataConfig(name="moons", val_size=0.2),
                     TrainConfig(steps=123, time_budget=9.5, lr=0.002))


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


@pytest.mark.parametrize("suffix, text", [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_config_files(tmp_path, suffix, text):
    f = tmp_path / f"run{suffix}"
    f.write_text(text)
    assert load_config(f) == EXPECTED
    assert parse(["--config", str(f)]) == EXPECTED
    # flags override the file, the rest of the file stays
    cfg = parse(["--config", str(f), "--hidden", "8", "--split-prior", "--data", "circles", "--time-budget", "none"])
    assert cfg == RunConfig(dataclasses.replace(EXPECTED.model, hidden=8, split_prior=True),
                            dataclasses.replace(EXPECTED.data, name="circles"),
                            dataclasses.replace(EXPECTED.train, time_budget=None))


def test_dict_round_trip():
    assert RunConfig.from_dict(EXPECTED.to_dict()) == EXPECTED
    with pytest.raises(ConfigError, match="unknown config section"):
        RunConfig.from_dict({"optim": {}})


def test_every_field_has_a_flag_and_help():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    dests = {a.dest: a for a in p._actions}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert len(HELP.get(key, "")) > 15, f"no help text for {key}"
            action = dests[f"cfg.{key}"]
            assert f"--{flag_for(section, f.name)}" in action.option_strings
            assert HELP[key] in action.help
    assert set(HELP) == {f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)}


def test_flag_names_and_types():
    cfg = parse(["--steps-per-level", "3", "--data", "digits", "--data-dir", "/x", "--no-actnorm", "--flatten",
                 "--lr", "1e-4", "--threads", "2", "--no-progress", "--logit-alpha", "0"])
    assert cfg.model.steps_per_level == 3 and cfg.model.actnorm is False and cfg.model.logit_alpha == 0.0
    assert cfg.data == DataConfig(name="digits", data_dir="/x", flatten=True)
    assert cfg.train.lr == 1e-4 and cfg.train.threads == 2 and cfg.train.progress is False
    assert parse([]) == RunConfig()  # nothing given: the defaults


@pytest.mark.parametrize("argv", [
    ["train", "--hiden", "3"],            # unknown option
    ["train", "--hidden", "3.5"],         # int expected
    ["train", "--lr", "fast"],            # number expected
    ["train", "--steps", "none"],         # not optional
    ["train", "--actnorm", "yes"],        # boolean flags take no value
    ["frobnicate"],                       # unknown command
])
def test_usage_errors_exit_2(argv, tmp_path, capsys):
    assert main([*argv, "--out-dir", str(tmp_path / "r")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, match", [
    ("[model]\nhiden = 3\n", "hiden"),
    ("[model]\nhidden = 'wide'\n", "integer"),
    ("[optim]\nlr = 1\n", "optim"),
    ("[model\n", "cannot parse"),
])
def test_bad_config_files_exit_2(tmp_path, capsys, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert main(["train", "--config", str(f), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "r").exists()


def test_missing_config_file_and_bad_suffix(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{}")
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    assert ".toml" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{flag_for(section, f.name)}" in out
    assert "--no-actnorm" in out and "--config" in out and "--resume" in out
    assert {"train", "eval", "sample"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_demo_config_is_valid():
    from pathlib import Path

    from stableflows.train.loop import validate_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml")
    validate_config(cfg)
    assert cfg.model.model == "glow" and cfg.data.name == "digits" and cfg.train.out_dir == "runs/demo"
    assert 60 <= cfg.train.time_budget <= 180  # make demo must finish within 5 minutes on 2 cores


def test_unset_options_pass_and_set_ones_are_checked():
    """Options left unset (None: the model's own default) pass; every set number is checked."""
    import math

    from stableflows.train.validation import validate_config

    validate_config(RunConfig())  # the defaults, several of them None
    for section, field, value in (("model", "coeff", 0.0), ("model", "coeff", math.inf), ("model", "power_atol", -1.0),
                                  ("model", "logit_alpha", 0.5), ("data", "val_size", 1.0), ("train", "lr", math.nan)):
        with pytest.raises(ConfigError, match=f"{section}.{field}"):
            validate_config(RunConfig().replace(section, **{field: value}))
    validate_config(RunConfig().replace("model", coeff=0.5, power_atol=None))
