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

__all__ = ["nice", "realnvp", "glow", "cv_glow", "flow_step", "split_shuffle", "PERMUTATIONS", "COUPLINGS",
           "SPLIT_CONDITIONS"]

PERMUTATIONS = ("lu", "conv1x1", "reverse", "shuffle", "none")
COUPLINGS = ("affine", "additive", "spline")
SPLIT_CONDITIONS = ("kept", "factored")
SPLIT_SHUFFLE_SEED = 1000  # base seed of the randomized-split permutations (level k: 1000 + 100 k, ...)
SPLIT_SHUFFLE_TRIES = 100
SCALE_FLOOR_ARG = {"biased_sigmoid": "eps", "bounded": "a"}  # the scale parameter a scale_floor sets


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
              mask: str, actnorm: bool, seed: int = 0, parity: int | None = None,
              scale_kwargs: dict | None = None) -> list[Transform]:
    """One Glow step: [ActNorm] -> permutation -> coupling. Without a channel-mixing permutation
    ("none") the coupling alternates which half it keeps. ``parity`` (0: the first half of the
    channels conditions the coupling, 1: the second) overrides the default choice; ``scale_kwargs``
    go to the scale parameterisation of an affine coupling."""
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
    if parity is None:
        parity = index % 2 if permutation == "none" or mask == "checkerboard" else 0
    if coupling == "affine":
        layers.append(AffineCoupling(shape, mask=mask, parity=parity, hidden=hidden, scale=scale,
                                     scale_kwargs=scale_kwargs))
    elif coupling == "spline":
        layers.append(SplineCoupling(shape, mask=mask, parity=parity, hidden=hidden))
    else:
        layers.append(AdditiveCoupling(shape, mask=mask, parity=parity, hidden=hidden))
    return layers


def split_shuffle(shape: Sequence[int], seed: int) -> Permutation:
    """Daniels' randomized split (paper 003, sec. 2.1 item 4) for a level of event shape ``(C, H, W)``:
    a fixed random channel permutation put between the level's last coupling and its split, so the
    factored-out channels are a random mix of that coupling's conditioner and transformed halves.

    Placed in front of a step instead (ActNorm, then the 1x1 convolution) it would be absorbed: the
    1x1 convolution is any invertible channel mixing, so ``W P`` spans the same family as ``W``.
    After the last coupling nothing absorbs it. The first seed ``seed, seed + 1, ...`` whose
    permutation sends channels of *both* halves of the coupling to the factored-out positions is
    taken (a shuffle that happens to keep the halves apart would be no randomized split)."""
    c = int(shape[0])
    c1 = c - c // 2  # SplitPrior keeps x[:, :c1] and factors out x[:, c1:]
    for s in range(int(seed), int(seed) + SPLIT_SHUFFLE_TRIES):
        perm = Permutation(shape, kind="shuffle", seed=s)
        out = perm.perm[c1:]  # input channels that land in the factored-out positions
        if bool((out < c // 2).any()) and bool((out >= c // 2).any()):
            return perm
    raise ShapeError(f"no channel permutation of {c} channels mixes both coupling halves into the split")


def _multiscale(shape, *, levels, steps_per_level, split_prior, split_condition="kept", shuffle=False,
                level=0, **step_kw) -> Transform:
    """Squeeze -> K steps -> (split + recurse) per level; flat latent (B, D).

    Before a split the last coupling's parity follows ``split_condition``: ``"kept"`` (parity 0:
    the half that continues to the next level conditions it, the factored-out half is the half it
    transforms) or ``"factored"`` (parity 1: the factored-out half is its conditioner input).
    Couplings that alternate parities (no channel mixing) are shifted so the last one has it."""
    c, h, w = shape
    if h % 2 or w % 2:
        raise ShapeError(f"level needs even height and width to squeeze, got {shape}")
    shape = (4 * c, h // 2, w // 2)
    layers: list[Transform] = [Squeeze(2)]
    splits = levels > 1
    channel = step_kw["mask"] == "channel"
    alternating = step_kw["permutation"] == "none"
    target = SPLIT_CONDITIONS.index(split_condition)  # parity of the last coupling before the split
    for k in range(steps_per_level):
        parity = None
        if splits and channel:
            if alternating:
                parity = (k - (steps_per_level - 1) + target) % 2
            elif k == steps_per_level - 1:
                parity = target
        layers += flow_step(shape, k, parity=parity, **step_kw)
    if levels == 1:
        level_t = Compose(layers)
        top = [level_t] + ([ElementwiseAffine(shape)] if split_prior else []) + [Flatten(shape)]
        return Compose(top)
    if shuffle:
        layers.append(split_shuffle(shape, SPLIT_SHUFFLE_SEED + 100 * level))
    prior = SplitPrior(shape, learned=split_prior)
    inner = _multiscale((prior.c1, shape[1], shape[2]), levels=levels - 1, steps_per_level=steps_per_level,
                        split_prior=split_prior, split_condition=split_condition, shuffle=shuffle, level=level + 1,
                        **step_kw)
    return MultiScale(Compose(layers), prior, inner, shape)


def _scale_kwargs(scale: str, scale_floor: float | None) -> dict | None:
    if scale_floor is None:
        return None
    if scale not in SCALE_FLOOR_ARG:
        raise ValueError(f"scale_floor applies to the scales {', '.join(SCALE_FLOOR_ARG)}, not {scale!r}")
    return {SCALE_FLOOR_ARG[scale]: float(scale_floor)}


def _build(shape, *, levels, steps_per_level, logit_alpha, split_prior, config, split_condition="kept",
           split_shuffle=False, **step_kw) -> Flow:
    shape = _check_shape(shape)
    if levels < 1 or steps_per_level < 1:
        raise ValueError(f"levels and steps_per_level must be >= 1, got {levels}, {steps_per_level}")
    if step_kw["hidden"] < 1:
        raise ValueError(f"hidden must be >= 1, got {step_kw['hidden']}")
    if not 0 <= logit_alpha < 0.5:
        raise ValueError(f"logit_alpha must lie in [0, 0.5), got {logit_alpha}")
    _choice("split_condition", split_condition, SPLIT_CONDITIONS)
    multi = len(shape) == 3 and levels > 1
    if split_condition != "kept" and not (multi and step_kw["mask"] == "channel"):
        raise ValueError("split_condition='factored' needs an image flow with levels >= 2 and mask='channel' "
                         "(a checkerboard coupling conditions on pixels, not on the factored-out channels)")
    if split_shuffle and not multi:
        raise ValueError("split_shuffle needs an image flow with levels >= 2 (vectors and one level have no split)")
    if step_kw["actnorm"] is None:
        step_kw["actnorm"] = True
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
    body = _multiscale(shape, levels=levels, steps_per_level=steps_per_level, split_prior=split_prior,
                       split_condition=split_condition, shuffle=split_shuffle, **step_kw)
    return Flow(Compose(pre + [body]), shape, (math.prod(shape),), config=config)


def glow(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
         coupling: str = "affine", scale: str = "sigmoid", permutation: str = "lu", mask: str = "channel",
         logit_alpha: float = DEFAULT_LOGIT_ALPHA, split_prior: bool = True, actnorm: bool | None = None,
         split_condition: str = "kept", split_shuffle: bool = False, scale_floor: float | None = None,
         config=None) -> Flow:
    """Glow (Kingma & Dhariwal 2018): ``levels`` x (squeeze, ``steps_per_level`` x [ActNorm, 1x1 conv,
    coupling], split with a learned prior). For vectors there is one scale with
    ``levels * steps_per_level`` steps and no split.

    Args:
        shape: event shape, ``(C, H, W)`` (multi-scale, CNN conditioners) or ``(D,)`` (MLP conditioners).
        levels: squeeze/split levels of an image flow (height and width divisible by ``2 ** levels``).
        steps_per_level: flow steps per level.
        hidden: channels (images) or units (vectors) of the conditioner networks.
        coupling: ``"affine"`` | ``"additive"`` | ``"spline"`` (rational-quadratic, Durkan et al. 2019).
        scale: scale of affine couplings, a name of :data:`stableflows.transforms.scales.SCALES`
            (``"sigmoid"``: Glow's ``sigma(s + 2)``).
        permutation: channel mixing before each coupling: ``"lu"`` | ``"conv1x1"`` | ``"reverse"`` |
            ``"shuffle"`` | ``"none"`` (then the couplings alternate halves).
        mask: ``"channel"`` | ``"checkerboard"`` coupling mask.
        logit_alpha: alpha of the logit pre-transform (0: none; the data must then be in any range the
            flow was trained on, e.g. centred).
        split_prior: learned conditional Gaussian prior of the factored-out channels (else ``N(0, I)``).
        actnorm: ActNorm at the start of every step (None: on).
        split_condition: which half of the last coupling before each split is its conditioner input.
            ``"kept"`` (default): the half that continues to the next level, so the factored-out half
            is the half the coupling transforms, as in Glow's published code (openai/glow
            ``model.py``: ``revnet2d_step`` transforms the second half, ``split2d`` factors out the
            second half); the default keeps the architecture the bits/dim of this README were
            measured with. ``"factored"``: the factored-out half conditions it, Daniels' reading
            (paper 003, Fig. 2: right after a split the noise ``z_i`` is the input of the CNN that
            computes ``s`` and ``t``), under which special latents such as ``z = 0`` drive the scales
            of the first coupling of the sampling pass. Needs ``mask="channel"``.
        split_shuffle: Daniels' randomized splits (:func:`split_shuffle`): a fixed random channel
            permutation between each level's last coupling and its split.
        scale_floor: lower bound of the ``"biased_sigmoid"`` (its ``eps``, default 0.5) or ``"bounded"``
            (its ``a``, default 0.5) scale; None: the default.
        config: the :class:`~stableflows.config.ModelConfig` stored on the flow (``build_model``).
    """
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=split_prior, config=config, split_condition=split_condition, split_shuffle=split_shuffle,
                  hidden=hidden, coupling=coupling, scale=scale, permutation=permutation, mask=mask, actnorm=actnorm,
                  scale_kwargs=_scale_kwargs(scale, scale_floor))


def realnvp(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            scale: str = "exp", mask: str = "checkerboard", logit_alpha: float = DEFAULT_LOGIT_ALPHA,
            actnorm: bool | None = None,
            scale_floor: float | None = None, config=None) -> Flow:
    """RealNVP (Dinh et al. 2017): affine couplings with alternating masks (no 1x1 conv), ActNorm in
    place of batch norm, multi-scale with fixed standard-normal split priors.

    Args:
        shape: ``(C, H, W)`` or ``(D,)``.
        levels, steps_per_level: squeeze/split levels (images) and couplings per level.
        hidden: width of the conditioner networks.
        scale: scale of the affine couplings (default ``"exp"``, RealNVP's).
        mask: ``"checkerboard"`` (default, alternating pixels) or ``"channel"`` (alternating halves).
        logit_alpha: logit pre-transform (0: none).
        actnorm: ActNorm at the start of every step (None: on).
        scale_floor: lower bound of a ``"biased_sigmoid"`` / ``"bounded"`` scale (None: its default).
        config: the stored :class:`~stableflows.config.ModelConfig`.
    """
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=False, config=config, hidden=hidden, coupling="affine", scale=scale,
                  permutation="none", mask=mask, actnorm=actnorm, scale_kwargs=_scale_kwargs(scale, scale_floor))


def nice(*, shape: Sequence[int], levels: int = 1, steps_per_level: int = 4, hidden: int = 64,
         mask: str = "channel", logit_alpha: float = DEFAULT_LOGIT_ALPHA, config=None) -> Flow:
    """NICE (Dinh et al. 2015): additive couplings alternating halves, then a learned diagonal
    scaling (the only volume change besides the logit).

    Args:
        shape: ``(C, H, W)`` or ``(D,)``.
        levels: squeeze/split levels of an image flow (default 1: no split).
        steps_per_level: additive couplings per level.
        hidden: width of the conditioner networks.
        mask: ``"channel"`` (default) or ``"checkerboard"``.
        logit_alpha: logit pre-transform (0: none).
        config: the stored :class:`~stableflows.config.ModelConfig`.
    """
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=logit_alpha,
                  split_prior=True, config=config, hidden=hidden, coupling="additive", scale="exp",
                  permutation="none", mask=mask, actnorm=False)


def cv_glow(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            permutation: str = "lu", config=None) -> Flow:
    """Constant-volume Glow (Nalisnick et al. 2019, sec. 5): additive coupling, 1x1 conv, ActNorm,
    fixed N(0, I) split priors and no logit, so ``log|det dF/dx|`` is the same for every x.

    Args:
        shape: ``(C, H, W)`` or ``(D,)``; the data enter as they are (no logit).
        levels, steps_per_level: squeeze/split levels (images) and steps per level.
        hidden: width of the conditioner networks.
        permutation: channel mixing before each coupling (default ``"lu"``; see :func:`glow`).
        config: the stored :class:`~stableflows.config.ModelConfig`.
    """
    return _build(shape, levels=levels, steps_per_level=steps_per_level, logit_alpha=0.0,
                  split_prior=False, config=config, hidden=hidden, coupling="additive", scale="exp",
                  permutation=permutation, mask="channel", actnorm=True)
