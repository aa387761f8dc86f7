"""Paper 004 (Nalisnick, Matsukawa, Teh, Gorur & Lakshminarayanan, "Do Deep Generative Models Know
What They Don't Know?"): likelihoods of a flow on data it was not trained on.

``ood-likelihoods`` trains, per seed, the two flows 004 analyses -- Glow (affine coupling, here
Glow's sigmoid scale) and the constant-volume Glow (CV-Glow: translations only, 1x1 convolutions
and ActNorm, no logit; its log-det does not depend on x, 004 Sec. 5) -- on the in-distribution data
and scores with :func:`stableflows.ood.analyze` the training split, the test split and each OOD set:

* the bits/dim of every set (004 Fig. 1 / 2: the histograms, in each model's ``ood.html``) and the
  AUROC of the likelihood as an OOD score (test = negative, OOD = positive; below 0.5 means the
  model gives the OOD set *higher* likelihood);
* the decomposition ``log p(x) = log p(z) + log|det|`` per dimension (004 Fig. 4; per layer and
  level in ``ood.json`` / ``ood.html``);
* constant and random inputs, and the graying curve (004 Fig. 6b) in each model's report;
* the second-order prediction of the likelihood gap (004 Eq. 5, the full Hessian at the training
  mean) next to the measured gap, and whether their signs agree;
* the best of the library's other scores (typicality test on batches, complexity-corrected
  likelihood, latent norm) with its AUROC.

Sets: on 28x28 data (Fashion-MNIST) the companion set of :data:`stableflows.data.ood.COMPANION_28`
(constant, uniform, grayed towards the mid level, inverted, 28x28 natural-image patches and
``digits28``: scikit-learn's digits in MNIST's layout -- *not* MNIST, which 004 uses); elsewhere the
same without ``digits28``. 004 trains Glow on FashionMNIST for its Fig. 1 (FashionMNIST vs MNIST);
the sizes here are the machine's (:data:`SETTINGS`), recorded in ``summary.json``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig
from ..data.ood import COMPANION_28
from ._common import PROGRESS, Claim, Report, levels_text, load_data, train_flow, write_json
from .glow_design import feasible_levels

__all__ = ["ood_likelihoods", "EXPERIMENTS", "REPORTS", "MODELS", "SETTINGS"]

MODELS = {
    "Glow": dict(model="glow", hidden=64, levels=3, steps_per_level=4, coupling="affine", scale="sigmoid",
                 permutation="lu"),
    "CV-Glow": dict(model="cv_glow", hidden=64, levels=3, steps_per_level=4),
}
TRAIN = dict(steps=1500, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.99, eval_every=100)
OOD = dict(n=500, n_train=2000)  # examples per OOD set / training examples scored
# data -> (train settings, validation fraction, OOD sets); other data: the digits settings
SETTINGS = {"fashion-mnist": (dict(TRAIN, steps=2000, eval_every=500), 0.02, COMPANION_28)}
DIGITS_SETS = tuple(f for f in COMPANION_28 if f != "digits28")
QUICK_MODELS = {k: dict(v, hidden=8, levels=2, steps_per_level=1) for k, v in MODELS.items()}
QUICK_TRAIN = dict(steps=6, batch_size=32, lr=1e-3, warmup=2, ema_decay=0.0, eval_every=3)
QUICK_OOD = dict(n=16, n_train=32, bootstrap=20, typicality_m=(1, 5), decompose_n=8)


def _train(name: str, spec: dict, splits, out: Path, tkw: dict, seed: int, data: str, data_dir, val_size: float):
    from ..models.registry import build_model

    spec = dict(spec, levels=feasible_levels(tuple(splits.shape), spec["levels"]))
    mcfg = ModelConfig(**spec)
    torch.manual_seed(seed)
    flow, res = train_flow(f"{name} (seed {seed})", build_model(mcfg, splits.shape), mcfg, splits, out, tkw, seed,
                           DataConfig(name=data, data_dir=data_dir, val_size=val_size))
    return flow, res, spec


def _num(v) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def rows_of(model: str, s: dict) -> list[dict]:
    """One row per scored set of an :func:`~stableflows.ood.analyze` summary ``s``."""
    rows = []
    so = (s.get("second_order") or {}).get("families", {})
    audit = s.get("audit") or {}
    for k, st in s["sets"].items():
        if st["kind"] == "val":
            continue
        sc = (s["scores"].get(k) or {}) if st["kind"] == "ood" else {}
        best = (s["best_score"].get(k) or {}) if st["kind"] == "ood" else {}
        o = so.get(k) or {}
        inv = audit.get(k) if isinstance(audit, dict) else None
        rows.append({
            "model": model, "set": k, "n": st["bpd"]["n"],
            "mean_bpd": _num(st["bpd"].get("mean")), "median_bpd": _num(st["bpd"].get("median")),
            "nonfinite": st["bpd"]["nonfinite"],
            "log_pz_per_dim": _num(st["log_pz_per_dim"].get("mean")),
            "logdet_per_dim": _num(st["logdet_per_dim"].get("mean")),
            "likelihood_auroc": _num((sc.get("likelihood (bpd)") or {}).get("auroc")),
            "best_score": best.get("score"), "best_auroc": _num(best.get("auroc")),
            "gap_measured": _num(o.get("measured")), "gap_eq5": _num(o.get("eq5")),
            "eq5_sign_agrees": (o.get("sign_agrees") or {}).get("eq5"),
            "invertible": inv.get("status") == "invertible" if inv else None,
        })
    return rows


def _markdown(rows: list[dict], note: str, probes: dict) -> str:
    cols = ("model", "set", "mean_bpd", "likelihood_auroc", "log_pz_per_dim", "logdet_per_dim", "gap_measured",
            "gap_eq5", "eq5_sign_agrees", "best_score", "best_auroc", "invertible")

    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = [f"004 on {note}: bits/dim of each set, the likelihood's AUROC as an OOD score (< 0.5: the OOD set "
             f"gets higher likelihood than the test set), log p(z) and log-det per dimension (nats), the measured "
             f"gap of the mean log-likelihood to the training split and 004 Eq. 5's second-order prediction, the "
             f"best other score. Histograms, per-level decomposition and graying in runs/MODEL/ood/ood.html.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    lines.append("")
    for m, p in probes.items():
        lines.append(f"{m}: constant images min {cell(_num(p['constant'].get('min_bpd')))} bpd, random inputs "
                     f"mean {cell(_num(p['random'].get('mean')))} bpd")
    return "\n".join(lines) + "\n"


def ood_likelihoods(out_dir: Path, *, quick: bool = False, seed: int = 0, data: str = "digits",
                    data_dir: str | None = None) -> dict:
    """004 Fig. 1-6: likelihoods of Glow and CV-Glow on OOD sets, their decomposition and the
    second-order prediction, with better OOD scores."""
    from ..ood.analysis import OODConfig, analyze
    from ..ood.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tkw, val_size, fams = SETTINGS.get(data, (TRAIN, 0.1, None))
    splits = load_data(data, data_dir, seed, val_size=val_size)
    if fams is None:
        fams = COMPANION_28 if tuple(splits.shape)[-2:] == (28, 28) else DIGITS_SETS
    models = QUICK_MODELS if quick else MODELS
    tkw = dict(QUICK_TRAIN if quick else tkw)
    ocfg = OODConfig(families=tuple(fams), seed=seed, data_dir=data_dir, **(QUICK_OOD if quick else OOD))
    rows, settings, probes = [], {}, {}
    for name, spec in models.items():
        flow, res, spec = _train(name, spec, splits, out / "runs" / name, tkw, seed, data, data_dir, val_size)
        PROGRESS.phase(f"{name}: OOD analysis of {len(fams)} sets")
        result = analyze(flow, splits, ocfg)
        write_report(result, out / "runs" / name / "ood", title=f"004 on {data}: {name} (seed {seed})")
        new = rows_of(name, result.summary)
        rows += new
        probes[name] = result.summary["probes"]
        settings[name] = {**spec, "test_bpd": res.test, "constant_volume": result.summary["model"]["constant_volume"]}
        for r in new:
            PROGRESS.emit(f"ood-likelihoods: {name:8s} {r['set']:16s} {r['mean_bpd']:.3f} bpd, "
                          f"likelihood AUROC {r['likelihood_auroc']:.3f}")
    note = f"{data} ({levels_text(splits.levels)})"
    (out / "table.md").write_text(_markdown(rows, note, probes))
    summary = {"settings": {"models": settings, "train": tkw, "val_size": val_size, "ood": dict(
        families=list(fams), **(QUICK_OOD if quick else OOD)), "seed": seed, "data": data, "quick": quick},
        "levels_note": note, "rows": rows,
        "probes": {m: {"constant_min_bpd": p["constant"].get("min_bpd"), "random": p["random"],
                       "graying": p["graying"]} for m, p in probes.items()}}
    write_json(out / "summary.json", summary)
    return summary


def _claims() -> tuple:
    """004's claim for both flows; for CV-Glow it says the phenomenon needs no x-dependent volume."""
    out = []
    for m in MODELS:
        for f in ("digits28", "constant"):
            out.append(Claim(f"004 Fig. 1/2: {m} gives {f} a higher likelihood (lower bpd) than the test set",
                             "mean_bpd", {"model": m, "set": f}, {"model": m, "set": "test"}, lower=True))
    return tuple(out)


REPORTS = {"ood-likelihoods": Report(
    keys=("model", "set"),
    columns=("model", "set", "mean_bpd", "likelihood_auroc", "log_pz_per_dim", "logdet_per_dim", "gap_measured",
             "gap_eq5", "best_auroc"),
    claims=_claims(),
    unit="bits/dim; AUROC of the likelihood (test negative, OOD positive)")}

EXPERIMENTS = {"ood-likelihoods": ood_likelihoods}
