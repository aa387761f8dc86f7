"""Class-conditional training on digits and its audit, in Python and from the CLI.

Independent checks: the conditional test bits/dim against the unconditional Glow of the same
architecture, steps and seed; the class of the conditional samples as predicted by a logistic
regression fitted on the digits training split (scikit-learn, nothing of stableflows); a failure
planted in one coupling for one class, found by the audit in that class only and in that layer.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from stableflows.audit import audit
from stableflows.config import DataConfig, RunConfig
from stableflows.data import load_dataset
from stableflows.models import one_hot
from stableflows.train import load_flow, train
from stableflows.train.evaluate import quantize
from stableflows.train.objectives import ConditionalMaximumLikelihood
from stableflows.train.plots import class_samples
from stableflows.transforms.conditional import ConditionalAffineCoupling

STEPS = 150  # measured: test bpd cinn 2.431 / glow 2.496 (seed 0), 2.486 / 2.552 (seed 1); samples at T = 0.7
# classified 42 % (seed 0) / 36 % (seed 1) right
SMALL = {"hidden": 16, "steps_per_level": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for model in ("cinn", "glow"):
        cfg = RunConfig.from_dict({"model": {"model": model, **SMALL},
                                   "train": {"steps": STEPS, "eval_every": STEPS, "seed": 0, "progress": False,
                                             "out_dir": str(tmp_path_factory.mktemp(model))}})
        out[model] = train(cfg)
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def test_conditional_bpd_beats_the_unconditional_glow_at_the_same_steps(runs):
    assert runs["cinn"].metric == "bpd" and runs["glow"].metric == "bpd"
    assert runs["cinn"].test < runs["glow"].test - 0.02, (runs["cinn"].test, runs["glow"].test)


def test_class_conditional_samples_are_classified_as_their_class(runs, digits):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(digits.train.reshape(len(digits.train), -1).numpy(),
                                                digits.y_train.numpy())
    assert clf.score(digits.test.reshape(len(digits.test), -1).numpy(), digits.y_test.numpy()) > 0.9
    flow, _ = load_flow(runs["cinn"].out_dir)
    v = class_samples(flow, 20, 0.7)  # rows k * 20 ... of class k
    q = torch.nan_to_num(quantize(v, digits.levels)).reshape(200, -1).numpy()
    acc = float((clf.predict(q) == np.repeat(np.arange(10), 20)).mean())
    assert acc > 0.25, acc  # chance: 0.1


def test_checkpoint_restores_the_conditional_flow_and_its_test_bpd(runs, digits):
    flow, ckpt = load_flow(runs["cinn"].out_dir)
    assert flow.context_shape == (10,) and ckpt["config"]["model"]["model"] == "cinn"
    bpd = ConditionalMaximumLikelihood(10, digits.levels).evaluate(flow, digits.test, digits.y_test, digits.levels)
    assert bpd["bpd"] == pytest.approx(runs["cinn"].test, abs=1e-6)
    summary = json.loads((__import__("pathlib").Path(runs["cinn"].out_dir) / "metrics.json").read_text())
    assert "samples.png" in summary["outputs"]


class _Planted(nn.Module):
    """The trained conditioner, except for class ``k``: raw scales -60 (sigma(-58) ~ 6e-26) and shift + 0.5."""

    def __init__(self, net, k, half):
        super().__init__()
        self.net, self.k, self.half = net, k, half

    def forward(self, inp):  # (B, C_a + 10, H, W)
        h = self.net(inp)  # (B, 2 C_b, H, W): shifts, then raw scales
        on = inp[:, -10 + self.k:inp.shape[1] - 9 + self.k]  # the class-k channel of the context
        return torch.cat([h[:, :self.half] + 0.5 * on, h[:, self.half:] - 60.0 * on], dim=1)


def test_audit_of_the_trained_cinn_is_invertible_and_localises_a_planted_failure(runs, digits):
    flow, _ = load_flow(runs["cinn"].out_dir)
    opts = dict(families="test,samples_t1", spectra_points=0, repeat=0, localize_points=4)
    rep = audit(flow, digits, **opts)  # a labelled Splits: its labels are the contexts
    assert rep.verdict.invertible, rep.verdict.table()
    assert sorted(rep.families) == sorted(f"{f} | class {k}" for f in ("test", "samples_t1") for k in range(10))
    for k in range(10):  # every test example audited with its own label; one sample per example
        assert rep.verdict[f"test | class {k}"].n == int((digits.y_test == k).sum())
        assert rep.verdict[f"samples_t1 | class {k}"].n == int((digits.y_test == k).sum())
    name, layer = next((n, m) for n, m in flow.named_modules() if isinstance(m, ConditionalAffineCoupling))
    layer.net = _Planted(layer.net, 3, layer.trans_idx.numel())
    x = digits.test[:120]
    c = one_hot(digits.y_test[:120], 10)
    rep = audit(flow, x, levels=digits.levels, context=c, n=120, **opts)
    bad = rep.verdict["test | class 3"]
    assert bad.status == "not invertible" and bad.n_fail == bad.n == int((digits.y_test[:120] == 3).sum())
    assert bad.culprit == name, (bad.culprit, bad.culprit_reason)
    assert rep.verdict.failing == ["test | class 3", "samples_t1 | class 3"]


def test_cli_trains_evaluates_samples_and_audits_a_cinn(tmp_path, capsys):
    from stableflows.cli import main

    out = tmp_path / "c"
    r = subprocess.run([sys.executable, "-m", "stableflows", "train", "--model", "cinn", "--data", "digits",
                        "--steps", "10", "--eval-every", "10", "--hidden", "8", "--steps-per-level", "1",
                        "--out-dir", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (out / "samples.png").is_file() and "samples.png" in r.stdout
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "given the labels" in capsys.readouterr().out
    assert main(["sample", str(out), "--n", "3", "--label", "7", "--out", str(tmp_path / "s.npy")]) == 0
    assert "3 samples of class 7" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npy").shape == (3, 1, 8, 8)
    assert main(["sample", str(out), "--n", "2", "--label", "10"]) == 2
    assert "--label must lie in [0, 9]" in capsys.readouterr().err
    assert main(["audit", str(out), "--families", "test", "--spectra-points", "0", "--repeat", "0"]) == 0
    printed = capsys.readouterr().out
    assert "test | class 0" in printed and "test | class 9" in printed


def test_cli_cinn_with_fewer_context_features_than_classes_is_a_usage_error(tmp_path, capsys):
    from stableflows.cli import main

    assert main(["train", "--model", "cinn", "--data", "digits", "--context-features", "3", "--steps", "2",
                 "--hidden", "4", "--out-dir", str(tmp_path / "m")]) == 2
    assert "has labels 0..9, but the conditional flow takes contexts of 3 features" in capsys.readouterr().err
