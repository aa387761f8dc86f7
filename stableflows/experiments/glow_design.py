"""Design choices for a Glow whose inverse stays stable (Daniels, paper 003), reproduced on digits.

``reproduce glow-design-choices`` trains one Glow per variant on digits and audits each:

==========================  ===============================================================
variant                     change to Glow (ActNorm -> LU 1x1 conv -> coupling, learned split priors)
==========================  ===============================================================
``affine_exp``              affine coupling, ``scale = exp(s)`` (RealNVP)
``affine_sigmoid``          affine coupling, ``scale = sigmoid(s + 2)`` (Glow; the control)
``additive``                additive coupling, ``scale = 1`` (remedy 1)
``biased_sigmoid``          ``scale = sigmoid(s) + eps``, eps = 0.5 (remedy 2; scales in (0.5, 1.5))
``biased_sigmoid_eps0.05``  the same with eps = 0.05: scales in (0.05, 1.05), the control's range
                            bounded away from 0 (eps = 0.5 also allows scales above 1, which changes
                            expressiveness, not only the tail near 0)
``bounded``                 ``scale = a + (b - a) sigmoid(s)``, [a, b] = [0.5, 1] (remedy 3)
``randomized_splits``       the control with a fixed random channel permutation between each
                            level's last coupling and its split (remedy 4)
``affine_sigmoid_kept``     the control in Glow's own arrangement (see below)
==========================  ===============================================================

Arrangement. Daniels (Fig. 2) describes the factored-out noise as the *conditioner input* of the
first coupling of the sampling pass after a split ("Immediately following a SPLIT layer, z_i is the
input to CNN"); that is why special latents such as z = 0 can drive its scales towards 0. Every
variant but the last is built so (``glow(split_condition="factored")``). In Glow's published code the
factored-out half is the half that coupling *transforms*, not its input; ``affine_sigmoid_kept`` is
the control in that arrangement, for comparison.

Randomized splits: "random permutations of intermediate activation channels, inserted before each
flow step" -- before each step *of the sampling pass*. Between two steps of a level such a
permutation is absorbed by the next 1x1 convolution (any invertible channel mixing); at a split it is
not: put after a level's last coupling (``glow(split_shuffle=True)``), it makes the factored-out
channels a random mix of that coupling's conditioner and transformed halves, so noise and
intermediate activations both feed the first coupling after the split.

Measured per variant (paper figure in brackets):

* the training loss every ``loss_every`` steps (Fig. 4) and the test bits/dim;
* ``x = F^-1(0)`` with every intermediate activation of the inverse clamped to ``[-c, c]`` for each
  clipping threshold (Fig. 1, 5), and without clipping;
* samples at temperatures ``T`` down to 0: fraction non-finite, largest activation;
* the distribution of the scale ``s`` of the first coupling the generative pass applies after each
  split (the coupling of the last step of the level that receives the factored-out noise) as the
  latent temperature shrinks (Fig. 3): smallest value and quantiles;
* the verdicts of :func:`stableflows.audit.audit` (held-out data, samples, clipped samples, OOD
  families) with the float64 shadow and the layer where the inverse first fails.

The study's size is a parameter (:class:`DesignSize`: :data:`QUICK` for tests, :data:`FULL` (digits) or
:data:`FULL_28` (Fashion-MNIST) for
``stableflows reproduce``). Each of the paper's claims is checked and reported as reproduced or not at
this scale, with the numbers. The prior refit of paper 000 (App. I) runs on the trained control
(:mod:`stableflows.experiments.prior_refit`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..transforms.base import Compose, trace
from ..transforms.coupling import AffineCoupling
from ..transforms.multiscale import MultiScale
from ._common import Claim, Report

__all__ = ["DesignSize", "QUICK", "FULL", "FULL_28", "SIZES", "VARIANTS", "build_variant", "feasible_levels", "exploded",
           "first_couplings_after_splits", "sample_at_zero", "scale_distribution", "train_variant",
           "glow_design_choices", "EXPERIMENTS", "STABLE_ACTIVATION"]

STABLE_ACTIVATION = 1e4  # largest |activation| of an unclipped z = 0 sample still counted as stable
SCALE_FLOOR = 1e-30  # smallest scale shown on the log axis of the Fig. 3 histogram
LOGIT_ALPHA = 0.05  # the setting of the README's figures (measured before the library default became 0.003)

ARRANGEMENT = "factored"  # Daniels' Fig. 2: the factored-out noise conditions the next coupling
VARIANTS: dict[str, dict] = {
    "affine_exp": dict(coupling="affine", scale="exp"),
    "affine_sigmoid": dict(coupling="affine", scale="sigmoid"),
    "additive": dict(coupling="additive", scale="sigmoid"),
    "biased_sigmoid": dict(coupling="affine", scale="biased_sigmoid"),
    "biased_sigmoid_eps0.05": dict(coupling="affine", scale="biased_sigmoid", scale_floor=0.05),
    "bounded": dict(coupling="affine", scale="bounded"),
    "randomized_splits": dict(coupling="affine", scale="sigmoid", split_shuffle=True),
    "affine_sigmoid_kept": dict(coupling="affine", scale="sigmoid", split_condition="kept"),
}
CONTROL = "affine_sigmoid"
LIVE_FAMILIES = "test,samples,clipped"  # the audit of the live (non-EMA) weights


@dataclass(frozen=True)
class DesignSize:
    """How big the study is. ``clips`` holds the clipping thresholds of the z = 0 samples (None =
    unclipped); ``temperatures`` the latent temperatures of the sampling checks (include 0)."""

    steps: int
    hidden: int
    levels: int
    steps_per_level: int
    batch_size: int
    lr: float
    ema_decay: float
    loss_every: int
    n_samples: int
    audit_n: int
    spectra_points: int
    temperatures: tuple = (1.0, 0.7, 0.5, 0.3, 0.1, 0.0)
    clips: tuple = (None, 1000.0, 100.0, 50.0, 20.0, 10.0)
    refit_epochs: int = 5
    audit_families: str = "test,samples,clipped,noise,constant,inverted,out_of_range,patches"
    val_size: float = 0.1  # fraction of the training split validated every ``loss_every`` steps


QUICK = DesignSize(steps=12, hidden=8, levels=2, steps_per_level=1, batch_size=64, lr=2e-3, ema_decay=0.0,
                   loss_every=4, n_samples=32, audit_n=32, spectra_points=0, temperatures=(1.0, 0.3, 0.0),
                   clips=(None, 100.0, 10.0), refit_epochs=2, audit_families="test,samples,clipped,uniform")
FULL = DesignSize(steps=1500, hidden=64, levels=3, steps_per_level=4, batch_size=64, lr=1e-3, ema_decay=0.99,
                  loss_every=30, n_samples=256, audit_n=200, spectra_points=16)
# Fashion-MNIST (28 x 28, 54,000 training images): two levels (28 -> 14 -> 7), 2 % validation
# (1,080 images) every 100 steps (digits' 10 % every 30 steps would validate 6,000 images 50 times),
# and exact Jacobian spectra at 4 points per family (784-d: 16 took 78 s of a 90 s audit; the study's
# claims do not read them).
FULL_28 = dataclasses.replace(FULL, levels=2, loss_every=100, val_size=0.02, spectra_points=4)
SIZES = {"fashion-mnist": FULL_28}  # data -> full size; else FULL


# ----------------------------------------------------------------------------- models
def feasible_levels(shape, levels: int) -> int:
    """The largest number of levels ``<= levels`` the image ``(C, H, W)`` can be squeezed into
    (Fashion-MNIST's 28 x 28: 2 levels where digits' 8 x 8 take 3)."""
    k = levels
    while k > 1 and (shape[1] % 2 ** k or shape[2] % 2 ** k):
        k -= 1
    return k


def build_variant(name: str, size: DesignSize, *, shape=(1, 8, 8), seed: int = 0) -> tuple[nn.Module, ModelConfig]:
    """The Glow of variant ``name`` (see :data:`VARIANTS`) and its ModelConfig (everything the
    variant changes is a config field, so the run's checkpoints rebuild the same model)."""
    from ..models.registry import build_model

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    spec = {"split_condition": ARRANGEMENT, **VARIANTS[name]}
    cfg = ModelConfig(model="glow", hidden=size.hidden, levels=feasible_levels(shape, size.levels),
                      steps_per_level=size.steps_per_level, permutation="lu", logit_alpha=LOGIT_ALPHA,
                      **spec)
    torch.manual_seed(seed)
    return build_model(cfg, shape), cfg


def first_couplings_after_splits(flow: nn.Module) -> list[tuple[str, nn.Module]]:
    """For each split, the coupling the *generative* pass applies first after concatenating the
    factored-out noise: the last coupling of the level that is split (inverse order reverses it)."""
    names = {id(m): n for n, m in flow.named_modules()}
    out = []
    for ms in (m for m in flow.modules() if isinstance(m, MultiScale)):
        couplings = [m for m in ms.level.modules() if isinstance(m, AffineCoupling)]
        if couplings:
            out.append((names[id(couplings[-1])], couplings[-1]))
    return out


# ----------------------------------------------------------------------------- probes
def _latent(flow, n: int, temperature: float, seed: int) -> Tensor:
    p = next(flow.parameters())
    z = torch.randn((n, *flow.latent_shape), generator=torch.Generator().manual_seed(seed), dtype=p.dtype)
    return temperature * z


@torch.no_grad()
def sample_at_zero(flow: nn.Module, clips: Sequence[float | None]) -> list[dict]:
    """``x = F^-1(0)`` for each clipping threshold (None = no clipping): finite or not, the largest
    activation of the inverse pass, the number of clamped entries, and the image (model space)."""
    from ..audit.localize import clip_activations

    flow.eval()
    z = _latent(flow, 1, 0.0, 0)
    rows = []
    for c in clips:
        ctx = clip_activations(flow, c) if c is not None else contextlib.nullcontext({})
        with ctx as counts, trace(flow) as tr:
            try:
                x, _ = flow.inverse(z)
                err = None
            except Exception as e:  # noqa: BLE001 - a raising inverse is a result here
                x, err = torch.full((1, *flow.shape), math.nan), f"{type(e).__name__}: {e}"
        acts = [float(r.out_absmax.max()) for r in tr.leaves() if r.direction == "inverse"]
        finite = bool(torch.isfinite(x).all())
        rows.append({"clip": c, "finite": finite, "error": err,
                     "max_activation": max(acts) if acts else math.nan,
                     "max_abs_x": float(x.abs().max()) if finite else math.inf,
                     "clamped": int(sum(counts.values())) if counts else 0,
                     "image": x[0].detach().double().cpu().numpy()})
    return rows


@torch.no_grad()
def scale_distribution(flow: nn.Module, temperatures: Sequence[float], n: int, *, seed: int = 0) -> dict:
    """Scales ``s`` of :func:`first_couplings_after_splits` while sampling ``n`` latents at each
    temperature; plus the fraction of non-finite samples, the largest activation and the smallest
    scale of any coupling. ``{T: {"samples": {...}, coupling name: scale values (numpy)}}``."""
    flow.eval()
    targets = first_couplings_after_splits(flow)
    captured: dict[str, list] = {}
    hooks = []
    for name, c in targets:
        hooks.append(c.scale.register_forward_hook(
            lambda mod, inp, out, _n=name: captured.setdefault(_n, []).append(out[0].detach().double().cpu().reshape(-1))))
    out = {}
    try:
        for t in temperatures:
            captured.clear()
            m = 1 if t == 0 else n
            with trace(flow) as tr:
                x, _ = flow.inverse(_latent(flow, m, t, seed))
            inv = [r for r in tr.leaves() if r.direction == "inverse"]
            mins = [r.stats["min_scale"] for r in inv if "min_scale" in r.stats]
            row = {"samples": {"n": m, "frac_nonfinite": float((~torch.isfinite(x.reshape(m, -1)).all(1)).double().mean()),
                               "max_activation": max(float(r.out_absmax.max()) for r in inv) if inv else math.nan,
                               "min_scale_any_coupling": min(mins) if mins else None}}
            for name, vals in captured.items():
                row[name] = torch.cat(vals).numpy()
            out[float(t)] = row
    finally:
        for h in hooks:
            h.remove()
    return out


def _scale_summary(v: np.ndarray) -> dict:
    fin = v[np.isfinite(v)]
    if not fin.size:
        return {"n": int(v.size)}
    q = np.quantile(fin, [0.001, 0.01, 0.5])
    return {"n": int(v.size), "min": float(fin.min()), "q001": float(q[0]), "q01": float(q[1]),
            "median": float(q[2]), "max": float(fin.max())}


# ----------------------------------------------------------------------------- training
def train_variant(name: str, size: DesignSize, splits, out_dir: Path, *, seed: int = 0,
                  data_dir: str | None = None) -> dict:
    """Train variant ``name``; returns the model (validation-selected weights) and its curve."""
    from ..train.checkpoint import load_checkpoint
    from ..train.loop import TrainingDiverged, train
    from ._common import PROGRESS

    flow, mcfg = build_variant(name, size, shape=tuple(splits.shape), seed=seed)
    cfg = RunConfig(model=mcfg, data=DataConfig(name=splits.name, data_dir=data_dir, val_size=size.val_size),
                    train=TrainConfig(steps=size.steps, batch_size=size.batch_size, lr=size.lr,
                                      warmup=min(100, max(1, size.steps // 10)), ema_decay=size.ema_decay,
                                      eval_every=size.loss_every, seed=seed, out_dir=str(out_dir), progress=False))
    curve: list[dict] = []

    def on_eval(event: str, rec: dict) -> None:
        if event == "eval":
            curve.append({"step": rec["step"], "loss": rec.get("loss"), "val_bpd": rec.get("val_bpd")})

    t0 = time.perf_counter()
    diverged = None
    try:
        res = train(cfg, model=flow, splits=splits,
                    callbacks=[on_eval, PROGRESS.train_callback(f"{name} (seed {seed})", size.steps)],
                    overwrite=True)
        test_bpd, nonfinite = res.test, res.nonfinite_steps
    except TrainingDiverged as e:
        diverged, test_bpd, nonfinite = str(e), math.nan, None
    live = copy.deepcopy(flow)  # the weights of the last step (the optimiser's, not averaged)
    last = out_dir / "last.pt"
    if last.is_file():
        live.load_state_dict(load_checkpoint(last)["model"])
    best = out_dir / "best.pt"
    if best.is_file():  # the validation-selected EMA weights
        flow.load_state_dict(load_checkpoint(best)["model"])
    flow.eval()
    live.eval()
    return {"flow": flow, "live": live, "curve": curve, "test_bpd": test_bpd, "nonfinite_steps": nonfinite,
            "diverged": diverged, "train_seconds": time.perf_counter() - t0,
            "n_params": int(sum(p.numel() for p in flow.parameters()))}


def _audit(flow, splits, size: DesignSize, seed: int, families: str | None = None) -> dict:
    from ..audit import audit

    clips = tuple(c for c in size.clips if c is not None)
    rep = audit(flow, splits, families=families or size.audit_families, n=size.audit_n, temperatures=size.temperatures,
                clip_thresholds=clips, repeat=0,
                spectra_points=size.spectra_points, localize=True, localize_points=8, shadow=True, seed=seed)
    return {k: v.to_dict() for k, v in rep.verdict.families.items()}


# ----------------------------------------------------------------------------- study
def exploded(v: dict) -> bool:
    """An audit family verdict with non-finite outputs or in-domain round-trip errors above the
    tolerance (the verdict's ``cause`` says whether float64 fixes them). Examples the forward merely
    *refused* (a sample slightly outside [0, 1], which the logit pre-transform rejects) are
    counted apart, as ``refused``."""
    return v["n_nonfinite"] > 0 or (v["n_fail"] - v["n_raised"]) > 0


def _is_stable(row: dict) -> bool:
    """Stable: the inverse did not explode on held-out data nor on samples (incl. z = 0) per the
    audit, and the unclipped z = 0 sample is finite with activations below :data:`STABLE_ACTIVATION`."""
    z0 = next(r for r in row["z0"] if r["clip"] is None)
    audit_ok = not any(exploded(v) for k, v in row["audit"].items() if k == "test" or k.startswith("samples"))
    return bool(audit_ok and z0["finite"] and z0["max_activation"] < STABLE_ACTIVATION)


def _mean_loss(curve: list, first_half: bool) -> float | None:
    vals = [c["loss"] for c in curve if c["loss"] is not None]
    if not vals:
        return None
    vals = vals[: max(1, len(vals) // 2)] if first_half else vals[-max(1, len(vals) // 4):]
    return float(np.mean(vals))


def _claims(rows: dict) -> list[dict]:
    """The paper's statements, each checked against this run's numbers."""
    out = []

    def claim(text, ok, evidence):
        out.append({"claim": text, "reproduced": None if ok is None else bool(ok), "evidence": evidence})

    c = rows.get(CONTROL)
    if c:
        for which, w in (("EMA", c), ("live", c.get("live"))):
            if not w:
                continue
            z0 = next(r for r in w["z0"] if r["clip"] is None)
            bad = [k for k, v in w["audit"].items() if k.startswith("samples") and exploded(v)]
            claim(f"003 Fig. 1/5: the affine (sigmoid) Glow cannot be inverted cleanly at z = 0 without clipping "
                  f"({which} weights)",
                  (not z0["finite"]) or z0["max_activation"] >= STABLE_ACTIVATION or "samples_t0" in bad,
                  f"z=0 finite={z0['finite']}, max activation {z0['max_activation']:.3g}; failing sample families {bad}")
        ts = sorted(t for t in c["scales"] if t > 0)  # equal sample counts (T = 0 has one sample)
        first = next((k for k in c["scales"][ts[0]] if k != "samples"), None) if ts else None
        if first is not None:
            lo, hi = c["scales"][ts[0]][first], c["scales"][ts[-1]][first]
            claim("003 Fig. 3: as the latent noise shrinks, outliers of very small s appear in the first coupling "
                  "after a split", lo.get("min", math.inf) < 0.5 * hi.get("min", math.inf),
                  f"{first}: min s {hi.get('min', math.nan):.3g} at T={ts[-1]:g} vs {lo.get('min', math.nan):.3g} "
                  f"at T={ts[0]:g} ({hi['n']} values each); at z = 0: "
                  f"{c['scales'].get(0.0, {}).get(first, {}).get('min', math.nan):.3g}")
    for name in ("biased_sigmoid", "biased_sigmoid_eps0.05", "bounded"):
        if name in rows:
            r = rows[name]
            live = r.get("live") or {}
            claim(f"003 sec. 2.1: {name} shows no sign of numerical instability after training",
                  r["stable"] and live.get("stable", True),
                  f"stable: EMA {r['stable']}, live {live.get('stable')}; audit fails in domain on: {r['audit_failing']}")
    kept = rows.get("affine_sigmoid_kept")
    if kept and c:
        claim("003 Fig. 2/3: with the noise as conditioner input (Daniels' arrangement) z = 0 drives the scales "
              "lower than in Glow's arrangement (noise transformed)",
              None if _min_scale_t0(c) is None or _min_scale_t0(kept) is None else _min_scale_t0(c) < _min_scale_t0(kept),
              f"smallest scale at T=0: factored {_min_scale_t0(c)}, kept {_min_scale_t0(kept)}")
    if "additive" in rows and c:
        a, b = _mean_loss(rows["additive"]["curve"], False), _mean_loss(c["curve"], False)
        claim("003 Fig. 4: additive coupling trains noticeably worse than affine",
              None if a is None or b is None else a > b + 0.01,
              f"final training loss (bpd) additive {a} vs affine {b}; test bpd {rows['additive']['test_bpd']:.3f} vs "
              f"{c['test_bpd']:.3f}" if a is not None and b is not None else "no loss values")
    for name in ("biased_sigmoid", "biased_sigmoid_eps0.05", "bounded"):
        if name in rows and c:
            a, b = _mean_loss(rows[name]["curve"], True), _mean_loss(c["curve"], True)
            claim(f"003 Fig. 4: {name} trains somewhat faster than affine sigmoid (early loss lower)",
                  None if a is None or b is None else a < b,
                  f"mean loss over the first half: {name} {a} vs affine {b}")
    if "randomized_splits" in rows and c:
        r = rows["randomized_splits"]
        worse = (r["stable"] is False and c["stable"] is True) or (
            _min_scale_t0(r) is not None and _min_scale_t0(c) is not None and _min_scale_t0(r) < 0.1 * _min_scale_t0(c))
        claim("003 sec. 2.2: randomized splits make the inverse significantly MORE unstable than the control",
              worse, f"stable: randomized {r['stable']}, control {c['stable']}; smallest scale at T=0: randomized "
                     f"{_min_scale_t0(r)}, control {_min_scale_t0(c)}")
        a, b = _mean_loss(r["curve"], False), _mean_loss(c["curve"], False)
        claim("003 Fig. 4: randomized splits train like affine coupling",
              None if a is None or b is None else abs(a - b) < 0.1, f"final training loss {a} vs {b}")
    return out


def _min_scale_t0(row: dict) -> float | None:
    t0 = row["scales"].get(0.0)
    return None if t0 is None else t0["samples"].get("min_scale_any_coupling")


def _probe(flow, splits, size: DesignSize, seed: int, families: str | None = None) -> dict:
    """z = 0 samples, scale distribution and audit verdicts of one set of weights."""
    z0 = sample_at_zero(flow, size.clips)
    scales = scale_distribution(flow, size.temperatures, size.n_samples, seed=seed)
    audit = _audit(flow, splits, size, seed, families)
    row = {"z0": z0, "scales_raw": scales, "audit": audit,
           "audit_failing": [k for k, v in audit.items() if exploded(v)],
           "audit_refused": {k: v["n_raised"] for k, v in audit.items() if v["n_raised"]}}
    row["scales"] = {t: {k: (v if k == "samples" else _scale_summary(v)) for k, v in d.items()}
                     for t, d in scales.items()}
    row["stable"] = _is_stable(row)
    return row


def glow_design_choices(out_dir, *, quick: bool = False, seed: int = 0, data: str = "digits",
                        data_dir: str | None = None, size: DesignSize | None = None,
                        variants: Sequence[str] | None = None, verbose: bool = True) -> dict:
    """Paper 003 on digits: eight Glow designs trained and audited (EMA and live weights); the
    control's prior refit (000 App. I).

    Writes ``summary.json`` (everything, curves included), ``table.md`` and the figures into
    ``out_dir``; returns the summary without the per-step curves and scale quantiles.
    """
    from ._common import PROGRESS, levels_text, load_data
    from .prior_refit import refit_study

    size = size or (QUICK if quick else SIZES.get(data, FULL))
    variants = list(variants or VARIANTS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_data(data, data_dir, seed, val_size=size.val_size)
    rows: dict[str, dict] = {}
    flows: dict[str, nn.Module] = {}
    for name in variants:
        if verbose:
            PROGRESS.emit(f"glow-design-choices: training {name} ({size.steps} steps)")
        run = train_variant(name, size, splits, out / "runs" / name, seed=seed, data_dir=data_dir)
        flow = flows[name] = run.pop("flow")
        live = run.pop("live")
        PROGRESS.phase(f"{name}: audit of the EMA and live weights")
        row = {**run, **_probe(flow, splits, size, seed)}
        row["live"] = _probe(live, splits, size, seed, LIVE_FAMILIES)
        rows[name] = row
        if verbose:
            PROGRESS.emit(f"  test bpd {run['test_bpd']:.3f}, stable {row['stable']} (live weights "
                          f"{row['live']['stable']}), audit fails on {row['audit_failing']}")
    refit = None
    if CONTROL in flows:
        refit = refit_study(flows[CONTROL], splits, out, epochs=size.refit_epochs, seed=seed)
    claims = _claims(rows)
    stable = [k for k, r in rows.items() if r["stable"]]
    note = levels_text(splits.levels)
    summary = {
        "size": dataclasses.asdict(size),
        "seed": seed,
        "data": data,
        "levels": splits.levels,
        "levels_note": note,
        "arrangement": f"every variant but affine_sigmoid_kept: glow(split_condition={ARRANGEMENT!r}), the "
                       "factored-out noise conditions the first coupling of the sampling pass (003 Fig. 2)",
        "randomized_splits": "glow(split_shuffle=True): a fixed random channel permutation between each level's "
                             "last coupling and its split, mixing both coupling halves into the factored-out channels",
        "variants": {k: _row_json(r) for k, r in rows.items()},
        "rows": [variant_row(k, r) for k, r in rows.items()],
        "stable_variants": stable,
        "statement": (f"At this scale ({data}, {note}; {size.steps} steps, hidden {size.hidden}, "
                      f"{feasible_levels(splits.shape, size.levels)} levels x {size.steps_per_level} steps) the inverse "
                      f"stayed stable for: {', '.join(stable) or 'none'}; "
                      f"unstable: {', '.join(k for k in rows if k not in stable) or 'none'} (stable: the audit finds no "
                      f"in-domain failure on held-out data nor on samples at T in {list(size.temperatures)}, and the "
                      f"unclipped z = 0 sample is finite with activations below {STABLE_ACTIVATION:g}; EMA weights, the "
                      f"live weights are in the table)."),
        "claims": claims,
        "prior_refit": refit,
        "figures": _plots(out, rows, size, splits.shape),
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
    (out / "table.md").write_text(_markdown(summary))
    compact = dict(summary)
    compact["variants"] = {k: {f: v for f, v in r.items() if f not in ("curve", "scales", "audit")}
                           for k, r in summary["variants"].items()}
    return compact


def _log10(v) -> float | None:
    return None if v is None else (math.log10(v) if v > 0 else -math.inf)


def variant_row(name: str, r: dict) -> dict:
    """The figures of one variant that ``reproduce --seeds`` aggregates."""
    def z0(row):
        return next(z for z in row["z0"] if z["clip"] is None)

    def min_t0(row):
        t0 = row["scales"].get(0.0, row["scales"].get("0.0", {}))
        return t0.get("samples", {}).get("min_scale_any_coupling")

    live = r.get("live", {})
    return {"variant": name, "test_bpd": r["test_bpd"], "final_loss": _mean_loss(r["curve"], False),
            "early_loss": _mean_loss(r["curve"], True), "stable": r["stable"],
            "stable_live": live.get("stable"), "z0_finite": z0(r)["finite"], "z0_max_activation": z0(r)["max_activation"],
            "min_scale_t0": min_t0(r), "min_scale_t0_live": min_t0(live) if live else None,
            "log10_min_scale_t0": _log10(min_t0(r)), "log10_min_scale_t0_live": _log10(min_t0(live)) if live else None,
            "z0_max_activation_live": z0(live)["max_activation"] if live else None}


def _row_json(r: dict) -> dict:
    return {"test_bpd": r["test_bpd"], "n_params": r["n_params"], "train_seconds": r["train_seconds"],
            "nonfinite_steps": r["nonfinite_steps"], "diverged": r["diverged"], "stable": r["stable"],
            "final_loss": _mean_loss(r["curve"], False), "early_loss": _mean_loss(r["curve"], True),
            "curve": r["curve"],
            "z0": [{k: v for k, v in z.items() if k != "image"} for z in r["z0"]],
            "scales": {str(t): d for t, d in r["scales"].items()},
            "audit_failing": r["audit_failing"], "audit_refused": r["audit_refused"],
            "audit": {k: {f: v[f] for f in ("status", "n_fail", "n_checked", "n_nonfinite", "n_outside_domain",
                                             "max_error", "shadow_max_error", "cause", "culprit")}
                      for k, v in r["audit"].items()},
            "live": {"stable": r["live"]["stable"], "audit_failing": r["live"]["audit_failing"],
                     "z0": [{k: v for k, v in z.items() if k != "image"} for z in r["live"]["z0"]],
                     "scales": {str(t): d for t, d in r["live"]["scales"].items()}} if "live" in r else None}


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _json_safe(v.item())
    return v


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if math.isfinite(x) else str(x)
    return str(x)


def _fail_text(r: dict, k: str) -> str:
    v = r["audit"][k]
    return (f"{v['n_fail']}/{v['n_checked']}, max err {_fmt(v['max_error'])}, float64 {_fmt(v['shadow_max_error'])}, "
            f"cause {v['cause'] or '?'}")


def _markdown(s: dict) -> str:
    lines = [f"# Glow design choices on {s.get('data', 'digits')} (paper 003) and prior refit (paper 000 App. I)", "",
             s["statement"], "", s.get("arrangement", ""), "",
             "| variant | test bpd | final loss | stable (EMA / live) | z=0 finite | z=0 max act. (EMA / live) | "
             "min scale T=0 (EMA / live) | audit: fails in domain on | samples refused by the logit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in s["variants"].items():
        z0 = next(z for z in r["z0"] if z["clip"] is None)
        t0 = r["scales"].get("0.0", {}).get("samples", {})
        live = r.get("live") or {}
        lz0 = next((z for z in live.get("z0", []) if z["clip"] is None), {})
        lt0 = live.get("scales", {}).get("0.0", {}).get("samples", {})
        lines.append(f"| {k} | {_fmt(r['test_bpd'], 4)} | {_fmt(r['final_loss'], 4)} | {r['stable']} / "
                     f"{live.get('stable')} | {z0['finite']} | {_fmt(z0['max_activation'])} / "
                     f"{_fmt(lz0.get('max_activation'))} | {_fmt(t0.get('min_scale_any_coupling'))} / "
                     f"{_fmt(lt0.get('min_scale_any_coupling'))} | "
                     f"{', '.join(f'{k} ({_fail_text(r, k)})' for k in r['audit_failing']) or '-'} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['audit_refused'].items() if k.startswith('samples')) or '-'} |")
    lines += ["", "## Claims of the paper at this scale", "", "| claim | reproduced | evidence |", "|---|---|---|"]
    for c in s["claims"]:
        lines.append(f"| {c['claim']} | {c['reproduced']} | {c['evidence']} |")
    if s.get("prior_refit"):
        p = s["prior_refit"]
        lines += ["", "## Prior refit (000 App. I) on the control", "",
                  f"train bpd {p['train_bpd_before']:.4f} -> {p['train_bpd_after']:.4f}, test bpd "
                  f"{p['test_bpd_before']:.4f} -> {p['test_bpd_after']:.4f}; sigma mean {p['sigma_mean']:.3f} "
                  f"(min {p['sigma_min']:.3f}, max {p['sigma_max']:.3f}), {100 * p['frac_sigma_above_1']:.0f}% above 1."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plots(out: Path, rows: dict, size: DesignSize, shape) -> dict:
    from .prior_refit import _show

    files = {}
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for k, r in rows.items():
        pts = [(c["step"], c["loss"]) for c in r["curve"] if c["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (bits/dim, mean over {size.loss_every} steps)")
    ax.set_title("training loss per design (003 Fig. 4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_loss.png")
    files["training_loss"] = "training_loss.png"

    fig = _figure(1.3 * len(size.clips) + 1.5, 1.3 * len(rows) + 0.6)
    for i, (k, r) in enumerate(rows.items()):
        for j, z in enumerate(r["z0"]):
            ax = fig.add_subplot(len(rows), len(size.clips), i * len(size.clips) + j + 1)
            _show(ax, torch.from_numpy(z["image"]), shape)
            if i == 0:
                ax.set_title("no clip" if z["clip"] is None else f"c={z['clip']:g}", fontsize=7)
            if j == 0:
                ax.set_ylabel(k, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("x = F^-1(0) with activations clipped to [-c, c] (003 Fig. 1, 5); red = non-finite", fontsize=8)
    fig.savefig(out / "z0_clipping.png")
    files["z0_clipping"] = "z0_clipping.png"

    affine = {k: r for k, r in rows.items() if any(n != "samples" for d in r["scales_raw"].values() for n in d)}
    if affine:
        fig = _figure(3.2 * len(affine), 3.0)
        for i, (k, r) in enumerate(affine.items()):
            ax = fig.add_subplot(1, len(affine), i + 1)
            for t, d in r["scales_raw"].items():
                name = next((n for n in d if n != "samples"), None)
                if name is None:
                    continue
                v = d[name][np.isfinite(d[name])]
                if v.size:
                    ax.hist(np.log10(np.maximum(v, SCALE_FLOOR)), bins=30, density=True, histtype="step", label=f"T={t:g}")
            ax.set_title(k, fontsize=8)
            ax.set_xlabel("log10 s (first coupling after split 1)", fontsize=7)
            ax.legend(fontsize=6)
        fig.suptitle("scale s of the first coupling after a split as the latent noise shrinks (003 Fig. 3)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scale_distribution.png")
        files["scale_distribution"] = "scale_distribution.png"
    return files


REPORTS = {"glow-design-choices": Report(
    keys=("variant",),
    columns=("variant", "test_bpd", "final_loss", "early_loss", "stable", "stable_live", "z0_finite",
             "z0_max_activation", "min_scale_t0", "min_scale_t0_live"),
    claims=(Claim("003 Fig. 4: additive trains worse than affine (final loss, additive - affine > 0)", "final_loss",
                  {"variant": "additive"}, {"variant": CONTROL}, lower=False),
            Claim("003 Fig. 4: biased sigmoid (eps 0.5) trains faster than affine (early loss)", "early_loss",
                  {"variant": "biased_sigmoid"}, {"variant": CONTROL}),
            Claim("003 Fig. 4: biased sigmoid (eps 0.05) trains faster than affine (early loss)", "early_loss",
                  {"variant": "biased_sigmoid_eps0.05"}, {"variant": CONTROL}),
            Claim("003 Fig. 4: bounded trains faster than affine (early loss)", "early_loss",
                  {"variant": "bounded"}, {"variant": CONTROL}),
            Claim("003 sec. 2.2: randomized splits drive the smallest scale at z = 0 below the control's",
                  "log10_min_scale_t0", {"variant": "randomized_splits"}, {"variant": CONTROL}),
            Claim("003 Fig. 2: the noise as conditioner drives the smallest scale at z = 0 below Glow's arrangement",
                  "log10_min_scale_t0", {"variant": CONTROL}, {"variant": "affine_sigmoid_kept"})),
    unit="test bits/dim, training loss in bits/dim")}

EXPERIMENTS = {"glow-design-choices": glow_design_choices}
