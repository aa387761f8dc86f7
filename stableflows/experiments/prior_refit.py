"""Refitting the prior of a trained flow (Behrmann et al., paper 000, App. I).

A flow trained by maximum likelihood need not map the data exactly onto ``N(0, I)``. Keeping the
network frozen, App. I refits a diagonal Gaussian prior ``N(0, diag sigma^2)`` on the latents
``z = F(x)`` of the training data by maximum likelihood:

    max_sigma  sum_n sum_d [ -log sigma_d - z_nd^2 / (2 sigma_d^2) ],    optimum  sigma_d^2 = mean_n z_nd^2.

The refitted model is ``log p(x) = log N(F(x); 0, diag sigma^2) + log|det dF/dx|`` and samples
``F^-1(sigma * eps)``. Because the network is frozen the latents are fixed, so the optimum is the
closed form above; :func:`refit_prior_variance` also runs the paper's procedure (gradient steps over
epochs, Adam on ``log sigma``) and keeps ``sigma`` after every epoch, which is what App. I's Fig. 21
shows row by row. Sigma > 1 raises the entropy of the model (App. I), sigma < 1 is Glow's
reduced-temperature sampling.

``reproduce prior-refit`` trains a Glow on digits (the control of the design study) and refits it;
``reproduce glow-design-choices`` refits its own trained control.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..metrics import nats_to_bpd
from ..transforms.base import LOG_2PI
from ._common import Report

__all__ = ["latents", "closed_form_log_sigma", "refit_prior_variance", "log_prob_with_prior",
           "sample_with_prior", "refit_study", "prior_refit_experiment", "EXPERIMENTS", "REFIT_LR"]

REFIT_LR = 0.05  # Adam step size on log sigma
REFIT_BATCH = 64


def _dtype(flow) -> torch.dtype:
    return next(p for p in flow.parameters() if p.is_floating_point()).dtype


@torch.no_grad()
def latents(flow: nn.Module, v: Tensor, *, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``(z (N, D), logdet (N,))`` of model-space inputs under the frozen flow (float64, CPU)."""
    flow.eval()
    zs, lds = [], []
    for s in range(0, v.shape[0], batch_size):
        z, ld = flow(v[s:s + batch_size].to(_dtype(flow)))
        zs.append(z.reshape(z.shape[0], -1).double().cpu())
        lds.append(ld.double().cpu())
    return torch.cat(zs), torch.cat(lds)


def closed_form_log_sigma(z: Tensor) -> Tensor:
    """Maximum-likelihood ``log sigma_d = 1/2 log mean_n z_nd^2`` (zero-mean diagonal Gaussian)."""
    return 0.5 * torch.log(z.double().pow(2).mean(0))


def _nll(z: Tensor, log_sigma: Tensor) -> Tensor:
    """Mean over examples of ``-log N(z; 0, diag sigma^2)`` (nats)."""
    return (log_sigma.sum() + 0.5 * (z.pow(2) * torch.exp(-2 * log_sigma)).sum(1)).mean() + 0.5 * z.shape[1] * LOG_2PI


def refit_prior_variance(flow: nn.Module, v_train: Tensor, *, epochs: int = 5, lr: float = REFIT_LR,
                         batch_size: int = REFIT_BATCH, seed: int = 0) -> dict:
    """Refit the diagonal prior variance of a frozen flow on training inputs ``v_train`` (model space).

    Returns ``{"closed_form": log sigma (D,), "epochs": [log sigma after epoch 0 (= 0), 1, ...],
    "nll": [mean -log N(z) after each epoch]}``; the gradient path runs Adam on ``log sigma`` over
    shuffled mini-batches of the fixed latents.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    z, _ = latents(flow, v_train)
    log_sigma = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_sigma], lr=lr)
    g = torch.Generator().manual_seed(seed)
    path, nll = [log_sigma.detach().clone()], [float(_nll(z, log_sigma.detach()))]
    for _ in range(epochs):
        perm = torch.randperm(z.shape[0], generator=g)
        for s in range(0, z.shape[0], batch_size):
            opt.zero_grad()
            loss = _nll(z[perm[s:s + batch_size]], log_sigma)
            loss.backward()
            opt.step()
        path.append(log_sigma.detach().clone())
        nll.append(float(_nll(z, log_sigma.detach())))
    return {"closed_form": closed_form_log_sigma(z), "epochs": path, "nll": nll,
            "nll_closed_form": float(_nll(z, closed_form_log_sigma(z)))}


@torch.no_grad()
def log_prob_with_prior(flow: nn.Module, v: Tensor, log_sigma: Tensor) -> Tensor:
    """``log N(F(v); 0, diag sigma^2) + log|det dF/dv|`` per example (float64)."""
    z, ld = latents(flow, v)
    ls = log_sigma.double()
    return -(ls.sum() + 0.5 * (z.pow(2) * torch.exp(-2 * ls)).sum(1)) - 0.5 * z.shape[1] * LOG_2PI + ld


@torch.no_grad()
def sample_with_prior(flow: nn.Module, n: int, log_sigma: Tensor | None, *, temperature: float = 1.0,
                      seed: int = 0) -> Tensor:
    """``F^-1(temperature * sigma * eps)``, ``eps ~ N(0, I)`` from ``seed`` (the same eps for every sigma)."""
    flow.eval()
    eps = torch.randn((n, *flow.latent_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = torch.exp(log_sigma.double()).reshape(1, *flow.latent_shape) if log_sigma is not None else 1.0
    x, _ = flow.inverse((temperature * scale * eps).to(_dtype(flow)))
    return x


def _bpd(flow, x_int: Tensor, levels: int, log_sigma: Tensor) -> float:
    from ..ood.probes import fixed_dequantize

    v = fixed_dequantize(x_int, levels)
    lp = log_prob_with_prior(flow, v, log_sigma)
    return float(nats_to_bpd(lp, v[0].numel(), levels).mean())


def refit_study(flow: nn.Module, splits, out_dir: Path, *, epochs: int = 5, n_samples: int = 8, seed: int = 0) -> dict:
    """Refit ``flow``'s prior on ``splits.train``; write ``prior_refit.png`` (samples with the same
    eps before refitting and after each epoch, one row per epoch as in App. I Fig. 21) and return
    bits/dim before / after and the fitted sigmas."""
    from ..ood.probes import fixed_dequantize

    L = splits.levels
    r = refit_prior_variance(flow, fixed_dequantize(splits.train, L), epochs=epochs, seed=seed)
    zeros = torch.zeros_like(r["closed_form"])
    sig = torch.exp(r["closed_form"])
    rows = [("prior N(0, I)", zeros)] + [(f"epoch {i}", ls) for i, ls in enumerate(r["epochs"][1:], 1)] + \
           [("closed form", r["closed_form"])]
    images = [sample_with_prior(flow, n_samples, ls, seed=seed) for _, ls in rows]
    _plot_rows(out_dir / "prior_refit.png", [lab for lab, _ in rows], images, splits.shape)
    summary = {
        "epochs": epochs,
        "train_bpd_before": _bpd(flow, splits.train, L, zeros), "train_bpd_after": _bpd(flow, splits.train, L, r["closed_form"]),
        "test_bpd_before": _bpd(flow, splits.test, L, zeros), "test_bpd_after": _bpd(flow, splits.test, L, r["closed_form"]),
        "sigma_mean": float(sig.mean()), "sigma_min": float(sig.min()), "sigma_max": float(sig.max()),
        "frac_sigma_above_1": float((sig > 1).double().mean()),
        "nll_per_epoch": r["nll"], "nll_closed_form": r["nll_closed_form"],
        "nonfinite_samples": {lab: int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).sum())
                              for (lab, _), x in zip(rows, images)},
        "figure": "prior_refit.png",
    }
    return summary


def _plot_rows(path: Path, labels, images, shape) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = images[0].shape[0]
    fig = Figure(figsize=(1.1 * n + 1.5, 1.1 * len(images)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (lab, x) in enumerate(zip(labels, images)):
        for j in range(n):
            ax = fig.add_subplot(len(images), n, i * n + j + 1)
            _show(ax, x[j], shape)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("samples with the same eps: prior N(0, I), then refitted diagonal variance (000 App. I)", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _show(ax, x: Tensor, shape) -> None:
    """One model-space image in [0, 1]; non-finite pixels red."""
    import matplotlib

    img = np.asarray(x.detach().double().cpu().reshape(shape)[0] if len(shape) == 3 else x.reshape(-1)[None], float)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="red")
    ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def prior_refit_experiment(out_dir, *, quick: bool = False, seed: int = 0, data: str = "digits",
                           data_dir: str | None = None) -> dict:
    """Refit the prior variance of a Glow trained on digits (000 App. I): samples and bits/dim before and after."""
    from ._common import levels_text, load_data
    from .glow_design import CONTROL, FULL, QUICK, train_variant

    size = QUICK if quick else FULL
    out = Path(out_dir)
    splits = load_data(data, data_dir, seed)
    run = train_variant(CONTROL, size, splits, out / "run", seed=seed, data_dir=data_dir)
    refit = refit_study(run["flow"], splits, out, epochs=size.refit_epochs, seed=seed)
    summary = {"model": CONTROL, "size": {k: v for k, v in size.__dict__.items()}, "test_bpd_trained": run["test_bpd"],
               "data": data, "levels_note": levels_text(splits.levels), **refit,
               "rows": [refit_row(CONTROL, refit)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    r = summary["rows"][0]
    (out / "table.md").write_text(
        f"Prior refit (000 App. I) of the {CONTROL} Glow on {data} ({summary['levels_note']}), {size.steps} steps\n\n"
        "| train bpd before | after | test bpd before | after | sigma mean | min | max |\n|---|---|---|---|---|---|---|\n"
        + " | ".join(f"{r.get(k, math.nan):.4f}" for k in ("train_bpd_before", "train_bpd_after", "test_bpd_before",
                                                        "test_bpd_after", "sigma_mean", "sigma_min", "sigma_max"))
        .join(["| ", " |\n"]))
    return summary


def refit_row(model: str, r: dict) -> dict:
    """The figures ``reproduce --seeds`` aggregates (also read from a glow-design summary's ``prior_refit``)."""
    return {"model": model, **{k: r[k] for k in ("train_bpd_before", "train_bpd_after", "test_bpd_before",
                                                 "test_bpd_after", "sigma_mean", "sigma_min", "sigma_max",
                                                 "frac_sigma_above_1") if k in r}}


REPORTS = {"prior-refit": Report(
    keys=("model",), columns=("model", "train_bpd_before", "train_bpd_after", "test_bpd_before", "test_bpd_after",
                              "sigma_mean", "sigma_min", "sigma_max"),
    extract=lambda sm: sm.get("rows") or ([refit_row(CONTROL_NAME, sm["prior_refit"])] if sm.get("prior_refit") else []),
    claims=(), unit="bits/dim")}
CONTROL_NAME = "affine_sigmoid"

EXPERIMENTS = {"prior-refit": prior_refit_experiment}
