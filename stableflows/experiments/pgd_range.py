"""Crafted non-invertible inputs (paper 000 Fig. 3, 7, 8; the poster's Glow-vs-ResFlow attack table).

Fig. 8: "a SOTA Glow model trained on images normalized to [-0.5, 0.5], [attacked with] PGD [...]
constrained to the larger range [-0.7, 0.7]". The library's default flows start with a logit
pre-transform, whose domain is (0, 1): they refuse that range outright (every attacked point is
outside the domain), which says nothing about their inverse. So this experiment trains the flows of
Fig. 8 and of the poster's table *without* the logit, on centred data: the first layer of each flow
is the fixed shift ``v -> v - 1/2`` (an :class:`~stableflows.transforms.multiscale.ElementwiseAffine`
with frozen ``mu = 1/2``, ``logs = 0``; log-det 0), so everything after it sees the dequantised data
in [-0.5, 0.5). PGD then searches (:func:`stableflows.audit.attacks.pgd_attack`, 50 signed-gradient
steps, random start, 64 test examples) in

* ``cell``: the dequantisation cell of each example (the poster: "by optimizing within the
  dequantization distribution of a datapoint"), and
* ``range``: the data range widened by 0.2 of its width on each side, i.e. [-0.7, 0.7] after the shift,

with a random search of the same budget as the baseline. Reported per flow and set: % of attacked
examples whose reconstruction is non-finite, the largest and the median finite L2 reconstruction
error, and the two verdicts (the poster's: finite; docs/METRICS.md: finite and <= 1e-3).

Flows: Glow (affine couplings, Glow's sigmoid scale, LU 1x1 convolutions, learned split priors) and
a Residual Flow (the vector model of ``configs/resflow_digits.toml``: 8 fully connected blocks, LipSwish,
c = 0.98, Russian roulette), both without the logit. At 28x28 a third flow, ``ResFlow-conv``, is the
poster's kind of Residual Flow: the convolutional multi-scale model of
``configs/resflow_fast_fashion.toml`` (squeeze first, 2 levels x 4 blocks of width 64, spectral norm
c = 0.98, roulette log-det, Neumann gradient), likewise without the logit.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..config import DataConfig, ModelConfig
from ..models.flow import Flow
from ..data.ood import COMPANION_28
from ..transforms.base import Compose
from ..transforms.multiscale import ElementwiseAffine
from ._common import PROGRESS, Claim, Report, fmt, levels_text, load_data, train_flow, write_json
from .resflow import POWER_TOL

__all__ = ["pgd_range", "centred", "EXPERIMENTS", "REPORTS", "MODELS"]

WIDEN = 0.2  # [-0.5, 0.5] -> [-0.7, 0.7]
MODELS = {
    "Glow": dict(model="glow", hidden=64, levels=3, steps_per_level=4, coupling="affine", scale="sigmoid",
                 permutation="lu", logit_alpha=0.0),
    "ResFlow": dict(model="resflow", hidden=128, levels=1, steps_per_level=8, logit_alpha=0.0, n_power_iter=1,
                    **POWER_TOL),  # power iteration to a tolerance, as resflow-ablation
}
FLAT = {"ResFlow"}  # trained on images as vectors (as configs/resflow_digits.toml)
TRAIN = dict(steps=1500, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.99, eval_every=100)
# 28x28 (Fashion-MNIST): 28 -> 14 -> 7 allows two levels; the validation split is cut to 2 % (1,200
# images) so that the 2,000 steps of both flows and their attacks fit ~10 minutes a seed on 2 cores.
CONV_RESFLOW = dict(model="resflow", levels=2, squeeze_first=True, steps_per_level=4, hidden=64,
                    activation="lipswish", coeff=0.98, norm="spectral", estimator="roulette", n_exact_terms=2,
                    eval_exact_terms=10, neumann_grad=True, grad_in_forward=True, n_power_iter=1,
                    logit_alpha=0.0)  # configs/resflow_fast_fashion.toml without its logit
MODELS_28 = {"Glow": dict(MODELS["Glow"], levels=2), "ResFlow": dict(MODELS["ResFlow"]),
             "ResFlow-conv": CONV_RESFLOW}
TRAIN_28 = dict(TRAIN, steps=2000, eval_every=500)
SETTINGS = {"fashion-mnist": (MODELS_28, TRAIN_28, 0.02)}  # data -> (models, train, val_size); else digits'
QUICK_MODELS = {"Glow": dict(MODELS["Glow"], hidden=8, levels=2, steps_per_level=1),
                "ResFlow": dict(MODELS["ResFlow"], hidden=8, steps_per_level=2)}
QUICK_SETTINGS = {"fashion-mnist": dict(QUICK_MODELS, **{"ResFlow-conv": dict(CONV_RESFLOW, hidden=8,
                                                                                  steps_per_level=1)})}
QUICK_TRAIN = dict(steps=6, batch_size=32, lr=1e-3, warmup=2, ema_decay=0.0, eval_every=3)
ATTACK = dict(constraints=("cell", "range"), examples=64, steps=50, widen=WIDEN, baseline=True, seed=0)
# The poster's table also reports test data and samples; 004's OOD sets are added (each 256 examples,
# samples at T = 1, 0.7, 0). 28x28 data get the Fashion-MNIST companion set (data/ood.py COMPANION_28).
FAMILIES = ("test", "samples", "constant", "uniform", "grayed_mid", "inverted", "natural_patches")
FAMILIES_28 = ("test", "samples") + COMPANION_28
FAMILY_N = 256


def centred(flow: Flow) -> Flow:
    """``flow`` with the fixed shift ``v -> v - 1/2`` in front (frozen parameters, log-det 0): the
    rest of the flow sees [0, 1) data as [-0.5, 0.5)."""
    ref = next((t for t in flow.parameters() if torch.is_floating_point(t)), None)
    shift = ElementwiseAffine(flow.shape)
    if ref is not None:
        shift = shift.to(dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        shift.mu.fill_(0.5)
    shift.mu.requires_grad_(False)
    shift.logs.requires_grad_(False)
    flow.transform = Compose(shift, *flow.transform.layers) if isinstance(flow.transform, Compose) else \
        Compose(shift, flow.transform)
    return flow


def _train(name: str, spec: dict, splits, out: Path, tkw: dict, seed: int, data: str, data_dir: str | None,
           val_size: float = 0.1):
    from ..models.registry import build_model

    mcfg = ModelConfig(**spec)
    torch.manual_seed(seed)
    flow = centred(build_model(mcfg, splits.shape))
    return train_flow(f"{name} (seed {seed})", flow, mcfg, splits, out, tkw, seed,
                      DataConfig(name=data, data_dir=data_dir, flatten=name in FLAT, val_size=val_size))


def _families(shape) -> tuple[str, ...]:
    return FAMILIES_28 if math.prod(shape) == 28 * 28 else FAMILIES


def _family_rows(rep) -> dict:
    """Per audited family: % of examples whose reconstruction (or generation) is non-finite, the
    largest / median finite L2 error, and the two verdicts."""
    out = {}
    for k, f in rep.families.items():
        v = f.verdict
        err = f.errors["l2"]
        fin = err[torch.isfinite(err)]
        out[k] = {"status": v.status, "n": int(v.n),
                  "pct_inf": 100.0 * (v.n_nonfinite + v.n_raised) / max(v.n, 1),
                  "pct_outside_domain": 100.0 * v.n_outside_domain / max(v.n, 1),
                  "max_err": float(fin.max()) if fin.numel() else math.nan,
                  "median_err": float(fin.median()) if fin.numel() else math.nan,
                  "random_pct_inf": None, "random_max_err": None,
                  "invertible": v.n_nonfinite + v.n_raised == 0, "invertible_1e-3": v.status == "invertible"}
    return out


def _attack(flow: nn.Module, splits, quick: bool) -> dict:
    from ..audit import audit

    kw = dict(ATTACK, examples=8, steps=3) if quick else dict(ATTACK)
    rep = audit(flow, splits.test, levels=splits.levels, families=",".join(_families(splits.shape)),
                n=8 if quick else FAMILY_N, repeat=0, localize=False, spectra_points=0, shadow=False, attack="pgd",
                attack_kwargs=kw)
    out = _family_rows(rep)
    for c, a in rep.attacks.items():
        err = a.pgd.best_err  # PGD's points alone; the random baseline has its own columns
        fin = err[torch.isfinite(err)]
        base = a.random.best_err if a.random is not None else None
        bfin = base[torch.isfinite(base)] if base is not None else None
        out[c] = {"status": a.pgd.status, "n": int(err.numel()),
                  "pct_inf": 100.0 * float((~torch.isfinite(err) & ~torch.isnan(err)).double().mean()),
                  "pct_outside_domain": 100.0 * float(torch.isnan(err).double().mean()),
                  "max_err": float(fin.max()) if fin.numel() else math.nan,
                  "median_err": float(fin.median()) if fin.numel() else math.nan,
                  "start_max_err": float(a.pgd.start_err[torch.isfinite(a.pgd.start_err)].max())
                  if bool(torch.isfinite(a.pgd.start_err).any()) else math.nan,
                  "random_pct_inf": 100.0 * float((~torch.isfinite(base)).double().mean()) if base is not None else None,
                  "random_max_err": float(bfin.max()) if bfin is not None and bfin.numel() else None,
                  "invertible": bool(torch.isfinite(err).all()),
                  "invertible_1e-3": a.verdict.status == "invertible"}
    return out


def pgd_range(out_dir: Path, *, quick: bool = False, seed: int = 0, data: str = "digits",
              data_dir: str | None = None) -> dict:
    """000 Fig. 8 / the poster's attack table: PGD in the dequantisation cell and in [-0.7, 0.7] on a
    Glow and a Residual Flow trained without the logit on centred data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_models, full_train, val_size = SETTINGS.get(data, (MODELS, TRAIN, 0.1))
    models = QUICK_SETTINGS.get(data, QUICK_MODELS) if quick else full_models
    tkw = dict(QUICK_TRAIN if quick else full_train)
    rows, settings = [], {}
    note = None
    for name, spec in models.items():
        splits = load_data(data, data_dir, seed, flatten=name in FLAT, val_size=val_size)
        note = levels_text(splits.levels)
        flow, res = _train(name, spec, splits, out / "runs" / name, tkw, seed, data, data_dir, val_size)
        PROGRESS.phase(f"{name}: audit of test data, samples, OOD sets and PGD attacks")
        attacks = _attack(flow, splits, quick)
        for c, a in attacks.items():
            rows.append({"model": name, "constraint": c, "test_bpd": res.test, **a})
            PROGRESS.emit(f"pgd-range: {name:8s} {c:12s} {a['pct_inf']:.1f}% inf, max err {a['max_err']:.3g} "
                          f"(random search {fmt(a['random_max_err'])}), invertible (finite) {a['invertible']}")
        settings[name] = spec
    lines = [f"PGD on {data} ({note}), flows trained without the logit on data centred to [-0.5, 0.5); "
             f"'pgd:range' searches [-0.7, 0.7] (000 Fig. 8), 'pgd:cell' the dequantisation cell; "
             f"{ATTACK['examples'] if not quick else 8} test examples, {ATTACK['steps'] if not quick else 3} steps. "
             f"The other sets: {FAMILY_N if not quick else 8} examples each (samples: F^-1(z), z ~ N(0, T^2 I); "
             f"% inf counts non-finite or raising reconstructions and generations). "
             f"invertible: every reconstruction finite (the poster's criterion); invertible_1e-3: also <= 1e-3.", "",
             "| model | set | % inf | max err | median err | random search: % inf / max err | invertible | "
             "invertible_1e-3 | test bpd |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['constraint']} | {r['pct_inf']:.1f} | {r['max_err']:.3g} | "
                     f"{r['median_err']:.3g} | {fmt(r['random_pct_inf'])} / {fmt(r['random_max_err'])} | {r['invertible']} | "
                     f"{r['invertible_1e-3']} | {r['test_bpd']:.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"settings": {"models": settings, "train": tkw, "val_size": val_size, "attack": ATTACK,
                            "families": list(_families(splits.shape)), "family_n": FAMILY_N, "seed": seed, "data": data,
                            "quick": quick}, "levels_note": note, "rows": rows}
    write_json(out / "summary.json", summary)
    return summary


REPORTS = {"pgd-range": Report(
    keys=("model", "constraint"),
    columns=("model", "constraint", "pct_inf", "max_err", "median_err", "random_max_err", "invertible",
             "invertible_1e-3", "test_bpd"),
    claims=(Claim("000 Fig. 8 / poster: PGD in [-0.7, 0.7] finds larger reconstruction errors in Glow than in the "
                  "Residual Flow (Glow - ResFlow > 0)", "max_err", {"model": "Glow", "constraint": "pgd:range"},
                  {"model": "ResFlow", "constraint": "pgd:range"}, lower=False),
            Claim("poster: PGD in the dequantisation cell finds larger errors in Glow than in the Residual Flow",
                  "max_err", {"model": "Glow", "constraint": "pgd:cell"}, {"model": "ResFlow", "constraint": "pgd:cell"},
                  lower=False),
            Claim("poster (28x28, its convolutional Residual Flow): PGD in [-0.7, 0.7] finds larger errors in Glow "
                  "than in ResFlow-conv", "max_err", {"model": "Glow", "constraint": "pgd:range"},
                  {"model": "ResFlow-conv", "constraint": "pgd:range"}, lower=False),
            Claim("poster (28x28, its convolutional Residual Flow): PGD in the dequantisation cell finds larger "
                  "errors in Glow than in ResFlow-conv", "max_err", {"model": "Glow", "constraint": "pgd:cell"},
                  {"model": "ResFlow-conv", "constraint": "pgd:cell"}, lower=False)),
    unit="L2 reconstruction error of the attacked points")}

EXPERIMENTS = {"pgd-range": pgd_range}
