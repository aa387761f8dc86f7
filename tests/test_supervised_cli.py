"""``stableflows train`` / ``eval`` for invertible classifiers and hybrid models: the objective,
finite-difference / NF regularisers, memory saving and the gradient-angle check come from config
fields and CLI flags; exact resumption; clear errors for bad combinations (before training)."""
from __future__ import annotations

import json

import pytest
import torch

import stableflows.train.loop as loop
from stableflows.cli import main
from stableflows.config import RunConfig
from stableflows.memory import has_memory_saving
from stableflows.train.checkpoint import load_checkpoint
from stableflows.train.supervised import ClassificationObjective, HybridObjective

SMALL = ["--data", "digits", "--levels", "1", "--steps-per-level", "2", "--hidden", "8", "--batch-size", "32",
         "--lr", "3e-3", "--warmup", "2", "--no-progress", "--threads", "1", "--logit-alpha", "0"]
CLASSIFIER = ["--model", "classifier", "--objective", "classification", "--coupling", "additive",
              "--memory-saving", "--fd-forward", "1e-3", "--fd-inverse", "2e-3", "--fd-eps", "0.05",
              "--fd-every", "2", "--angle-every", "3", "--fallback", "--head", "linear"]
TIME_KEYS = ("time", "eval_time", "steps_per_s")


def records(out, kind):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


@pytest.fixture
def spy(monkeypatch):
    """The objective the train command builds from the config."""
    seen = []
    real = loop.build_objective

    def build(cfg):
        seen.append(real(cfg))
        return seen[-1]

    monkeypatch.setattr(loop, "build_objective", build)
    return seen


def test_classifier_with_fd_and_memory_saving_writes_accuracy(tmp_path, spy, capsys):
    out = tmp_path / "cls"
    assert main(["train", *SMALL, *CLASSIFIER, "--steps", "12", "--eval-every", "6", "--out-dir", str(out)]) == 0
    # the config values reach the objective
    (obj,) = spy
    assert isinstance(obj, ClassificationObjective) and obj.nf is None
    assert (obj.fd.weight_forward, obj.fd.weight_inverse, obj.fd.eps, obj.fd.every) == (1e-3, 2e-3, 0.05, 2)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert 0 <= r["val_acc"] <= 1 and r["val_error"] == pytest.approx(1 - r["val_acc"])
        assert r["train_fd_forward"] > 0 and r["train_fd_inverse"] > 0  # averaged over the FD steps only
        assert "train_grad_angle" not in r and r["grad_fallbacks"] == 0
    # gradient angle every 3 steps, tiny for an additive stack (exact inverse)
    checks = records(out, "grad_check")
    assert [r["step"] for r in checks] == [3, 6, 9, 12]
    assert all(r["angle"] < 1e-2 and r["rel_error"] < 1e-4 and not r["fallback"] for r in checks)
    test = records(out, "test")[-1]
    assert 0 <= test["test_acc"] <= 1 and "test_bpd" in test
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metric"] == "error" and summary["config"]["train"]["objective"] == "classification"
    assert summary["config"]["model"]["memory_saving"] is True
    text = capsys.readouterr().out
    assert "test error" in text and "gradient checks: 4" in text
    # eval reports accuracy from the stored config and matches the training run's test record
    assert main(["eval", str(out)]) == 0
    res = json.loads(next(out.glob("eval-best-step*-test.json")).read_text())  # named after the checkpoint
    assert res["metric"] == "error" and res["acc"] == pytest.approx(test["test_acc"])
    assert res["bpd"] == pytest.approx(test["test_bpd"], rel=1e-5)


def test_classifier_with_nf_regulariser(tmp_path, spy):
    out = tmp_path / "nf"
    assert main(["train", *SMALL, "--model", "classifier", "--objective", "classification", "--nf-weight", "0.02",
                 "--label-smoothing", "0.1", "--steps", "4", "--eval-every", "4", "--out-dir", str(out)]) == 0
    (obj,) = spy
    assert obj.nf.weight == 0.02 and obj.fd is None and obj.label_smoothing == 0.1
    assert records(out, "eval")[-1]["train_nf_bpd"] > 0
    assert not records(out, "grad_check")  # no memory saving, no checks


def test_hybrid_trains_with_lam_from_the_config(tmp_path, spy):
    out = tmp_path / "hyb"
    assert main(["train", *SMALL, "--model", "hybrid", "--objective", "hybrid", "--block", "coupling",
                 "--lam", "0.015625", "--memory-saving", "--fd-inverse", "1e-3", "--fd-every", "1",
                 "--angle-every", "2", "--steps", "4", "--eval-every", "4", "--out-dir", str(out)]) == 0
    (obj,) = spy
    assert isinstance(obj, HybridObjective) and obj.lam is None  # the model's lam, set from model.lam
    assert obj.fd.weight_inverse == 1e-3 and obj.fd.weight_forward == 0
    ckpt = load_checkpoint(out / "last.pt")
    cfg = RunConfig.from_dict(ckpt["config"])
    assert (cfg.model.model, cfg.model.block, cfg.model.lam) == ("hybrid", "coupling", 0.015625)
    rec = records(out, "eval")[-1]
    assert "val_acc" in rec and "train_bpd" in rec and "train_fd_inverse" in rec
    assert [r["step"] for r in records(out, "grad_check")] == [2, 4]


def test_memory_saving_flag_builds_a_memory_saving_model():
    from stableflows.models.registry import build_model

    cfg = RunConfig().replace("model", model="classifier", memory_saving=True, hidden=4, levels=1,
                              steps_per_level=1, head="bn_relu", n_classes=3)
    model = build_model(cfg.model, (1, 8, 8))
    assert has_memory_saving(model) and model.n_classes == 3
    assert isinstance(model.head[1], torch.nn.BatchNorm1d)
    assert not has_memory_saving(build_model(cfg.model.__class__(**{**cfg.model.__dict__, "memory_saving": False}),
                                             (1, 8, 8)))


def _state(out):
    s = load_checkpoint(out / "last.pt")
    return s["model"], s["optimizer"]["state"]


def test_supervised_resume_follows_the_uninterrupted_run(tmp_path):
    args = [*SMALL, *CLASSIFIER, "--eval-every", "4"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *args, "--steps", "12", "--out-dir", str(full)]) == 0
    assert main(["train", *args, "--steps", "8", "--out-dir", str(split)]) == 0
    assert main(["train", "--resume", "--steps", "12", "--out-dir", str(split)]) == 0  # stored config
    (ma, oa), (mb, ob) = _state(full), _state(split)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k])

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]

    for kind in ("eval", "grad_check", "test"):
        assert strip(records(full, kind)) == strip(records(split, kind)), kind
    # changing a regulariser on resume is refused
    assert main(["train", "--resume", "--steps", "16", "--fd-forward", "0.5", "--out-dir", str(split)]) == 2


def test_old_configs_without_the_new_fields_load_with_defaults():
    d = RunConfig().to_dict()
    for k in ("n_classes", "head", "head_hidden", "block", "lam", "memory_saving"):
        del d["model"][k]
    for k in ("objective", "fd_forward", "fd_inverse", "fd_eps", "fd_every", "nf_weight", "label_smoothing",
              "angle_every", "fallback", "max_angle", "max_rel_error"):
        del d["train"][k]
    cfg = RunConfig.from_dict(d)
    assert cfg == RunConfig() and cfg.train.objective == "likelihood" and not cfg.model.memory_saving
    assert isinstance(loop.build_objective(cfg), loop.MaximumLikelihood)


@pytest.mark.parametrize("extra,match", [
    (["--model", "classifier", "--objective", "regression"], "train.objective must be one of likelihood, "
                                                              "classification, hybrid"),
    (["--model", "classifier", "--objective", "classification", "--fd-forward", "-1"], "train.fd_forward must be >= 0"),
    (["--model", "classifier", "--objective", "classification", "--fd-inverse=-1e-3"], "train.fd_inverse"),
    (["--model", "classifier", "--objective", "classification", "--nf-weight", "-0.1"], "train.nf_weight must be >= 0"),
    (["--model", "hybrid", "--objective", "hybrid", "--lam", "-1"], "model.lam must be >= 0"),
    (["--model", "classifier", "--objective", "classification", "--fd-eps", "0"], "train.fd_eps must be > 0"),
    (["--model", "classifier", "--objective", "classification", "--fd-every", "0"], "train.fd_every must be >= 1"),
    (["--model", "hybrid", "--objective", "hybrid", "--nf-weight", "0.1"], "hybrid objective already contains"),
    (["--model", "glow", "--fd-forward", "1e-3"], "classification and hybrid objectives only"),
    (["--model", "classifier", "--objective", "classification", "--angle-every", "5"], "model.memory_saving = true"),
    (["--model", "classifier", "--objective", "classification", "--fd-forward", "1e-3", "--logit-alpha", "0.05"],
     "logit_alpha = 0"),
    (["--model", "glow", "--objective", "classification"], "needs a model with a classification head"),
    (["--model", "glow", "--memory-saving"], "memory-saving chain"),
    (["--model", "classifier", "--objective", "classification", "--n-classes", "5"], "labels up to 9"),
])
def test_bad_options_are_rejected_before_training(tmp_path, capsys, extra, match):
    out = tmp_path / "bad"
    assert main(["train", *SMALL, "--steps", "2", "--out-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (out / "last.pt").exists()


def test_supervised_objective_on_unlabelled_data_is_rejected(tmp_path):
    import dataclasses

    from stableflows.config import ConfigError, DataConfig
    from stableflows.data import load_dataset
    from stableflows.train import train

    splits = dataclasses.replace(load_dataset(DataConfig(name="digits")), y_train=None, y_val=None, y_test=None)
    cfg = RunConfig().replace("model", model="classifier", hidden=4, levels=1, steps_per_level=1, logit_alpha=0.0)
    cfg = cfg.replace("train", objective="classification", steps=2, out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="needs labels, but data set digits has none"):
        train(cfg, splits=splits)
    assert not (tmp_path / "run" / "last.pt").exists()
