"""Factories of coupling flows: ``nice``, ``realnvp``, ``glow``, ``cv_glow``.

Every factory takes keyword-only arguments and returns a ready :class:`~stableflows.models.flow.Flow`.
Vectors ``shape=(D,)`` get MLP conditioners and a single scale; images ``shape=(C, H, W)`` get the
Glow CNN conditioner (3x3 -> 1x1 -> 3x3, zero-initialised last layer) and the multi-scale
squeeze/split structure.

- NICE (Dinh et al. 2015): additive coupling, alternating halves, a final learned diagonal scaling.
- RealNVP (Dinh et al. 2017): affine coupling with alternating masks, squeeze/split multi-scale.
- Glow (Kingma & Dhariwal 2018): steps ActNorm -> invertible 1x1 conv (LU) -> affine coupling,
  Glow's sigma(s + 2) scale, learned split prior.
- Neural-spline Glow (Durkan et al. 2019): ``coupling="spline"`` puts a monotone rational-quadratic
  spline coupling (:mod:`stableflows.transforms.splines`) in every Glow step.
- Constant-volume Glow (Nalisnick et al. 2019, sec. 5): additive coupling + 1x1 conv + ActNorm and
  fixed split priors, no logit: the log-det does not depend on x.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..config import DEFAULT_LOGIT_ALPHA
from ..transforms.base import Compose, ShapeError, Transform
from ..transforms.coupling import AdditiveCoupling, AffineCoupling
from ..transforms.splines import SplineCoupling
from ..transforms.elementwise import Logit
from ..transforms.linear import Invertible1x1, Permutation
from ..transforms.multiscale import ElementwiseAffine, Flatten, MultiScale, SplitPrior
from ..transforms.normalization import ActNorm
from ..transforms.reshape import Squeeze
from .flow import Flow

__all__ = ["nice", "realnvp", "glow", "cv_glow", "flow_step", "PERMUTATIONS", "COUPLINGS"]

PERMUTATIONS = ("lu", "conv1x1", "reverse", "shuffle", "none")
COUPLINGS = ("affine", "additive", "spline")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ShapeError(f"shape must be (D,) for vectors or (C, H, W) for images, got {shape}")
    if shape[0] < 2 and len(shape) == 1:
        raise ShapeError(f"a coupling flow on vectors needs D >= 2, got {shape}")
    return shape


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return value


def flow_step(shape: Sequence[int], index: int, *, hidden: int, coupling: str, scale: str, permutation: str,
              mask: str, actnorm: bool, seed: int = 0) -> list[Transform]:
    """One Glow step: [ActNorm] -> permutation -> coupling. Without a channel-mixing permutation
    ("none") the coupling alternates which half it keeps."""
    _choice("coupling", coupling, COUPLINGS)
    _choice("permutation", permutation, PERMUTATIONS)
    if mask == "checkerboard" and len(shape) == 3 and shape[1] * shape[2] < 2:
        mask = "channel"  # a 1x1 map has no checkerboard: mix channels instead
    layers: list[Transform] = []
    if actnorm:
        layers.append(ActNorm(shape))
    if permutation in ("lu", "conv1x1"):
        layers.append(Invertible1x1(shape, lu=permutation == "lu"))
    elif permutation in ("reverse", "shuffle"):
        layers.append(Permutation(shape, kind=permutation, seed=seed + index))
    parity = index % 2 if permutation == "none" or mask == "checkerboard" else 0
    if coupling == "affine":
        layers.append(AffineCoupling(shape, mask=mask, parity=parity, hidden=hidden, scale=scale))
    elif coupling == "spline":
        layers.append(SplineCoupling(shape, mask=mask, parity=parity, hidden=hidden))
    else:
        layers.append(AdditiveCoupling(shape, mask=mask, parity=parity, hidden=hidden))
    return layers


def _multiscale(shape, *, levels, steps_per_level, split_prior, **step_kw) -> Transform:
    """Squeeze -> K steps -> (split + recurse) per level; flat latent (B, D)."""
    c, h, w = shape
    if h % 2 or w % 2:
        raise ShapeError(f"level needs even height and width to squeeze, got {shape}")
    shape = (4 * c, h // 2, w // 2)
    layers: list[Transform] = [Squeeze(2)]
    for k in range(steps_per_level):
        layers += flow_step(shape, k, **step_kw)
    level = Compose(layers)
    if levels == 1:
        top = [level] + ([ElementwiseAffine(shape)] if split_prior else []) + [Flatten(shape)]
        return Compose(top)
    prior = SplitPrior(shape, learned=split_prior)
    inner = _multiscale((prior.c1, shape[1], shape[2]), levels=levels - 1, steps_per_level=steps_per_level,
                        split_prior=split_prior, **step_kw)
    return MultiScale(level, prior, inner, shape)


def _build(shape, *, levels, steps_per_level, logit_alpha, split_prior, config, **step_kw) -> Flow:
    shape = _check_shape(shape)
    if levels < 1 or steps_per_level < 1:
        raise ValueError(f"levels and steps_per_level must be >= 1, got {levels}, {steps_per_level}")
    if step_kw["hidden"] < 1:
        raise ValueError(f"hidden must be >= 1, got {step_kw['hidden']}")
    if not 0 <= logit_alpha < 0.5:
        raise ValueError(f"logit_alpha must lie in [0, 0.5), got {logit_alpha}")
    pre: list[Transform] = [Logit(logit_alpha)] if logit_alpha > 0 else []
    if len(shape) == 1:
        steps = []
        for k in range(levels * steps_per_level):
            steps += flow_step(shape, k, **step_kw)
        if split_prior:
            steps.append(ElementwiseAffine(shape))
        return Flow(Compose(pre + steps), shape, shape, config=config)
    if 2 ** levels > min(shape[1], shape[2]) or (shape[1] % 2 ** levels) or (shape[2] % 2 ** levels):
        raise ShapeError(f"{levels} levels need height and width divisible by {2 ** levels}, got {shape}")
    body = _multiscale(shape, levels=levels, steps_per_level=steps_per_level, split_prior=split_prior, **step_kw)
    return Flow(Compose(pre + [body]), shape, (math.prod(shape),), config=config)


def glow(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
         coupling: str = "affine", scale: str = "sigmoid", permutation: str = "lu", mask: str = "channel",
         logit_alpha: float = DEFAULT_LOGIT_ALPHA, split_prior: bool = True, actnorm: bool = True,
         config=None) -> Flow:
    """Glow: ``levels`` x (squeeze, ``steps_per_level`` x [ActNorm, 1x1 conv, coupling], split).

    For vectors there is one scale with ``levels * steps_per_level`` steps.
    """
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=split_prior, config=config, hidden=hidden, coupling=coupling, scale=scale,
                  permutation=permutation, mask=mask, actnorm=actnorm)


def realnvp(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            scale: str = "exp", mask: str = "checkerboard", logit_alpha: float = DEFAULT_LOGIT_ALPHA,
            actnorm: bool = True,
            config=None) -> Flow:
    """RealNVP: affine couplings with alternating masks (no 1x1 conv), ActNorm in place of batch norm,
    multi-scale with fixed standard-normal split priors."""
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=False, config=config, hidden=hidden, coupling="affine", scale=scale,
                  permutation="none", mask=mask, actnorm=actnorm)


def nice(*, shape: Sequence[int], levels: int = 1, steps_per_level: int = 4, hidden: int = 64,
         mask: str = "channel", logit_alpha: float = DEFAULT_LOGIT_ALPHA, config=None) -> Flow:
    """NICE: additive couplings alternating halves, then a learned diagonal scaling (the only
    volume change besides the logit)."""
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=True, config=config, hidden=hidden, coupling="additive", scale="exp",
                  permutation="none", mask=mask, actnorm=False)


def cv_glow(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            permutation: str = "lu", config=None) -> Flow:
    """Constant-volume Glow (Nalisnick et al. 2019): additive coupling, 1x1 conv, ActNorm, fixed
    N(0, I) split priors and no logit, so ``log|det dF/dx|`` is the same for every x."""
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=0.0,
                  split_prior=False, config=config, hidden=hidden, coupling="additive", scale="exp",
                  permutation=permutation, mask="channel", actnorm=True)
