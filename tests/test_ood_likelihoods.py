"""``stableflows reproduce ood-likelihoods`` (paper 004): Glow and CV-Glow scored on OOD sets."""
from __future__ import annotations

import math

import numpy as np

from stableflows.experiments import registry, reports
from stableflows.experiments.ood_likelihoods import DIGITS_SETS, SETTINGS, rows_of


def test_quick_run_rows_obey_the_decomposition(tmp_path):
    """Every set of both flows gets a row; each row's bits/dim equals the one recomputed from its own
    decomposition, bpd = -(log p(z) + log|det|) / (D ln 2) + log2 L (docs/METRICS.md, per dimension);
    CV-Glow's log-det per dimension is the same on every set (constant volume), Glow's is not."""
    s = registry()["ood-likelihoods"](tmp_path, quick=True)
    sets = ("train", "test") + DIGITS_SETS
    assert {(r["model"], r["set"]) for r in s["rows"]} == {(m, k) for m in ("Glow", "CV-Glow") for k in sets}
    for r in s["rows"]:
        ref = -(r["log_pz_per_dim"] + r["logdet_per_dim"]) / math.log(2) + math.log2(17)
        assert abs(r["mean_bpd"] - ref) < 1e-6 * max(1.0, abs(ref)), r
        if r["set"] in DIGITS_SETS:
            assert 0.0 <= r["likelihood_auroc"] <= 1.0 and r["best_auroc"] >= r["likelihood_auroc"] - 1e-12
    cv = [r["logdet_per_dim"] for r in s["rows"] if r["model"] == "CV-Glow"]
    glow = [r["logdet_per_dim"] for r in s["rows"] if r["model"] == "Glow"]
    assert np.ptp(cv) < 1e-6 and np.ptp(glow) > 1e-3
    assert s["settings"]["models"]["CV-Glow"]["constant_volume"] and not s["settings"]["models"]["Glow"]["constant_volume"]
    assert (tmp_path / "table.md").is_file() and (tmp_path / "runs" / "Glow" / "ood" / "ood.html").is_file()


def test_28x28_sets_and_claims():
    """Fashion-MNIST is scored against the 28x28 companion set (digits28 among it); the seeds report
    tests 004's claim, OOD sets with a higher likelihood than the test set, for both flows."""
    from stableflows.data.ood import COMPANION_28

    _, val_size, fams = SETTINGS["fashion-mnist"]
    assert fams == COMPANION_28 and "digits28" in fams and "digits28" not in DIGITS_SETS and val_size < 0.1
    claims = reports()["ood-likelihoods"].claims
    assert {(c.a["model"], c.a["set"], c.b["set"]) for c in claims} == {
        (m, f, "test") for m in ("Glow", "CV-Glow") for f in ("digits28", "constant")}
    assert all(c.metric == "mean_bpd" and c.lower for c in claims)
    assert rows_of("m", {"sets": {}, "scores": {}, "best_score": {}}) == []
