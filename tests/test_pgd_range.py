"""The range attack of paper 000 Fig. 8 (``stableflows reproduce pgd-range``): flows without the logit
on centred data, attacked in [-0.7, 0.7]."""
from __future__ import annotations

import math

import torch
from fashion_data import needs_fashion_mnist

from stableflows.audit.attacks import constraint_box
from stableflows.experiments.pgd_range import EXPERIMENTS, WIDEN, centred
from stableflows.models import glow


def test_centred_flow_is_the_flow_of_v_minus_one_half():
    """log p of the centred flow at v equals the inner flow's at v - 1/2 (the shift has log-det 0),
    and the shift's parameters are frozen."""
    torch.manual_seed(0)
    inner = glow(shape=(1, 8, 8), levels=2, steps_per_level=1, hidden=4, logit_alpha=0.0).double()
    v = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        inner.log_prob(v - 0.5)  # ActNorm initialisation on the centred data
        ref = inner.log_prob(v - 0.5)
        flow = centred(inner)
        got = flow.log_prob(v)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    frozen = [p for n, p in flow.named_parameters() if n.startswith("transform.layers.0.")]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_range_box_is_minus_07_to_07_after_the_shift():
    x = torch.rand(3, 4)
    lo, hi = constraint_box("range", x, data_range=(0.0, 1.0), widen=WIDEN)
    assert torch.allclose(lo - 0.5, torch.full_like(lo, -0.7)) and torch.allclose(hi - 0.5, torch.full_like(hi, 0.7))


def test_quick_run(tmp_path):
    """The poster's whole table: the PGD cells, test data, samples at T = 1 / 0.7 / 0 and the OOD sets,
    for both flows; a trained flow reconstructs its own test data within the audit's tolerance."""
    s = EXPERIMENTS["pgd-range"](tmp_path, quick=True)
    got = {(r["model"], r["constraint"]) for r in s["rows"]}
    sets = ("pgd:cell", "pgd:range", "test", "samples_t1", "samples_t0.7", "samples_t0", "constant", "uniform",
            "grayed_mid", "inverted", "natural_patches")
    assert got == {(m, c) for m in ("Glow", "ResFlow") for c in sets}
    for r in s["rows"]:
        assert r["pct_outside_domain"] == 0.0  # no logit: the widened range is inside the domain
        assert math.isfinite(r["max_err"]) or r["pct_inf"] > 0
        if r["constraint"].startswith("pgd:"):
            assert r["status"] == "ok"
        else:
            assert r["n"] == (1 if r["constraint"] == "samples_t0" else 8)
    for m in ("Glow", "ResFlow"):
        test = next(r for r in s["rows"] if r["model"] == m and r["constraint"] == "test")
        assert test["pct_inf"] == 0.0 and test["max_err"] < 1e-3 and test["invertible_1e-3"]
    assert (tmp_path / "table.md").is_file()


def test_28x28_settings_fit_the_image_and_use_the_companion_sets():
    """Fashion-MNIST gets a Glow whose levels divide 28 (three would need 28 / 8) and the 28x28 OOD
    companion sets (digits in MNIST's layout among them); digits keep their settings."""
    from stableflows.data.ood import COMPANION_28
    from stableflows.experiments.glow_design import feasible_levels
    from stableflows.experiments.pgd_range import MODELS, SETTINGS, _families

    models, train, val_size = SETTINGS["fashion-mnist"]
    assert feasible_levels((1, 28, 28), models["Glow"]["levels"]) == models["Glow"]["levels"] == 2
    assert feasible_levels((1, 28, 28), MODELS["Glow"]["levels"]) < MODELS["Glow"]["levels"]
    assert 0 < val_size < 0.1 and train["steps"] >= 1000
    for shape in ((1, 28, 28), (784,)):  # Glow sees images, the Residual Flow vectors
        assert set(COMPANION_28) <= set(_families(shape)) and "digits28" in _families(shape)
    assert "digits28" not in _families((1, 8, 8)) and "digits28" not in _families((64,))


def test_28x28_conv_resflow_is_the_fast_config_without_its_logit():
    """ResFlow-conv is configs/resflow_fast_fashion.toml's model field for field, except the logit."""
    import dataclasses
    from pathlib import Path

    from stableflows.config import load_config
    from stableflows.experiments.pgd_range import CONV_RESFLOW, SETTINGS

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "resflow_fast_fashion.toml").model
    want = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "logit_alpha"}
    got = dataclasses.asdict(dataclasses.replace(cfg, **CONV_RESFLOW))
    assert {k: v for k, v in got.items() if k != "logit_alpha"} == want
    assert cfg.logit_alpha > 0 and CONV_RESFLOW["logit_alpha"] == 0.0
    assert SETTINGS["fashion-mnist"][0]["ResFlow-conv"] is CONV_RESFLOW


@needs_fashion_mnist
def test_quick_run_at_28x28_attacks_the_convolutional_residual_flow_too(tmp_path):
    """On Fashion-MNIST the table has a third flow, the convolutional Residual Flow, without the logit
    (the widened range lies inside its domain) and invertible on its test data."""
    s = EXPERIMENTS["pgd-range"](tmp_path, quick=True, data="fashion-mnist")
    conv = {r["constraint"]: r for r in s["rows"] if r["model"] == "ResFlow-conv"}
    assert {"pgd:cell", "pgd:range", "test", "digits28"} <= set(conv)
    assert {r["model"] for r in s["rows"]} == {"Glow", "ResFlow", "ResFlow-conv"}
    assert all(r["pct_outside_domain"] == 0.0 for r in conv.values())
    assert conv["pgd:range"]["status"] == "ok" and conv["test"]["max_err"] < 1e-3
    assert s["settings"]["models"]["ResFlow-conv"]["squeeze_first"] is True
