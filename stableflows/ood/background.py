"""Background model of the likelihood-ratio score (Ren et al. 2019, "Likelihood ratios for
out-of-distribution detection").

The background model is the same flow trained on *perturbed* inputs: each entry of a training
image is replaced, with probability ``rate``, by a level drawn uniformly from ``0..L-1``. It learns
the population-level statistics (smoothness, background, contrast) but not the semantics, so
``LLR(x) = log p_model(x) - log p_background(x)`` cancels the part of the likelihood that those
statistics explain. Score with :func:`stableflows.ood.scores.likelihood_ratio` or give the trained
flow to :func:`stableflows.ood.analyze` as ``background=`` (CLI: ``--background RUN``).

    result = train_background(cfg, splits, rate=0.2)   # a new runs/<model>-<data>-background-<UTC time>
    result = train_background(cfg, splits, out_dir="runs/bg", overwrite=True)   # replace the run in runs/bg

``train_background`` trains into ``out_dir`` or, when it is not given, a new directory per call; a
directory that already holds a run is refused unless ``overwrite`` (as ``stableflows train``).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import ConfigError

__all__ = ["perturb", "perturbed_splits", "train_background", "DEFAULT_RATE"]

DEFAULT_RATE = 0.2  # Ren et al. use mutation rates 0.1-0.3 (tuned on validation data)


def perturb(x: Tensor, levels: int, rate: float = DEFAULT_RATE, *, seed: int = 0) -> Tensor:
    """Replace each entry of the integer-level tensor ``x`` with probability ``rate`` by a uniform
    level ``0..levels-1`` (deterministic in ``seed``)."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"perturbation rate must lie in [0, 1], got {rate}")
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.rand(x.shape, generator=g) < rate
    noise = torch.randint(0, levels, x.shape, generator=g).to(x.dtype)
    return torch.where(mask.to(x.device), noise.to(x.device), x)


def perturbed_splits(splits, rate: float = DEFAULT_RATE, *, seed: int = 0):
    """``splits`` with perturbed training and validation images (the test split is left as is)."""
    if splits.levels is None:
        raise ConfigError("perturbed_splits needs discrete data (levels)")
    return dataclasses.replace(splits, train=perturb(splits.train, splits.levels, rate, seed=seed),
                               val=perturb(splits.val, splits.levels, rate, seed=seed + 1),
                               name=f"{splits.name}-perturbed")


def train_background(cfg, splits, *, rate: float = DEFAULT_RATE, seed: int = 0, out_dir=None, overwrite: bool = False,
                     **train_kw):
    """Train the background model: ``cfg``'s flow on :func:`perturbed_splits` of ``splits``.

    ``out_dir`` (default: a new ``runs/<model>-<data>-background-<UTC time>``; ``cfg.train.out_dir``
    is the foreground run's and is not reused) holding a run is refused unless ``overwrite``.
    ``train_kw`` go to :func:`stableflows.train.train`. Returns its :class:`TrainResult`.
    """
    from ..train.loop import train
    from ..train.rundir import default_out_dir

    bg = perturbed_splits(splits, rate, seed=seed)
    if out_dir is None:
        out_dir = default_out_dir(cfg.replace("data", name=f"{cfg.data.name}-background"))
    return train(cfg.replace("train", out_dir=str(out_dir)), splits=bg, overwrite=overwrite, **train_kw)
