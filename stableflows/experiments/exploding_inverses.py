"""Reproductions of Behrmann, Vicol, Wang, Grosse & Jacobsen, "Understanding and Mitigating Exploding
Inverses in Invertible Neural Networks" (papers 000 and 001), at the scale of a CPU.

* ``supervised-table`` (poster, "Supervised Learning w/ Memory-Efficient Gradients"): additive and
  affine invertible classifiers, each with no regularizer, bi-directional FD and the NF objective,
  trained with memory-saving gradients on digits; test accuracy, reconstruction error, min / max
  singular value of the Jacobian, and two verdicts: the poster's (its table marks a model
  invertible with reconstruction error 4.3e-2 and non-invertible only at an infinite error, so:
  every test example reconstructs finitely) and the stricter one of docs/METRICS.md (finite and error
  <= 1e-3, the audit's). :func:`supervised_table` also takes ``data="cifar10", data_dir=...,
  paper=True`` (the authors' settings; for a GPU machine).

  Settings (:data:`DIGITS_SETTINGS`) are the authors' where they transfer: Adam lr 1e-4 (their
  ``train_inn_classifier.py`` default; at the library's 1e-3 the unregularised affine model
  explodes within a few hundred steps and the FD rows go non-finite), FD every 10 steps at eps 0.1
  with their weight converted to this normalisation (``c eps D = 0.031``, see
  :mod:`stableflows.regularizers`), NF weight 1e-5 per summed nat = 0.02 per bit/dim at CIFAR's D.
* ``gradient-angle`` (000, Fig. 1): angle between the stored-activation and memory-saving gradients
  over training, additive vs affine.
* ``regression-2d`` (poster, "Exploding inverses on a 2D regression task"): an INN regressed onto a
  target that does not depend on one input direction must squash it; its inverse explodes unless
  regularised.
* ``decorrelation`` (000, Fig. 9 and 13): an INN trained to decorrelate rotated, anisotropically
  scaled Gaussian data; the loss is invariant to per-output scaling, so training drifts towards
  ill-conditioned solutions (Fig. 9, third panel) unless regularised.

The papers give no settings for the toy problems beyond the figures; the ones here are ours and are
recorded in each ``summary.json``. Results that do not reproduce at this scale are reported as such.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import DataConfig
from ..memory import GradientGuard, MemorySavingCompose, compare_gradients
from ..models.classifier import classifier
from ..models.factories import flow_step
from ..regularizers import AUTHORS_FD_WEIGHT, FiniteDifferenceRegularizer, FlowObjectiveRegularizer
from ..train.optim import adamw
from ..train.objectives import Batch
from ..train.supervised import ClassificationObjective, evaluate_classifier
from ._common import PROGRESS, Claim, Report

__all__ = ["supervised_table", "gradient_angle_curve", "regression_2d", "decorrelation", "EXPERIMENTS",
           "DIGITS_SETTINGS", "PAPER_SETTINGS", "FASHION_SETTINGS", "settings_for"]

COND_EXACT_MAX_DIM = 256  # tracked spectra: exact Jacobians up to this dimension (digits' 64), Lanczos above
TOLERANCE = 1e-3  # docs/METRICS.md: invertible within tolerance (L2 reconstruction error, float32, data in [0, 1])
GRAD_CLIP = 50.0
# The authors' CIFAR-10 command lines (README of their code): 3 levels x 16 steps, 128 hidden channels,
# batch 128, Adam lr 1e-4, FD coefficients c = 1e-4 every 10 steps at eps 0.1 (= c eps D = 0.031 in this
# library's normalisation, regularizers.AUTHORS_FD_WEIGHT), NF coefficient 1e-5 on the summed
# log-likelihood (= 1e-5 * D ln 2 ~ 0.02 on bits/dim for D = 3072), 200 epochs (~78k steps).
PAPER_SETTINGS = dict(levels=3, steps_per_level=16, hidden=128, batch_size=128, lr=1e-4, steps=78000,
                      fd_weight=AUTHORS_FD_WEIGHT, fd_every=10, fd_eps=0.1, nf_weight=0.02, angle_every=500,
                      track_every=500, cond_every=500, cond_points=4)
# digits: the authors' optimiser and regulariser settings on a model sized for 8x8 images
DIGITS_SETTINGS = dict(levels=2, steps_per_level=4, hidden=32, batch_size=64, lr=1e-4, steps=1500,
                       fd_weight=AUTHORS_FD_WEIGHT, fd_every=10, fd_eps=0.1, nf_weight=0.02, angle_every=25,
                       track_every=50, cond_every=50, cond_points=4)
# Fashion-MNIST 28x28: the same optimiser and regularisers on the digits model (2 levels: 28 -> 14 -> 7),
# 1,000 steps, so that the six classifiers of one seed train and are assessed in ~10 minutes on 2 cores
# (three seeds ~30 minutes). At lr 1e-4 that is ~1 epoch; the authors trained 200.
# The condition number over training (Fig. 2/5) every 100 steps there: Lanczos at 784 dimensions.
FASHION_SETTINGS = dict(DIGITS_SETTINGS, steps=1000, cond_every=100)
DATA_SETTINGS = {"fashion-mnist": FASHION_SETTINGS}  # data -> settings; any other data: DIGITS_SETTINGS


def settings_for(data: str, paper: bool = False) -> dict:
    """The experiment's settings for ``data`` (``paper``: the authors' CIFAR-10 settings)."""
    return dict(PAPER_SETTINGS if paper else DATA_SETTINGS.get(data, DIGITS_SETTINGS))


# ----------------------------------------------------------------------------- helpers
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _write(out: Path, name: str, obj) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(_json_safe(obj), indent=2))


def _markdown(rows: list[dict], cols: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3g}" if math.isfinite(v) else str(v)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _load(data: str, data_dir: str | None, seed: int):
    from ._common import load_data

    return load_data(data, data_dir, seed)


def _batch(x_int: Tensor, y: Tensor, levels: int, idx: Tensor, g: torch.Generator) -> Batch:
    raw = x_int[idx]
    u = torch.rand(raw.shape, generator=g, dtype=raw.dtype)
    return Batch(x=(raw + u) / levels, raw=raw, y=y[idx], levels=levels)


def _fixed_points(x_int: Tensor, levels: int, n: int) -> Tensor:
    u = torch.rand(x_int[:n].shape, generator=torch.Generator().manual_seed(0), dtype=x_int.dtype)
    return (x_int[:n] + u) / levels


@torch.no_grad()
def _recon_errors(flow, x: Tensor) -> Tensor:
    """Per-example ``||x - F^-1(F(x))||_2``; non-finite -> inf."""
    try:
        x_hat = flow.inverse(flow(x)[0])[0]
    except Exception:  # noqa: BLE001 - a raising round trip is a failure of every example
        return torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    err = (x_hat - x).reshape(x.shape[0], -1).double().norm(dim=1)
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


def _tracked_spectra(model, x: Tensor) -> tuple[float, float, float]:
    """``(sigma_min, sigma_max, cond)`` of ``J_F`` over the points ``x``: the smallest and largest
    singular value over the points and the largest per-point condition number (000 Fig. 2/5).
    Exact Jacobians up to :data:`COND_EXACT_MAX_DIM` dimensions, Lanczos (sigma_min sharpened by
    ``1 / sigma_max(J_F^-1)``) above; NaN where they cannot be computed."""
    from ..audit.adapters import as_invertible
    from ..audit.spectra import spectra

    sp = spectra(as_invertible(model), x, torch.arange(x.shape[0]), exact_max_dim=COND_EXACT_MAX_DIM)
    smin, smax = sp.fwd_smin, sp.fwd_smax
    if not bool(torch.isfinite(smin).any() & torch.isfinite(smax).any()):
        return math.nan, math.nan, math.nan
    cond = torch.nan_to_num(sp.fwd_cond, nan=math.inf)
    return float(torch.nan_to_num(smin, nan=math.inf).min()), float(torch.nan_to_num(smax, nan=-math.inf).max()), \
        float(cond.max())


def train_classifier(model, splits, objective, *, steps: int, batch_size: int, lr: float, seed: int = 0,
                     angle_every: int = 25, track_every: int = 50, cond_every: int | None = None,
                     cond_points: int = 4, fallback: bool = False,
                     time_budget: float | None = None, label: str = "training") -> dict:
    """AdamW training of an invertible classifier with a :class:`GradientGuard` (angle every
    ``angle_every`` steps; by default no fallback, so a broken memory-saving gradient is used, as in
    the paper) and, as in 000 Fig. 2/5, the reconstruction error of each of 64 fixed validation
    examples every ``track_every`` steps (``recon_all``; ``recon``: median, max, non-finite count)
    and the singular values of ``J_F`` at the first ``cond_points`` of them every ``cond_every``
    steps (default ``track_every``; 0 disables): ``spectra`` holds ``(step, sigma_min, sigma_max,
    cond)``. A step whose gradient is non-finite is skipped and counted."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = adamw(model.parameters(), lr=lr)
    guard = GradientGuard(every=angle_every, fallback=fallback, max_angle=1.0)
    x_track = _fixed_points(splits.val, splits.levels, 64)
    cond_every = track_every if cond_every is None else cond_every
    hist: dict = {"step": [], "loss": [], "acc": [], "angle": [], "recon": [], "recon_all": [], "spectra": [],
                  "nonfinite_steps": 0,
                  "first_nonfinite": None, "fd_steps": 0, "fd_rows_nonfinite": 0, "fd_rows_dropped": 0}
    n = splits.train.shape[0]
    model.train()
    with torch.no_grad():
        model.log_prob(_fixed_points(splits.train, splits.levels, min(512, n)))  # ActNorm initialisation
    t0 = time.perf_counter()
    PROGRESS.phase(label, steps)
    for step in range(steps):
        b = _batch(splits.train, splits.y_train, splits.levels, torch.randint(0, n, (batch_size,), generator=g), g)
        opt.zero_grad(set_to_none=True)
        loss, logs = guard.backward(model, objective, b, step)
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))
        if not (math.isfinite(gn) and math.isfinite(float(loss))):
            hist["nonfinite_steps"] += 1
            hist["first_nonfinite"] = hist["first_nonfinite"] if hist["first_nonfinite"] is not None else step
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        if "fd_inverse_nonfinite" in logs or "fd_forward_nonfinite" in logs:
            hist["fd_steps"] += 1
            hist["fd_rows_nonfinite"] += logs.get("fd_forward_nonfinite", 0) + logs.get("fd_inverse_nonfinite", 0)
            hist["fd_rows_dropped"] += logs.get("fd_forward_dropped", 0) + logs.get("fd_inverse_dropped", 0)
        if "grad_angle" in logs:
            hist["angle"].append((step, logs["grad_angle"], logs["grad_rel_error"]))
        last = step == steps - 1 or (time_budget is not None and time.perf_counter() - t0 > time_budget)
        if step % track_every == 0 or last:
            model.eval()
            e = _recon_errors(model.flow, x_track)
            if cond_every and cond_points and (step % cond_every == 0 or last):
                hist["spectra"].append((step, *_tracked_spectra(model, x_track[:cond_points])))
            model.train()
            hist["step"].append(step)
            hist["loss"].append(float(loss))
            hist["acc"].append(float(logs.get("acc", math.nan)))
            hist["recon"].append((step, float(e.median()), float(e.max()), int((~torch.isfinite(e)).sum())))
            hist["recon_all"].append((step, [float(v) for v in e]))
        PROGRESS.update(step + 1, loss=float(loss), acc=logs.get("acc"))
        if last:
            break
    hist["train_time"] = time.perf_counter() - t0
    hist["steps_done"] = step + 1
    return hist


def _resolved_extreme(v: Tensor | None, largest: bool) -> float:
    """Min (max) over the points whose value is resolved (finite); NaN when none is."""
    if v is None or not bool(torch.isfinite(v).any()):
        return math.nan
    v = v[torch.isfinite(v)]
    return float(v.max() if largest else v.min())


def assess(model, splits, *, spectra_points: int = 64) -> dict:
    """Test accuracy; reconstruction error, min / max singular value of ``J_F``, the poster's
    verdict (``invertible``: every test example reconstructs finitely; its table calls a model with
    error 4.3e-2 invertible) and the audit's (``invertible_1e-3``: :func:`stableflows.audit.audit`,
    family ``test``, finite and error <= 1e-3).

    The audit runs without a time budget and with a fixed spectra method (exact Jacobians up to
    :data:`COND_EXACT_MAX_DIM` dimensions, 48 Lanczos steps above), so the figures depend on the
    weights only; under a budget the method, the Lanczos steps and the points were chosen from
    measured timings. ``min_sv`` / ``max_sv`` are over the points whose value is resolved;
    ``sv_unresolved`` counts the points whose ``sigma_min`` is not (NaN: a non-finite Jacobian, or
    Lanczos below the dtype's resolution with no finite inverse estimate), which used to read 0."""
    from ..audit import audit

    model.eval()
    res = evaluate_classifier(model, splits.test, splits.y_test, splits.levels)
    rep = audit(model.as_flow(), splits.test, levels=splits.levels, families="test", repeat=0, localize=False,
                spectra_points=spectra_points, spectra_method="auto", exact_max_dim=COND_EXACT_MAX_DIM,
                tolerance=TOLERANCE, shadow=False, budget=None)
    fam = rep.families["test"]
    err = fam.errors["l2"]
    s = fam.spectra
    finite = torch.isfinite(err)
    out = {
        "test_acc": 100.0 * res["acc"],
        "recon_err": float(err[finite].mean()) if bool(finite.all()) else math.inf,
        "recon_err_median": float(err.median()),
        "nonfinite_pct": 100.0 * float((~finite).double().mean()),
        "min_sv": _resolved_extreme(None if s is None else s.fwd_smin, largest=False),
        "max_sv": _resolved_extreme(None if s is None else s.fwd_smax, largest=True),
        "sv_unresolved": int((~torch.isfinite(s.fwd_smin)).sum()) if s is not None else spectra_points,
        "spectra_method": s.method if s is not None else "none",
        "invertible": bool(finite.all()),  # the poster's criterion: every reconstruction finite
        "invertible_1e-3": rep.verdict.families["test"].status == "invertible",  # docs/METRICS.md / the audit
        "test_bpd": res["bpd"],
    }
    model.train()
    return out


# ----------------------------------------------------------------------------- supervised table
def _objective(reg: str, st: dict) -> ClassificationObjective:
    if reg == "none":
        return ClassificationObjective()
    if reg == "fd":
        return ClassificationObjective(fd=FiniteDifferenceRegularizer(
            weight_forward=st["fd_weight"], weight_inverse=st["fd_weight"], eps=st["fd_eps"], every=st["fd_every"]))
    if reg == "nf":
        return ClassificationObjective(nf=FlowObjectiveRegularizer(weight=st["nf_weight"]))
    raise ValueError(f"unknown regularizer {reg!r}; choose none, fd or nf")


def _run_classifier(coupling: str, reg: str, splits, st: dict, seed: int, scale: str) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    model = classifier(shape=splits.shape, n_classes=int(splits.y_train.max()) + 1, levels=st["levels"],
                       steps_per_level=st["steps_per_level"], hidden=st["hidden"], coupling=coupling, scale=scale,
                       permutation="lu", head="bn_relu", memory_saving=True)
    hist = train_classifier(model, splits, _objective(reg, st), steps=st["steps"], batch_size=st["batch_size"],
                            lr=st["lr"], seed=seed, angle_every=st["angle_every"], track_every=st["track_every"],
                            cond_every=st.get("cond_every"), cond_points=st.get("cond_points", 4),
                            label=f"{coupling}/{reg} (seed {seed})")
    row = {"model": coupling.capitalize(), "reg": {"none": "None", "fd": "FD", "nf": "NF"}[reg],
           **assess(model, splits), "nonfinite_steps": hist["nonfinite_steps"],
           "fd_rows_nonfinite": hist["fd_rows_nonfinite"], "fd_rows_dropped": hist["fd_rows_dropped"],
           "max_angle": max((a for _, a, _ in hist["angle"] if math.isfinite(a)), default=math.nan),
           "max_cond_train": max((c for *_, c in hist["spectra"] if not math.isnan(c)), default=math.nan),
           "train_time_s": hist["train_time"]}
    return row, hist


def _plot_angles(path: Path, runs: dict[str, dict]) -> None:
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, hist in runs.items():
        steps = [s for s, _, _ in hist["angle"]]
        ang = [a if math.isfinite(a) else math.nan for _, a, _ in hist["angle"]]
        line, = ax.plot(steps, [max(a, 1e-8) for a in ang], marker=".", label=label)
        bad = [s for s, a, _ in hist["angle"] if not math.isfinite(a)]
        if bad:
            ax.axvline(bad[0], color=line.get_color(), linestyle=":", label=f"{label}: non-finite from step {bad[0]}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("angle (degrees)")
    ax.set_title("stored-activation vs memory-saving gradient")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_recon(path: Path, runs: dict[str, dict]) -> None:
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, hist in runs.items():
        steps = [s for s, _, _, _ in hist["recon"]]
        worst = [m if math.isfinite(m) else math.nan for _, _, m, _ in hist["recon"]]
        ax.plot(steps, [max(w, 1e-12) if math.isfinite(w) else math.nan for w in worst], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("max reconstruction error (64 val. images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_stability(path: Path, runs: dict[str, dict]) -> None:
    """000 Fig. 2/5: per model, the reconstruction error of every element of the fixed minibatch at
    each tracked step (non-finite ones in orange at the top) and sigma_min / sigma_max / cond of J_F."""
    fig = _figure(9.0, 2.2 * len(runs))
    for i, (label, hist) in enumerate(runs.items()):
        ax = fig.add_subplot(len(runs), 2, 2 * i + 1)
        fin = [(s, e) for s, es in hist["recon_all"] for e in es if math.isfinite(e)]
        bad = [s for s, es in hist["recon_all"] for e in es if not math.isfinite(e)]
        if fin:
            ax.scatter([s for s, _ in fin], [max(e, 1e-12) for _, e in fin], s=3, alpha=0.4, color="tab:blue")
        ax.set_yscale("log")
        if bad:
            top = ax.get_ylim()[1]
            ax.scatter(bad, [top] * len(bad), s=8, color="tab:orange", label="inf / nan")
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(f"{label}: reconstruction error per example", fontsize=8)
        ax.set_ylabel("L2 error", fontsize=7)
        ax2 = fig.add_subplot(len(runs), 2, 2 * i + 2)
        st = [t for t, *_ in hist["spectra"]]
        for k, (name, color) in enumerate((("sigma_min", "tab:green"), ("sigma_max", "tab:red"), ("cond", "k")), 1):
            ax2.plot(st, [v[k] if math.isfinite(v[k]) and v[k] > 0 else math.nan for v in hist["spectra"]],
                     marker=".", color=color, label=name)
        ax2.set_yscale("log")
        ax2.set_title(f"{label}: singular values of J_F", fontsize=8)
        ax2.legend(fontsize=6)
        if i == len(runs) - 1:
            ax.set_xlabel("training step")
            ax2.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path)


def supervised_table(out_dir: Path, *, quick: bool = False, seed: int = 0, data: str = "digits",
                     data_dir: str | None = None, paper: bool = False, scale: str = "sigmoid",
                     couplings: Sequence[str] = ("additive", "affine"), regs: Sequence[str] = ("none", "fd", "nf"),
                     **overrides) -> dict:
    """Supervised table of the poster: {additive, affine} x {none, FD, NF}, memory-saving training."""
    out_dir = Path(out_dir)
    st = settings_for(data, paper)
    if quick:
        st.update(levels=1, steps_per_level=2, hidden=16, steps=40, angle_every=10, track_every=10, cond_every=10,
                  cond_points=2)
    st.update(overrides)
    splits = _load(data, data_dir, seed)
    rows, runs = [], {}
    for coupling in couplings:
        for reg in regs:
            row, hist = _run_classifier(coupling, reg, splits, st, seed, scale)
            rows.append(row)
            runs[f"{coupling}/{reg}"] = hist
            PROGRESS.emit(f"supervised-table: {coupling:8s} {reg:4s} acc {row['test_acc']:.2f}  recon {row['recon_err']:.3g}  "
                  f"min sv {row['min_sv']:.3g}  max sv {row['max_sv']:.3g}  invertible (finite) {row['invertible']}"
                  f", <= 1e-3 {row['invertible_1e-3']}")
    cols = ["model", "reg", "invertible", "invertible_1e-3", "test_acc", "recon_err", "min_sv", "max_sv",
            "sv_unresolved", "nonfinite_pct", "nonfinite_steps", "fd_rows_nonfinite", "fd_rows_dropped", "max_angle", "max_cond_train"]
    (out_dir).mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(
        f"Supervised table (poster), {data}, memory-saving gradients, {st['steps']} steps, lr {st['lr']:g}, "
        f"FD weight {st['fd_weight']:.3g} every {st['fd_every']}, scale {scale}. invertible: every test "
        f"reconstruction finite (the poster's criterion); invertible_1e-3: finite and L2 error <= 1e-3 "
        f"(docs/METRICS.md); fd_rows_*: FD rows non-finite at eps / at every backtracked step, summed over training\n\n"
        + _markdown(rows, cols))
    _plot_angles(out_dir / "gradient_angle.png", {k: v for k, v in runs.items()})
    _plot_recon(out_dir / "reconstruction.png", runs)
    _plot_stability(out_dir / "stability.png", runs)
    summary = {"settings": {**st, "data": data, "scale": scale, "seed": seed}, "rows": rows}
    _write(out_dir, "summary.json", summary)
    _write(out_dir, "histories.json", runs)
    return summary


def gradient_angle_curve(out_dir: Path, *, quick: bool = False, seed: int = 0, data: str = "digits",
                         data_dir: str | None = None, scale: str = "sigmoid", **overrides) -> dict:
    """000 Fig. 1: gradient angle (stored vs memory-saving) over training, additive vs affine."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = dict(settings_for(data), angle_every=10)
    if quick:
        st.update(levels=1, steps_per_level=2, hidden=16, steps=40, angle_every=5, track_every=10, cond_every=10,
                  cond_points=2)
    st.update(overrides)
    splits = _load(data, data_dir, seed)
    runs, rows = {}, []
    for coupling in ("additive", "affine"):
        row, hist = _run_classifier(coupling, "none", splits, st, seed, scale)
        runs[coupling] = hist
        angles = [a for _, a, _ in hist["angle"]]
        finite = [a for a in angles if math.isfinite(a)]
        rows.append({"model": coupling, "median_angle": float(torch.tensor(finite).median()) if finite else math.nan,
                     "max_angle": max(finite) if finite else math.nan,
                     "nonfinite_checks": sum(1 for a in angles if not math.isfinite(a)), "checks": len(angles),
                     "test_acc": row["test_acc"], "invertible": row["invertible"],
                     "invertible_1e-3": row["invertible_1e-3"], "min_sv": row["min_sv"],
                     "sv_unresolved": row["sv_unresolved"]})
    _plot_angles(out_dir / "gradient_angle.png", runs)
    (out_dir / "table.md").write_text(_markdown(rows, list(rows[0])))
    summary = {"settings": {**st, "data": data, "scale": scale, "seed": seed}, "rows": rows}
    _write(out_dir, "summary.json", summary)
    _write(out_dir, "histories.json", runs)
    return summary


# ----------------------------------------------------------------------------- toy problems
def _toy_inn(dim: int, coupling: str, depth: int, hidden: int, scale: str, seed: int) -> MemorySavingCompose:
    torch.manual_seed(seed)
    layers = []
    for k in range(depth):
        layers += flow_step((dim,), k, hidden=hidden, coupling=coupling, scale=scale,
                            permutation="lu" if dim > 2 else "reverse", mask="channel", actnorm=True)
    return MemorySavingCompose(*layers, enabled=True)


@torch.no_grad()
def _sv_range(inn, x: Tensor) -> tuple[float, float]:
    """min and max singular value of ``J_F`` over the points ``x`` (float64 autograd Jacobians)."""
    from ..audit.spectra import exact_singular_values, jacobians

    with torch.enable_grad():
        j = jacobians(lambda t: inn(t)[0], x.double() if next(inn.parameters()).dtype == torch.float64 else x)
    sv = exact_singular_values(j.double())
    sv = torch.nan_to_num(sv, nan=0.0)
    return float(sv[:, -1].min()), float(sv[:, 0].max())


def _toy_train(inn, loss_fn, sample, *, steps: int, lr: float, fd: FiniteDifferenceRegularizer | None,
               angle_every: int, seed: int, label: str = "training") -> dict:
    """Memory-saving training of a toy INN; the gradient angle is measured every ``angle_every`` steps."""
    g = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.Adam(inn.parameters(), lr=lr)
    hist = {"step": [], "loss": [], "angle": [], "nonfinite_steps": 0}
    with torch.no_grad():
        inn(sample(512, g))  # ActNorm initialisation
    PROGRESS.phase(label, steps)
    for step in range(steps):
        x = sample(256, g)

        def total(model, xb):
            z, _ = model(xb)
            loss = loss_fn(z, xb)
            if fd is not None:
                pen, _ = fd(model, xb, z=z, step=step)
                loss = loss + pen
            return loss

        if angle_every and step % angle_every == 0:
            holder = torch.nn.ModuleDict({"inn": inn})
            c = compare_gradients(holder, x, lambda m, b: total(m["inn"], b))
            hist["angle"].append((step, c.angle, c.rel_error))
        opt.zero_grad(set_to_none=True)
        loss = total(inn, x)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(inn.parameters(), GRAD_CLIP))
        if not (math.isfinite(gn) and math.isfinite(float(loss.detach()))):
            hist["nonfinite_steps"] += 1
            continue
        opt.step()
        if step % max(1, steps // 50) == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(float(loss.detach()))
            PROGRESS.update(step + 1, loss=hist["loss"][-1])
    return hist


def _toy_assess(inn, x: Tensor) -> dict:
    e = _recon_errors(inn, x)
    smin, smax = _sv_range(inn, x[:128])
    return {"recon_err_max": float(e.max()), "recon_err_median": float(e.median()),
            "nonfinite_pct": 100.0 * float((~torch.isfinite(e)).double().mean()), "min_sv": smin, "max_sv": smax,
            "cond": smax / smin if smin > 0 else math.inf, "invertible": bool(torch.isfinite(e).all()),
            "invertible_1e-3": bool(torch.isfinite(e).all()) and float(e.max()) <= TOLERANCE}


def regression_2d(out_dir: Path, *, quick: bool = False, seed: int = 0, steps: int = 3000, depth: int = 6,
                  hidden: int = 64, lr: float = 1e-3, scale: str = "exp", fd_weight: float = 1e-2) -> dict:
    """Poster: exploding inverses on a 2-D regression task, with and without FD regularization.

    ``x ~ U[-1, 1]^2``, target ``y = (sin(pi x_1), 0)``: the target ignores ``x_2``, so an INN
    fitting it by MSE must squash the ``x_2`` direction; ``sigma_min(J_F) -> 0`` and the inverse
    explodes. The bi-directional FD penalty keeps it invertible at the cost of a larger MSE."""
    out_dir = Path(out_dir)
    if quick:
        steps, depth, hidden = 60, 2, 16

    def sample(n, g):
        return torch.rand(n, 2, generator=g) * 2 - 1

    def target(x):
        return torch.stack([torch.sin(math.pi * x[:, 0]), torch.zeros_like(x[:, 0])], dim=1)

    def mse(z, x):
        return F.mse_loss(z, target(x))

    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 41), torch.linspace(-1, 1, 41), indexing="ij"),
                       -1).reshape(-1, 2)
    rows, runs = [], {}
    for coupling in ("affine", "additive"):
        for reg in ("none", "fd"):
            inn = _toy_inn(2, coupling, depth, hidden, scale, seed)
            fd = FiniteDifferenceRegularizer(weight_forward=fd_weight, weight_inverse=fd_weight, every=1) \
                if reg == "fd" else None
            hist = _toy_train(inn, mse, sample, steps=steps, lr=lr, fd=fd, angle_every=max(1, steps // 20), seed=seed,
                              label=f"{coupling}/{reg}")
            with torch.no_grad():
                test_mse = float(mse(inn(grid)[0], grid))
            row = {"model": coupling, "reg": reg, "mse": test_mse, **_toy_assess(inn, grid),
                   "max_angle": max((a for _, a, _ in hist["angle"] if math.isfinite(a)), default=math.nan),
                   "nonfinite_steps": hist["nonfinite_steps"]}
            rows.append(row)
            runs[f"{coupling}/{reg}"] = hist
            PROGRESS.emit(f"regression-2d: {coupling:8s} {reg:4s} mse {row['mse']:.3g} min sv {row['min_sv']:.3g} "
                  f"recon {row['recon_err_max']:.3g} invertible {row['invertible']}")
    (Path(out_dir)).mkdir(parents=True, exist_ok=True)
    cols = ["model", "reg", "mse", "invertible", "invertible_1e-3", "recon_err_max", "min_sv", "max_sv", "cond", "max_angle",
            "nonfinite_steps"]
    (out_dir / "table.md").write_text(_markdown(rows, cols))
    summary = {"settings": dict(steps=steps, depth=depth, hidden=hidden, lr=lr, scale=scale, fd_weight=fd_weight,
                                seed=seed), "rows": rows}
    _write(out_dir, "summary.json", summary)
    _write(out_dir, "histories.json", runs)
    return summary


def _offdiag_corr(z: Tensor) -> Tensor:
    """``||offdiag(corr(z))||_F`` over the batch (000 Fig. 13's decorrelation loss, squared below)."""
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (z.shape[0] - 1)
    sd = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = cov / (sd[:, None] * sd[None, :])
    return (corr - torch.diag(corr.diagonal())).pow(2).sum().sqrt()


def decorrelation(out_dir: Path, *, quick: bool = False, seed: int = 0, dim: int = 8, steps: int = 3000,
                  depth: int = 4, hidden: int = 64, lr: float = 1e-3, scale: str = "exp",
                  log10_scales: tuple[float, float] = (-1.0, 1.0), fd_weight: float = 1e-2) -> dict:
    """000 Fig. 9 / 13: decorrelate ``x = R D g``, ``g ~ N(0, I)`` (``D`` log-uniform in
    ``10^log10_scales``, ``R`` a random rotation) by minimising ``||offdiag(corr(F(x)))||^2``.

    Any per-output scaling leaves the loss unchanged, so nothing stops the condition number from
    growing (Fig. 9, third panel); FD regularization keeps it bounded. Reports the decorrelation loss
    over training (Fig. 13), the conditioning and invertibility of the result."""
    out_dir = Path(out_dir)
    if quick:
        dim, steps, depth, hidden = 4, 60, 2, 16
    gen = torch.Generator().manual_seed(seed + 11)
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    diag = 10 ** (log10_scales[0] + (log10_scales[1] - log10_scales[0]) * torch.rand(dim, generator=gen))
    mix = rot @ torch.diag(diag)

    def sample(n, g):
        return torch.randn(n, dim, generator=g) @ mix.T

    def loss_fn(z, x):
        return _offdiag_corr(z).pow(2)

    test = sample(2048, torch.Generator().manual_seed(seed + 12))
    rows, runs = [], {}
    for coupling in ("affine", "additive"):
        for reg in ("none", "fd"):
            inn = _toy_inn(dim, coupling, depth, hidden, scale, seed)
            fd = FiniteDifferenceRegularizer(weight_forward=fd_weight, weight_inverse=fd_weight, every=1) \
                if reg == "fd" else None
            hist = _toy_train(inn, loss_fn, sample, steps=steps, lr=lr, fd=fd, angle_every=max(1, steps // 20),
                              seed=seed, label=f"{coupling}/{reg}")
            with torch.no_grad():
                off = float(_offdiag_corr(inn(test)[0]))
            row = {"model": coupling, "reg": reg, "offdiag_corr": off, **_toy_assess(inn, test),
                   "max_angle": max((a for _, a, _ in hist["angle"] if math.isfinite(a)), default=math.nan),
                   "nonfinite_steps": hist["nonfinite_steps"]}
            rows.append(row)
            runs[f"{coupling}/{reg}"] = hist
            PROGRESS.emit(f"decorrelation: {coupling:8s} {reg:4s} offdiag {off:.3g} cond {row['cond']:.3g} "
                  f"recon {row['recon_err_max']:.3g} invertible {row['invertible']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, h in runs.items():
        ax.plot(h["step"], [math.sqrt(max(v, 0.0)) for v in h["loss"]], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("||offdiag(corr)||")
    ax.set_title("decorrelation loss (000 Fig. 13)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "decorrelation_loss.png")
    cols = ["model", "reg", "offdiag_corr", "invertible", "invertible_1e-3", "recon_err_max", "min_sv", "max_sv", "cond", "max_angle",
            "nonfinite_steps"]
    (out_dir / "table.md").write_text(_markdown(rows, cols))
    summary = {"settings": dict(dim=dim, steps=steps, depth=depth, hidden=hidden, lr=lr, scale=scale,
                                log10_scales=list(log10_scales), fd_weight=fd_weight, seed=seed,
                                data_condition=float(diag.max() / diag.min())), "rows": rows}
    _write(out_dir, "summary.json", summary)
    _write(out_dir, "histories.json", runs)
    return summary


_ACC, _ERR = "test_acc", "recon_err"
REPORTS = {
    "supervised-table": Report(
        keys=("model", "reg"),
        columns=("model", "reg", "invertible", "invertible_1e-3", "test_acc", "recon_err", "min_sv", "max_sv",
                 "sv_unresolved", "nonfinite_pct", "nonfinite_steps", "fd_rows_nonfinite", "max_cond_train"),
        claims=(
            Claim("poster: FD lowers the affine model's reconstruction error", _ERR,
                  {"model": "Affine", "reg": "FD"}, {"model": "Affine", "reg": "None"}),
            Claim("poster: NF lowers the affine model's reconstruction error", _ERR,
                  {"model": "Affine", "reg": "NF"}, {"model": "Affine", "reg": "None"}),
            Claim("poster: FD lowers the additive model's reconstruction error", _ERR,
                  {"model": "Additive", "reg": "FD"}, {"model": "Additive", "reg": "None"}),
            Claim("poster: FD does not cost the affine model accuracy (FD - none, higher is better)", _ACC,
                  {"model": "Affine", "reg": "FD"}, {"model": "Affine", "reg": "None"}, lower=False),
            Claim("poster: FD raises the affine model's smallest singular value (FD - none, higher is better)",
                  "min_sv", {"model": "Affine", "reg": "FD"}, {"model": "Affine", "reg": "None"}, lower=False),
        )),
    "gradient-angle": Report(keys=("model",), columns=("model", "median_angle", "max_angle", "nonfinite_checks",
                                                       "checks", "test_acc", "invertible", "invertible_1e-3",
                                                       "min_sv", "sv_unresolved"),
                             claims=(Claim("000 Fig. 1: the memory-saving gradient of the additive model is closer "
                                           "to the stored one than the affine model's", "max_angle",
                                           {"model": "additive"}, {"model": "affine"}),)),
    "regression-2d": Report(keys=("model", "reg"), columns=("model", "reg", "mse", "invertible", "invertible_1e-3",
                                                            "recon_err_max", "min_sv", "cond", "nonfinite_steps"),
                            claims=(Claim("poster: FD raises the affine INN's smallest singular value", "min_sv",
                                          {"model": "affine", "reg": "fd"}, {"model": "affine", "reg": "none"},
                                          lower=False),)),
    "decorrelation": Report(keys=("model", "reg"), columns=("model", "reg", "offdiag_corr", "invertible",
                                                            "invertible_1e-3", "recon_err_max", "cond",
                                                            "nonfinite_steps"),
                            claims=(Claim("000 Fig. 9/13: FD keeps the affine INN better conditioned", "cond",
                                          {"model": "affine", "reg": "fd"}, {"model": "affine", "reg": "none"}),)),
}

EXPERIMENTS = {
    "supervised-table": supervised_table,
    "gradient-angle": gradient_angle_curve,
    "regression-2d": regression_2d,
    "decorrelation": decorrelation,
}
