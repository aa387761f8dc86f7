"""End to end: a briefly trained digits flow through ``stableflows ood`` (the command module) and
through the Python API; the report files, their numbers and the flags they must carry."""
from __future__ import annotations

import argparse
import base64
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stableflows.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from stableflows.data import load_dataset
from stableflows.ood import OODConfig, analyze, build_sets, cli
from stableflows.train.checkpoint import load_checkpoint, save_checkpoint
from stableflows.train.evaluate import load_flow
from stableflows.train.loop import train

FAMILIES = ("uniform", "constant", "out_of_range", "natural_patches")


def _train(out, seed: int, model: str = "glow"):
    cfg = RunConfig(model=ModelConfig(model=model, hidden=8, levels=2, steps_per_level=1),
                    data=DataConfig(name="digits"),
                    train=TrainConfig(steps=25, batch_size=64, lr=3e-3, warmup=5, eval_every=25, seed=seed,
                                      out_dir=str(out), progress=False, threads=1))
    train(cfg)
    return out


def _perturbed_copy(run, path, seed: int):
    """A second ensemble member without a second training run: the checkpoint of ``run`` with its
    weights perturbed, saved as a checkpoint of the same config."""
    ckpt = load_checkpoint(run / "best.pt")
    g = torch.Generator().manual_seed(seed)
    weights = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "net" in k else v)
               for k, v in ckpt["model"].items()}
    save_checkpoint(path, {**{k: v for k, v in ckpt.items() if k not in ("format", "format_version")},
                           "model": weights})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ood")
    a = _train(base / "a", 0)
    return a, _perturbed_copy(a, base / "b.pt", 1), base


def _parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_cli_report_end_to_end(runs):
    a, b, base = runs
    out = base / "report"
    args = _parse([str(a), "--in", "digits", "--ood", ",".join(FAMILIES), "--report", str(out), "--n", "60",
                   "--ensemble", str(b), "--background", str(b), "--typicality-m", "1,10", "--bootstrap", "100"])
    assert cli.run(args) == 0
    s = json.loads((out / "ood.json").read_text())
    page = (out / "ood.html").read_text()
    # the figures are embedded PNGs
    imgs = page.split("data:image/png;base64,")[1:]
    assert len(imgs) >= 5
    assert base64.b64decode(imgs[0].split("'")[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page
    assert set(s["data"]["families"]) == set(FAMILIES)
    for f in FAMILIES:
        if f == "out_of_range":
            continue
        for m in s["scores"][f].values():
            assert 0.0 <= m["auroc"] <= 1.0
    # the logit pre-transform refuses every out-of-range input: no likelihood, hence no AUROC and no verdict
    oor = s["sets"]["out_of_range"]
    assert oor["status"]["outside_domain"] == oor["bpd"]["n"] == 60
    assert s["scores"]["out_of_range"] is None and s["best_score"]["out_of_range"] is None
    assert all(row["out_of_range"] is None for row in s["typicality"].values())
    line = next(f for f in s["findings"] if f.startswith("out_of_range:"))
    assert line == "out_of_range: no likelihood (60 outside the model's domain of 60 inputs): no AUROC, no verdict"
    audit_line = next(f for f in s["findings"] if f.startswith("audit:"))
    assert "no verdict on out_of_range" in audit_line and "every audited family" not in audit_line
    assert s["audit"]["out_of_range"]["status"] == "outside domain"
    assert "no likelihood: no AUROC" in page
    # the round trip of in-distribution data works: invertible, nothing flagged
    assert s["sets"]["test"]["invertibility"]["verdict"] == "invertible"
    assert s["sets"]["test"]["invertibility"]["n_meaningless"] == 0
    # decomposition adds up; probes and ensemble are there
    assert all(d is None or d["max_abs_sum_error"] < 1e-3 for d in s["decomposition"].values())
    assert len(s["probes"]["constant"]["bpd"]) == 17
    assert s["ensemble"]["members"] == 2
    assert "likelihood ratio -(log p - log p_bg)" in s["scores"]["uniform"]
    assert s["second_order"]["families"]["test"]["dim"] == 64
    assert any("mean bits/dim" in line for line in s["findings"])


@pytest.fixture(scope="module")
def small_analysis(runs):
    """(flow, splits, result) of a quick analysis of run ``a`` against uniform and constant inputs."""
    flow, _ = load_flow(runs[0])
    splits = load_dataset(DataConfig(name="digits"))
    cfg = OODConfig(families=("uniform", "constant"), n=40, typicality_m=(1,), bootstrap=50, second_order=False,
                    check_invertibility=False, decompose_n=8)
    return flow, splits, analyze(flow, splits, cfg)


def test_api_numbers_are_consistent(small_analysis):
    flow, splits, r = small_analysis
    bpd = r.arrays["bpd"]
    # bits/dim of the test split = the training loop's evaluation formula with the fixed noise (seed 0)
    u = torch.rand(splits.test.shape, generator=torch.Generator().manual_seed(0))
    v = (splits.test + u) / 17
    with torch.no_grad():
        ref = -(flow.log_prob(v).double().numpy() - 64 * math.log(17)) / (64 * math.log(2))
    assert np.allclose(bpd["test"], ref, atol=1e-4)
    # AUROC of the likelihood score is scikit-learn's on the same numbers
    y = np.r_[np.zeros(len(bpd["test"])), np.ones(len(bpd["uniform"]))]
    assert r.summary["scores"]["uniform"]["likelihood (bpd)"]["auroc"] == pytest.approx(
        roc_auc_score(y, np.r_[bpd["test"], bpd["uniform"]]), abs=1e-12)
    # entropy estimate = mean training bpd
    assert r.summary["entropy_bpd_train"] == pytest.approx(float(np.mean(bpd["train"])))


def test_bad_family_is_a_config_error():
    from stableflows.config import ConfigError

    splits = load_dataset(DataConfig(name="digits"))
    with pytest.raises(ConfigError, match="unknown OOD family"):
        build_sets(splits, OODConfig(families=("no_such_family",)))
    with pytest.raises(ConfigError, match="discrete"):
        build_sets(load_dataset(DataConfig(name="moons", n_toy=100)), OODConfig())


def test_cli_rejects_wrong_in_dataset(runs):
    from stableflows.config import ConfigError

    a, _, base = runs
    with pytest.raises(ConfigError, match="trained on digits"):
        cli.run(_parse([str(a), "--in", "mnist", "--report", str(base / "x")]))


def _idx(a: np.ndarray) -> bytes:
    """IDX file bytes (unsigned bytes): 0, 0, 0x08, ndim, big-endian sizes, data."""
    return bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.astype(np.uint8).tobytes()


def _write_idx_dataset(folder, rng, n_train=20, n_test=6, bright=False):
    folder.mkdir(parents=True)
    hi = 256 if bright else 64
    files = {"train-images-idx3-ubyte": rng.integers(0, hi, (n_train, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(n_train) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, hi, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, a in files.items():
        (folder / name).write_bytes(_idx(a))
    return files


def test_paper_pair_from_local_files(tmp_path):
    """Fashion-MNIST vs MNIST (the paper's pair) from tiny local IDX files."""
    from stableflows.config import ConfigError
    from stableflows.models import glow

    rng = np.random.default_rng(0)
    _write_idx_dataset(tmp_path / "fashion-mnist", rng, bright=True)
    mnist = _write_idx_dataset(tmp_path / "mnist", rng)
    splits = load_dataset(DataConfig(name="fashion-mnist", data_dir=str(tmp_path), val_size=0.25))
    cfg = OODConfig(families=("mnist",), data_dir=str(tmp_path), typicality_m=(1,), bootstrap=20,
                    second_order=False, check_invertibility=False, decompose_n=2, gray_factors=(1.0, 0.0))
    sets = build_sets(splits, cfg)
    assert torch.equal(sets["mnist"].x[:, 0], torch.tensor(mnist["t10k-images-idx3-ubyte"], dtype=torch.float64))
    flow = glow(shape=(1, 28, 28), levels=2, steps_per_level=1, hidden=4)
    flow.train()
    flow.log_prob(sets["train"].v.float())
    r = analyze(flow.eval(), splits, cfg, sets=sets)
    assert 0 <= r.summary["scores"]["mnist"]["likelihood (bpd)"]["auroc"] <= 1
    assert r.summary["sets"]["mnist"]["bpd"]["n"] == 6
    # a pair of different shapes is refused with a clear message
    with pytest.raises(ConfigError, match="shape"):
        build_sets(load_dataset(DataConfig(name="digits")), OODConfig(families=("mnist",), data_dir=str(tmp_path)))


def test_histograms_have_legends_on_both_panels_and_the_audits_colours(small_analysis, monkeypatch):
    """Issue 17: the left bits/dim histogram had no legend; a set keeps the audit's colour."""
    import matplotlib

    from stableflows.audit.fmt import family_colors
    from stableflows.ood import report as ood_report

    _, _, r = small_analysis
    shown = []
    monkeypatch.setattr(ood_report, "_png", lambda fig: shown.append(fig) or "")
    ood_report.figures(r)
    fig = shown[0]  # the bits/dim histograms
    colors = family_colors(list(r.arrays["bpd"]))
    for ax, expected in zip(fig.axes[:2], ({"train", "test", "uniform", "constant"}, {"train", "test"})):
        leg = ax.get_legend()  # the zoomed panel shows the sets that fall in the in-distribution range
        assert leg is not None
        labels = [t.get_text() for t in leg.get_texts()]
        assert expected <= set(labels)
        for patch, label in zip(leg.legend_handles, labels):
            color = patch.get_edgecolor() if label in ("train", "test", "val") else patch.get_facecolor()
            assert matplotlib.colors.to_hex(color) == matplotlib.colors.to_hex(colors[label])
