"""Factories of residual flows: ``resflow`` (Chen et al. 2019) and ``iresnet`` (Behrmann et al. 2019).

Every block is ``z = x + g(x)`` with ``Lip(g) < 1`` (:class:`~stableflows.transforms.residual.ResidualBlock`),
so forward and inverse are bi-Lipschitz; the log-det comes from the estimator chosen per model
(``exact`` brute-force Jacobian, ``series`` truncated power series, ``roulette`` unbiased Russian
roulette; see :mod:`stableflows.estimators`).

Architecture (paper 002, app. E), ActNorm before the first block and after every block::

    vectors (D,):     [Logit] -> ActNorm -> (ResBlock -> ActNorm) x (levels * steps_per_level)
                      g = Linear -> act -> Linear -> act -> Linear            (``mlp_layers`` = 3)
    images (C, H, W): [Squeeze] -> Logit -> scale_0 -> [Squeeze -> (factor out) -> scale_k] x (levels - 1)
                      -> flatten -> ActNorm -> (FC ResBlock -> ActNorm) x fc_blocks
                      scale_k = ActNorm -> (ResBlock -> ActNorm) x steps_per_level
                      g = act -> 3x3 conv -> act -> 1x1 conv -> act -> 3x3 conv  (``hidden`` channels)
                      FC g = act -> Linear -> act -> Linear -> act -> Linear     (``fc_hidden`` units)

``squeeze_first``: a squeeze before the first scale, as 002 builds its ImageNet 32 / 64 and
CelebA-HQ models ("Image -> Squeeze -> LogitTransform -> ..."; its MNIST and CIFAR-10 models start
at full resolution). Every block then runs at half the height and width with four times the
channels: at the same ``hidden`` the 3x3 convolutions cost a quarter of the multiply-adds of the
first scale. (The logit is elementwise, so it commutes with the squeeze.)

``factor_out``: after the squeeze that ends each scale but the last, half the channels leave the
flow as standard-normal latents (``SplitPrior(learned=False)``), as the published code does for
images larger than 32x32. Image latents are flat ``(B, D)``; vector latents keep ``(D,)``.

Defaults. ``resflow``: LipSwish, ``c = 0.98``, Russian roulette (2 exact terms + ``Geom(0.5)``
tail in training; 20 exact terms + tail in evaluation), Neumann-series gradient and
backward-in-forward. ``iresnet``: ELU, ``c = 0.9``, truncated series of ``n_series_terms`` terms.
The Neumann gradient of a truncated series has, over the probe, the expectation of the gradient
of that series, so it and backward-in-forward stay on for i-ResNets too (memory only).

2-D vectors get no logit: every 2-D data set here is a continuous toy density outside ``[0, 1]``
(``stableflows train --model resflow --data checkerboard`` works as is; ``--logit-alpha`` is
ignored for ``D = 2``). Nor, unless ``actnorm`` is given, ActNorm (as the authors' ``train_toy.py``,
``--actnorm False``): ActNorm's data-dependent initialisation rescales the toy (checkerboard: std
2.3) to unit variance, and there a spectrally normalised branch is nearly affine over the data:
a hidden unit of ``Linear(2, 128)`` with ``||W|| <= c`` has a weight row of norm ~``c sqrt(2/128)``,
so its pre-activation moves by ~0.2 over the data while LipSwish bends on a scale of ~1. With
ActNorm the README's checkerboard command stayed at the Gaussian fit (validation 4.499 nats from step
200 to 3000; the Gaussian of the data's covariance has entropy 4.51, the checkerboard 3.466); without
it the same command reaches 4.17 (and keeps falling). Switching a model to evaluation mode re-converges the power iteration of
every normalised layer for the current weights (:meth:`ResidualFlowModel.train`), so averaged (EMA)
or loaded weights are normalised by their own norm, not by the vectors of other weights.

Power iteration: ``n_power_iter`` iterations per training step from the persisted vectors (Miyato et
al. 2018), reading nothing from the device. With a tolerance ``power_atol`` / ``power_rtol`` it is the
*minimum*, and the iteration continues until the norm changes by less than
``power_atol + power_rtol * sigma`` (at most ``max_power_iter``; one device read per iteration).
"""
from __future__ import annotations

import math
from typing import Sequence

from ..config import DEFAULT_LOGIT_ALPHA
from ..transforms.base import Compose, ShapeError, Transform
from ..transforms.elementwise import Logit
from ..transforms.lipschitz import DEFAULT_COEFF, DEFAULT_MAX_POWER_ITER, NORMS, RefreshOnEval, chain_orders
from ..transforms.multiscale import Flatten, MultiScale, SplitPrior
from ..transforms.normalization import ActNorm
from ..transforms.reshape import Squeeze
from ..transforms.residual import (DEFAULT_INVERSE_ATOL, DEFAULT_INVERSE_MAX_ITER, DEFAULT_INVERSE_RTOL,
                                   ResidualBlock, conv_lipschitz, mlp_lipschitz)
from .flow import Flow
from .registry import register_model

__all__ = ["resflow", "iresnet", "ResidualFlowModel", "RESFLOW_DEFAULTS", "IRESNET_DEFAULTS", "TOY_DIM"]

TOY_DIM = 2  # vectors of this size are continuous toy densities: no logit pre-transform
MLP_LAYERS = 3  # normalised linear layers of the residual branch of vector models
FC_LAYERS = 3  # normalised linear layers of the fully connected blocks of image models
CONV_KERNEL = 3  # the outer convolutions of g (the middle one is 1x1)
RESFLOW_DEFAULTS = {"coeff": DEFAULT_COEFF, "activation": "lipswish", "estimator": "roulette", "n_power_iter": 1}
IRESNET_DEFAULTS = {"coeff": 0.9, "activation": "elu", "estimator": "series", "n_power_iter": 1}  # Behrmann 2019


class ResidualFlowModel(RefreshOnEval, Flow):
    """A :class:`Flow` of Lipschitz-constrained residual blocks; ``eval()`` re-converges the power
    iteration of every normalised layer for the current weights (:class:`RefreshOnEval`)."""


def _check(shape, *, levels, steps_per_level, hidden, fc_blocks, coeff, logit_alpha, norm, activation,
           squeeze_first=False) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ShapeError(f"shape must be (D,) for vectors or (C, H, W) for images, got {shape}")
    if levels < 1 or steps_per_level < 1 or hidden < 1 or fc_blocks < 0:
        raise ValueError(f"need levels, steps_per_level, hidden >= 1 and fc_blocks >= 0, got "
                         f"{levels}, {steps_per_level}, {hidden}, {fc_blocks}")
    if not 0.0 < coeff < 1.0:
        raise ValueError(f"coeff must lie in (0, 1) so that every block is invertible (Lip(g) < 1), got {coeff}")
    if not 0.0 <= logit_alpha < 0.5:
        raise ValueError(f"logit_alpha must lie in [0, 0.5), got {logit_alpha}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm == "mixed" and len(shape) != 1:
        raise ValueError("norm='mixed' (induced mixed norms with learned orders) is implemented for vector "
                         "models (fully connected blocks), not for convolutions")
    from ..transforms.activations import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(sorted(ACTIVATIONS))}")
    if squeeze_first and len(shape) != 3:
        raise ValueError(f"squeeze_first squeezes images (C, H, W); got vectors of shape {shape}")
    if len(shape) == 3:
        c, h, w = shape
        n = levels - 1 + int(squeeze_first)
        f = 2 ** n
        if h % f or w % f:
            first = " (one of them squeeze_first)" if squeeze_first else ""
            raise ShapeError(f"{levels} levels squeeze {n} times{first}: height and width must be divisible "
                             f"by {f}, got {shape}")
    return shape


def _stack(shape: tuple, n: int, make_g, actnorm: bool, block_kw: dict) -> list[Transform]:
    """``[ActNorm] -> (ResBlock -> [ActNorm]) x n`` at event shape ``shape``."""
    layers: list[Transform] = [ActNorm(shape)] if actnorm else []
    for _ in range(n):
        layers.append(ResidualBlock(make_g(), **block_kw))
        if actnorm:
            layers.append(ActNorm(shape))
    return layers


def _image_body(shape: tuple, k: int, *, levels: int, steps_per_level: int, factor_out: bool, fc_blocks: int,
                fc_hidden: int, hidden: int, actnorm: bool, lip_kw: dict, block_kw: dict) -> Transform:
    """Scale ``k`` and everything after it: ``(B, *shape) -> (B, prod(shape))``."""
    c, h, w = shape

    def conv_g():
        return conv_lipschitz(c, hidden, input_shape=(h, w), kernel_size=CONV_KERNEL, **lip_kw)

    layers = _stack(shape, steps_per_level, conv_g, actnorm, block_kw)
    if k == levels - 1:
        d = c * h * w

        def fc_g():
            return mlp_lipschitz(d, fc_hidden, n_layers=FC_LAYERS, preact=True, **lip_kw)

        tail = _stack((d,), fc_blocks, fc_g, actnorm, block_kw) if fc_blocks else []
        return Compose(layers + [Flatten(shape)] + tail)
    squeezed = (4 * c, h // 2, w // 2)  # (B, 4C, H/2, W/2)
    layers.append(Squeeze(2))
    kw = dict(levels=levels, steps_per_level=steps_per_level, factor_out=factor_out, fc_blocks=fc_blocks,
              fc_hidden=fc_hidden, hidden=hidden, actnorm=actnorm, lip_kw=lip_kw, block_kw=block_kw)
    if factor_out:
        prior = SplitPrior(squeezed, learned=False)  # the factored-out half is N(0, I)
        inner = _image_body((prior.c1, h // 2, w // 2), k + 1, **kw)
        return MultiScale(Compose(layers), prior, inner, squeezed)
    return Compose(layers + [_image_body(squeezed, k + 1, **kw)])


def _build(*, shape, levels, steps_per_level, hidden, logit_alpha, actnorm, coeff, activation, norm, estimator,
           n_exact_terms, eval_exact_terms, n_samples, dist, p, probe, n_series_terms, neumann_grad,
           grad_in_forward, n_power_iter, power_atol, power_rtol, max_power_iter, fc_blocks, fc_hidden,
           factor_out, mlp_layers, inverse_atol, inverse_rtol, inverse_max_iter, strict, config,
           defaults: dict, squeeze_first: bool = False) -> Flow:
    given = dict(coeff=coeff, activation=activation, estimator=estimator, n_power_iter=n_power_iter)
    coeff, activation, estimator, n_power_iter = (defaults[k] if v is None else v for k, v in given.items())
    toy = len(tuple(shape)) == 1 and int(tuple(shape)[0]) == TOY_DIM
    if actnorm is None:  # off for 2-D toys: the blocks must see the data at its own scale (module docstring)
        actnorm = not toy
    shape = _check(shape, levels=levels, steps_per_level=steps_per_level, hidden=hidden, fc_blocks=fc_blocks,
                   coeff=coeff, logit_alpha=logit_alpha, norm=norm, activation=activation,
                   squeeze_first=squeeze_first)
    lip_kw = dict(coeff=coeff, activation=activation, norm=norm, n_power_iter=n_power_iter, atol=power_atol,
                  rtol=power_rtol, max_power_iter=max(max_power_iter, n_power_iter))
    block_kw = dict(estimator=estimator, n_exact_terms=n_exact_terms, eval_exact_terms=eval_exact_terms,
                    n_samples=n_samples, dist=dist, p=p or None, n_series_terms=n_series_terms, neumann_grad=neumann_grad,
                    grad_in_forward=grad_in_forward, probe=probe, inverse_atol=inverse_atol,
                    inverse_rtol=inverse_rtol, max_iter=inverse_max_iter, strict=strict)
    pre: list[Transform] = [Logit(logit_alpha)] if logit_alpha > 0 and not toy else []
    if len(shape) == 1:
        d = shape[0]

        def mlp_g():
            g = mlp_lipschitz(d, hidden, n_layers=mlp_layers, **lip_kw)
            return chain_orders(g) if norm == "mixed" else g  # p_0 -> p_1 -> ... -> p_0 (002 app. D eq. 17)

        body = _stack(shape, levels * steps_per_level, mlp_g, actnorm, block_kw)
        return ResidualFlowModel(Compose(pre + body), shape, shape, config=config)
    inner = shape
    if squeeze_first:  # 002's ImageNet models: Image -> Squeeze -> Logit; the logit is elementwise, so
        pre = pre + [Squeeze(2)]  # Logit -> Squeeze is the same map, with the domain check on the input
        inner = (4 * shape[0], shape[1] // 2, shape[2] // 2)
    body = _image_body(inner, 0, levels=levels, steps_per_level=steps_per_level, factor_out=factor_out,
                       fc_blocks=fc_blocks, fc_hidden=fc_hidden or hidden, hidden=hidden, actnorm=actnorm,
                       lip_kw=lip_kw, block_kw=block_kw)
    return ResidualFlowModel(Compose(pre + [body]), shape, (math.prod(shape),), config=config)


_COMMON_ARGS = """
    Args:
        shape: ``(D,)`` (fully connected blocks) or ``(C, H, W)`` (multi-scale convolutional).
        levels, steps_per_level: scales and blocks per scale (vectors: ``levels * steps_per_level`` blocks).
        hidden: channels / units of the residual branches.
        logit_alpha: logit pre-transform (0 disables it; never applied to 2-D vectors).
        actnorm: ActNorm before the first block and after every block. None (not given): on, except for
            2-D vectors (the toy densities), see the module docstring.
        coeff: Lipschitz bound ``c`` of every normalised layer. None: {coeff}.
        activation: ``lipswish`` | ``elu`` | ``softplus``. None: {activation}.
        norm: ``spectral`` | ``inf`` | ``one`` | ``mixed`` (induced norms, :mod:`stableflows.transforms.lipschitz`;
            ``mixed``: induced mixed norms with learned orders chained through each branch, vectors only).
        estimator: log-det estimator ``exact`` | ``series`` | ``roulette``. None: {estimator}.
        n_exact_terms, eval_exact_terms, n_samples, dist, p, probe, n_series_terms, neumann_grad,
            grad_in_forward: options of the estimator (:func:`stableflows.estimators.make_estimator`):
            exact terms before the roulette in training / evaluation, Hutchinson probes per example,
            the roulette's count distribution and its parameter (None: the estimator's), the probe
            distribution, the truncated series' length, the Neumann-series gradient and
            backward-in-forward.
        n_power_iter: minimum power iterations per training step. None: {n_power_iter}.
        power_atol, power_rtol, max_power_iter: the adaptive power iteration's stop and cap (None: exactly
            ``n_power_iter`` iterations per step, no device read; module docstring).
        fc_blocks, fc_hidden: fully connected blocks after the last scale (images), their width (None: ``hidden``).
        factor_out: factor out half the channels after each squeeze (images).
        squeeze_first: squeeze before the first scale (images; 002's ImageNet architecture), every
            block at half the resolution.
        mlp_layers: normalised linear layers per branch of vector models.
        inverse_atol, inverse_rtol, inverse_max_iter, strict: fixed-point inverse of every block
            (``strict`` raises :class:`~stableflows.transforms.base.InverseNotConverged`).
        config: the stored :class:`~stableflows.config.ModelConfig` (``build_model``).
"""


def resflow(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            logit_alpha: float = DEFAULT_LOGIT_ALPHA, actnorm: bool | None = None, coeff: float | None = None,
            activation: str | None = None, norm: str = "spectral", estimator: str | None = None,
            n_exact_terms: int = 2, eval_exact_terms: int = 20, n_samples: int = 1, dist: str = "geometric",
            p: float | None = None, probe: str = "gaussian", n_series_terms: int = 5, neumann_grad: bool = True,
            grad_in_forward: bool = True, n_power_iter: int | None = None,
            power_atol: float | None = None, power_rtol: float | None = None,
            max_power_iter: int = DEFAULT_MAX_POWER_ITER, fc_blocks: int = 0, fc_hidden: int | None = None,
            factor_out: bool = False, mlp_layers: int = MLP_LAYERS, inverse_atol: float = DEFAULT_INVERSE_ATOL,
            inverse_rtol: float = DEFAULT_INVERSE_RTOL, inverse_max_iter: int = DEFAULT_INVERSE_MAX_ITER,
            strict: bool = False, squeeze_first: bool = False, config=None) -> Flow:
    """Residual Flow (Chen et al. 2019): LipSwish, ``c = 0.98``, unbiased Russian roulette,
    Neumann gradient + backward-in-forward (module docstring for the architecture).

    An option left at None is "not given" and takes the Residual Flow's default; any value given,
    also one equal to a default, is used as given.
    """
    return _build(**{k: v for k, v in locals().items()}, defaults=RESFLOW_DEFAULTS)


def iresnet(*, shape: Sequence[int], levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
            logit_alpha: float = DEFAULT_LOGIT_ALPHA, actnorm: bool | None = None, coeff: float | None = None,
            activation: str | None = None, norm: str = "spectral", estimator: str | None = None,
            n_exact_terms: int = 2, eval_exact_terms: int = 20, n_samples: int = 1, dist: str = "geometric",
            p: float | None = None, probe: str = "gaussian", n_series_terms: int = 5, neumann_grad: bool = True,
            grad_in_forward: bool = True, n_power_iter: int | None = None,
            power_atol: float | None = None, power_rtol: float | None = None,
            max_power_iter: int = DEFAULT_MAX_POWER_ITER, fc_blocks: int = 0, fc_hidden: int | None = None,
            factor_out: bool = False, mlp_layers: int = MLP_LAYERS, inverse_atol: float = DEFAULT_INVERSE_ATOL,
            inverse_rtol: float = DEFAULT_INVERSE_RTOL, inverse_max_iter: int = DEFAULT_INVERSE_MAX_ITER,
            strict: bool = False, squeeze_first: bool = False, config=None) -> Flow:
    """i-ResNet (Behrmann et al. 2019): the architecture of :func:`resflow` with ELU, ``c = 0.9``
    and the biased truncated series of ``n_series_terms`` terms.

    An option left at None is "not given" and takes the i-ResNet's default; a value given is used
    as given, also one equal to the Residual Flow's (``iresnet(coeff=0.98)`` builds ``c = 0.98``;
    from the CLI ``--model iresnet --coeff 0.98`` does the same).
    """
    return _build(**{k: v for k, v in locals().items()}, defaults=IRESNET_DEFAULTS)


resflow.__doc__ += _COMMON_ARGS.format(**RESFLOW_DEFAULTS)
iresnet.__doc__ += _COMMON_ARGS.format(**IRESNET_DEFAULTS)

register_model("resflow", resflow)
register_model("iresnet", iresnet)
