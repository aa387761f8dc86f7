"""OOD scores: AUROC / AUPR against scikit-learn and hand-computed values, FPR@TPR, typicality,
complexity and latent-norm scores."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from stableflows.ood import scores as S


def _sk(s_in, s_ood):
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_ood))]
    s = np.r_[s_in, s_ood]
    return roc_auc_score(y, s), average_precision_score(y, s)


def test_auroc_hand_computed():
    # pairs (in, ood): (0,.5) ood>, (1,.5) ood<, (0,2) ood>, (1,2) ood>  -> 3/4
    assert S.auroc([0.0, 1.0], [0.5, 2.0]) == pytest.approx(0.75, abs=0)
    # one tie counts half: (1,1) tie, (1,3) >, (2,1) <, (2,3) >  -> 2.5/4
    assert S.auroc([1.0, 2.0], [1.0, 3.0]) == pytest.approx(0.625, abs=0)
    assert S.auroc([0, 1, 2], [3, 4]) == 1.0 and S.auroc([3, 4], [0, 1, 2]) == 0.0


def test_average_precision_hand_computed():
    # ranking (desc): ood 3 (P=1, R=.5), in 2, ood 1 (P=2/3, R=1)  -> .5*1 + .5*2/3
    assert S.average_precision([2.0], [3.0, 1.0]) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_aupr_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_in, n_ood = rng.integers(5, 200, size=2)
    s_in = rng.normal(0.0, 1.0, n_in)
    s_ood = rng.normal(rng.uniform(-1, 1), rng.uniform(0.3, 3), n_ood)
    if seed % 2:  # heavy ties
        s_in, s_ood = np.round(s_in), np.round(s_ood)
    auc, ap = _sk(s_in, s_ood)
    assert S.auroc(s_in, s_ood) == pytest.approx(auc, abs=1e-12)
    assert S.average_precision(s_in, s_ood) == pytest.approx(ap, abs=1e-12)
    m = S.ood_metrics(torch.tensor(s_in), torch.tensor(s_ood))  # tensors are accepted too
    assert m["auroc"] == pytest.approx(auc, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(np.r_[np.ones(n_in), np.zeros(n_ood)],
                                                                 -np.r_[s_in, s_ood]), abs=1e-12)


def test_nonfinite_scores_count_as_detected():
    s_in = np.array([0.0, 1.0, 2.0])
    s_ood = np.array([np.nan, -np.inf, 0.5])  # two unevaluable inputs -> +inf
    expected = roc_auc_score(np.r_[0, 0, 0, 1, 1, 1], np.r_[s_in, 1e300, 1e300, 0.5])
    assert S.auroc(s_in, s_ood) == pytest.approx(expected)
    m = S.ood_metrics(s_in, s_ood)
    assert m["nonfinite_ood"] == 2 and m["nonfinite_in"] == 0


def test_empty_class_is_an_error():
    with pytest.raises(ValueError, match="both classes"):
        S.auroc([], [1.0])


def test_fpr_at_tpr():
    s_ood = np.arange(100, dtype=float)  # largest threshold detecting >= 95 of 100: s >= 5
    s_in = np.array([4.0, 5.0, 6.0, 100.0])
    assert S.fpr_at_tpr(s_in, s_ood) == pytest.approx(3 / 4)
    assert S.fpr_at_tpr(s_in, s_ood, tpr=1.0) == 1.0  # threshold 0 flags everything


def test_typicality_statistics():
    nll = np.array([1.0, 2.0, 3.0, 10.0])
    assert np.allclose(S.typicality_scores(nll, 2.5), [1.5, 0.5, 0.5, 7.5])
    b = S.typicality_batches(nll, 2.5, 3, k=50, seed=1)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 4, size=(50, 3))
    assert np.allclose(b, np.abs(nll[idx].mean(1) - 2.5))
    # the threshold is the (1 - alpha) bootstrap quantile: about alpha of fresh in-distribution batches exceed it
    rng = np.random.default_rng(0)
    val, test = rng.normal(3.0, 0.5, 2000), rng.normal(3.0, 0.5, 2000)
    thr = S.typicality_threshold(val, 3.0, 10, alpha=0.05, k=4000, seed=0)
    rate = np.mean(S.typicality_batches(test, 3.0, 10, k=4000, seed=7) > thr)
    assert 0.03 < rate < 0.07
    # a batch of atypically LIKELY inputs is detected, although raw likelihood would call it in-distribution
    ood = rng.normal(1.5, 0.1, 500)
    assert np.mean(S.typicality_batches(ood, 3.0, 10, k=200) > thr) == 1.0
    assert S.auroc(test, ood) < 0.01


def test_complexity_bits_independent_zlib():
    x = torch.tensor([[0.0] * 64, list(np.arange(64) % 17)]).reshape(2, 1, 8, 8)
    bits = S.complexity_bits(x, 17)
    q = np.clip(np.round(x.numpy().reshape(2, -1) * 255 / 16), 0, 255).astype(np.uint8)
    ref = [8 * len(zlib.compress(r.tobytes(), 9)) / 64 for r in q]
    assert np.allclose(bits, ref)
    assert bits[0] < bits[1]  # a constant image is simpler
    assert np.allclose(S.complexity_corrected([5.0, 5.0], x, 17), 5.0 - bits)


def test_latent_norm_and_likelihood_ratio():
    z = np.zeros((2, 8))
    z[1] = 1.0
    s = S.latent_norm_scores(z)
    assert s[0] == pytest.approx(8 / math.sqrt(16)) and s[1] == pytest.approx(0.0)
    assert np.allclose(S.likelihood_ratio([-1.0, -5.0], [-2.0, -1.0]), [-1.0, 4.0])


def test_summarize():
    s = S.summarize([1.0, 2.0, np.nan, 3.0])
    assert s["n"] == 4 and s["nonfinite"] == 1 and s["mean"] == pytest.approx(2.0) and s["median"] == 2.0


def test_background_perturbation():
    from stableflows.config import DataConfig
    from stableflows.data import load_dataset
    from stableflows.ood.background import perturb, perturbed_splits

    x = torch.zeros(200, 1, 8, 8)
    p = perturb(x, 17, 0.3, seed=1)
    changed_or_drawn = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
    assert torch.equal(p[~changed_or_drawn], x[~changed_or_drawn])  # untouched entries keep their value
    assert p.min() >= 0 and p.max() <= 16 and torch.equal(p, torch.round(p))
    frac = float((p != 0).double().mean())  # a replaced entry is 0 again with probability 1/17
    assert abs(frac - 0.3 * 16 / 17) < 0.01
    assert torch.equal(perturb(x, 17, 0.0), x)
    s = load_dataset(DataConfig(name="digits"))
    b = perturbed_splits(s, 0.2)
    assert torch.equal(b.test, s.test) and not torch.equal(b.train, s.train) and b.train.shape == s.train.shape


def test_train_background_never_overwrites_silently(tmp_path, monkeypatch):
    """Each call without out_dir gets its own run directory; a given one holding a run is refused
    unless overwrite=True (the background model used to go to a fixed runs/background)."""
    from stableflows.config import RunConfig
    from stableflows.data import load_dataset
    from stableflows.ood.background import train_background
    from stableflows.train.rundir import RunDirError

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict({"model": {"model": "glow", "levels": 1, "steps_per_level": 1, "hidden": 4},
                               "data": {"name": "digits"},
                               "train": {"steps": 2, "eval_every": 2, "progress": False, "ema_decay": 0.0}})
    splits = load_dataset(cfg.data, seed=0)
    a = train_background(cfg, splits)
    b = train_background(cfg, splits)
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(d.startswith("glow-digits-background-") for d in dirs), dirs
    assert (tmp_path / "runs" / dirs[0] / "best.pt").is_file() and a.steps == b.steps == 2
    train_background(cfg, splits, out_dir=tmp_path / "bg")
    with pytest.raises(RunDirError):
        train_background(cfg, splits, out_dir=tmp_path / "bg")
    assert train_background(cfg, splits, out_dir=tmp_path / "bg", overwrite=True).steps == 2
