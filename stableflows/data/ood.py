"""Out-of-distribution input families (docs/METRICS.md), in model space and on the level grid.

Model space is where a flow's inputs live: discrete data with ``L`` levels are dequantised to
``v = (x + u) / L`` in ``[0, 1)`` (:func:`stableflows.metrics.dequantize`). Given model-space
in-distribution examples ``reference`` ``(B, *shape)``, :func:`ood_family` returns ``n`` model-space
examples of the same event shape (``v`` is one reference example; [d] marks the families that
also exist on the level grid, :data:`DISCRETE_FAMILIES`):

- ``uniform`` [d]: ``U[0, 1)`` per entry.
- ``gaussian``: ``N(mean, std^2)`` per entry, mean 0.5, std 0.25, NOT clamped: about 4.6 % of
  the entries fall outside ``[0, 1]``, where a logit pre-transform is non-finite -- exactly what
  an audit should report, so the values are left as they are.
- ``constant`` [d]: every entry of an example equal; the n values spread evenly over the levels
  at their cell centres ``(l + 1/2) / L``, or over ``(k + 1/2) / n`` without levels.
- ``grayed`` [d]: ``m + factor (v - m)``, factor 0.5, ``m`` the example's mean (or a fixed
  ``center``; ``center=0.5`` is Nalisnick et al. 2019's graying toward pixel value 128).
- ``inverted`` [d]: ``1 - v``, i.e. level ``L - 1 - x`` dequantised with noise ``1 - u``
  (digits: ``16 - x``).
- ``out_of_range``: ``center + scale (v - center)``, center 0.5, scale 2: beyond ``[0, 1]``.
- ``natural_patches`` [d]: patches cut at random from ``sklearn.datasets.load_sample_images()``
  (BT.601 grayscale for one channel, RGB for three), quantised to ``L`` levels (256 without
  levels), at cell centres ``(x + 1/2) / L``.

Families derived from the reference (grayed, inverted, out_of_range) map ``reference[i]`` to
output ``i``, so ``n <= len(reference)``. :func:`discrete_ood_family` gives the integer-level
versions from an integer reference: uniform levels, constant levels ``round(linspace(0, L-1, n))``,
``round(m + factor (x - m))`` (a fixed ``center`` is the level ``center L - 1/2``), ``L - 1 - x``,
quantised patches. ``constant`` and ``natural_patches`` in model space are exactly
:func:`cell_centres` of their discrete versions.

Bits/dim of a family: for a discrete family, ``bits_per_dim(flow, discrete_ood_family(...), L)``
(the fixed test noise of seed 0, exactly as the test set). ``gaussian`` and ``out_of_range`` are
not on the level grid: score the model-space values themselves with
``nats_to_bpd(flow.log_prob(v), D, L)`` -- the bits/dim formula with the dequantised value ``v``
taken as given (with a fixed ``u`` the discrete bits/dim is exactly this).
"""
from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..metrics import dequantize
from ..transforms.base import ShapeError

__all__ = ["OOD_FAMILIES", "DISCRETE_FAMILIES", "ood_family", "discrete_ood_family", "cell_centres", "natural_patches"]

GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.25
GRAY_FACTOR = 0.5
OUT_OF_RANGE_SCALE, OUT_OF_RANGE_CENTER = 2.0, 0.5
NATIVE_LEVELS = 256  # the sample images are 8-bit
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale weights


def cell_centres(x: Tensor, levels: int) -> Tensor:
    """Integer levels to model space at the centre of their cell, ``(x + 1/2) / L``."""
    return dequantize(x, levels, u=torch.full_like(x, 0.5))


# ----------------------------------------------------------------------------- natural patches
@lru_cache(maxsize=1)
def _sample_images() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.float64) for im in load_sample_images().images)  # (H, W, 3) in 0..255


def natural_patches(n: int, image_shape: tuple[int, int, int], levels: int, *, seed: int = 0, downscale: int = 1) -> np.ndarray:
    """``n`` patches ``(n, C, H, W)`` of integer levels ``0..levels-1`` cut from the scikit-learn sample images.

    One channel: BT.601 grayscale; three: RGB; other C: grayscale repeated. The 8-bit values
    ``g`` are quantised as ``floor(g L / 256)``. ``downscale`` block-averages the images first
    (larger structures per patch). Positions and images are drawn with ``seed``.
    """
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
        raise ConfigError(f"natural_patches: downscale must be a positive integer, got {downscale!r}")
    C, H, W = image_shape
    rng = np.random.default_rng(seed)
    imgs = []
    for im in _sample_images():
        if downscale > 1:  # block average (h, w, 3) -> (h // k, w // k, 3)
            h, w = im.shape[0] // downscale, im.shape[1] // downscale
            im = im[: h * downscale, : w * downscale].reshape(h, downscale, w, downscale, 3).mean((1, 3))
        if im.shape[0] < H or im.shape[1] < W:
            raise ShapeError(f"natural patches of {H}x{W} do not fit the {im.shape[0]}x{im.shape[1]} sample images")
        chans = im.transpose(2, 0, 1) if C == 3 else np.repeat((im @ np.asarray(LUMA))[None], C, 0)  # (C, h, w)
        imgs.append(chans)
    out = np.empty((n, C, H, W))
    for i in range(n):  # one draw after another: the first k of n patches are the k patches
        k = rng.integers(0, len(imgs))
        top = rng.integers(0, imgs[k].shape[1] - H + 1)
        left = rng.integers(0, imgs[k].shape[2] - W + 1)
        out[i] = imgs[k][:, top : top + H, left : left + W]
    return np.minimum(np.floor(out * levels / NATIVE_LEVELS), levels - 1)


def _image_shape(event: tuple[int, ...], image_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """(C, H, W) of an image event shape, or of a flattened one (square, 1 or 3 channels)."""
    if image_shape is not None:
        if math.prod(image_shape) != math.prod(event) or len(image_shape) != 3:
            raise ShapeError(f"image_shape {tuple(image_shape)} does not match the event shape {event}")
        return tuple(int(s) for s in image_shape)  # type: ignore[return-value]
    if len(event) == 3:
        return event  # type: ignore[return-value]
    if len(event) == 1:
        for c in (1, 3):
            s = math.isqrt(event[0] // c)
            if c * s * s == event[0] and s > 1:
                return (c, s, s)
    raise ShapeError(f"cannot cut image patches for event shape {event}; pass image_shape=(C, H, W)")


# ----------------------------------------------------------------------------- families
def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _derived(ref: Tensor, n: int, name: str) -> Tensor:
    if n > len(ref):
        raise ShapeError(f"OOD family {name!r} maps reference[i] to output i: n={n} exceeds the {len(ref)} reference examples")
    return ref[:n].double().cpu()


def _mean(x: Tensor) -> Tensor:
    return x.reshape(len(x), -1).mean(1).reshape(-1, *([1] * (x.dim() - 1)))  # (n, 1, ..., 1)


def _check_factor(factor: float) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
        raise ConfigError(f"grayed: factor must lie in [0, 1] (1 keeps the contrast), got {factor}")


# Model-space families: f(ref (B, *shape) float64 CPU, n, event, seed, levels, **params) -> (n, *shape)
def _m_uniform(ref, n, event, seed, levels):
    return torch.rand((n, *event), generator=_gen(seed), dtype=torch.float64)


def _m_gaussian(ref, n, event, seed, levels, *, mean: float = GAUSSIAN_MEAN, std: float = GAUSSIAN_STD):
    return mean + std * torch.randn((n, *event), generator=_gen(seed), dtype=torch.float64)


def _m_constant(ref, n, event, seed, levels):
    if levels is not None:
        return cell_centres(_d_constant(ref, n, event, seed, levels), levels)
    vals = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return vals.reshape(-1, *([1] * len(event))).expand(n, *event).clone()


def _m_grayed(ref, n, event, seed, levels, *, factor: float = GRAY_FACTOR, center: float | None = None):
    _check_factor(factor)
    v = _derived(ref, n, "grayed")
    m = _mean(v) if center is None else center
    return m + factor * (v - m)


def _m_inverted(ref, n, event, seed, levels):
    return 1.0 - _derived(ref, n, "inverted")


def _m_out_of_range(ref, n, event, seed, levels, *, scale: float = OUT_OF_RANGE_SCALE, center: float = OUT_OF_RANGE_CENTER):
    return center + scale * (_derived(ref, n, "out_of_range") - center)


def _m_natural_patches(ref, n, event, seed, levels, *, image_shape=None, downscale: int = 1):
    L = NATIVE_LEVELS if levels is None else levels
    return cell_centres(_d_natural_patches(ref, n, event, seed, L, image_shape=image_shape, downscale=downscale), L)


# Discrete families: the same, on integer levels 0..levels-1 (ref holds integer levels).
def _d_uniform(ref, n, event, seed, levels):
    return torch.randint(0, levels, (n, *event), generator=_gen(seed)).double()


def _d_constant(ref, n, event, seed, levels):
    vals = torch.round(torch.linspace(0.0, levels - 1.0, n, dtype=torch.float64))
    return vals.reshape(-1, *([1] * len(event))).expand(n, *event).clone()


def _d_grayed(ref, n, event, seed, levels, *, factor: float = GRAY_FACTOR, center: float | None = None):
    _check_factor(factor)
    x = _derived(ref, n, "grayed")
    m = _mean(x) if center is None else center * levels - 0.5  # the level whose cell centre is `center`
    return torch.round(m + factor * (x - m)).clamp(0, levels - 1)


def _d_inverted(ref, n, event, seed, levels):
    return (levels - 1.0) - _derived(ref, n, "inverted")


def _d_natural_patches(ref, n, event, seed, levels, *, image_shape=None, downscale: int = 1):
    chw = _image_shape(event, image_shape)
    return torch.from_numpy(natural_patches(n, chw, levels, seed=seed, downscale=downscale)).reshape(n, *event)


_MODEL: dict[str, Callable[..., Tensor]] = {
    "uniform": _m_uniform,
    "gaussian": _m_gaussian,
    "constant": _m_constant,
    "grayed": _m_grayed,
    "inverted": _m_inverted,
    "out_of_range": _m_out_of_range,
    "natural_patches": _m_natural_patches,
}
_DISCRETE: dict[str, Callable[..., Tensor]] = {
    "uniform": _d_uniform,
    "constant": _d_constant,
    "grayed": _d_grayed,
    "inverted": _d_inverted,
    "natural_patches": _d_natural_patches,
}
OOD_FAMILIES: tuple[str, ...] = tuple(_MODEL)
DISCRETE_FAMILIES: tuple[str, ...] = tuple(_DISCRETE)


def _call(table: dict, kind: str, name: str, reference: Tensor, n: int, seed: int, levels: int | None, params: dict) -> Tensor:
    if name not in table:
        known = ", ".join(table)
        raise ConfigError(f"unknown {kind}OOD family {name!r}; known: {known}")
    if not torch.is_tensor(reference) or reference.dim() < 2 or len(reference) == 0:
        raise ShapeError(f"reference must be a non-empty tensor (B, *event_shape), got {getattr(reference, 'shape', reference)!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    fn = table[name]
    allowed = [p for p, v in inspect.signature(fn).parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"OOD family {name!r} takes parameters {allowed}, got unknown {unknown}")
    event = tuple(reference.shape[1:])
    out = fn(reference.detach(), n, event, seed, levels, **params)  # (n, *event) float64 on CPU
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    return out.to(device=reference.device, dtype=dtype)


def ood_family(name: str, reference: Tensor, n: int, *, seed: int = 0, levels: int | None = None, **params) -> Tensor:
    """``n`` model-space examples ``(n, *reference.shape[1:])`` of OOD family ``name`` (see the module doc).

    ``reference`` holds model-space in-distribution examples; ``levels`` (17 for digits, 256 for
    8-bit images, None for continuous data) sets the grid of ``constant`` and ``natural_patches``.
    Deterministic in ``seed``.
    """
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 2):
        raise ConfigError(f"levels must be an integer >= 2 or None, got {levels!r}")
    return _call(_MODEL, "", name, reference, n, seed, levels, params)


def discrete_ood_family(name: str, reference: Tensor, n: int, *, levels: int, seed: int = 0, **params) -> Tensor:
    """``n`` integer-level examples ``0..levels-1`` of a discrete OOD family (:data:`DISCRETE_FAMILIES`).

    ``reference`` holds integer levels (e.g. ``Splits.test``). Score them with
    ``stableflows.metrics.bits_per_dim(flow, x, levels)``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ConfigError(f"levels must be an integer >= 2, got {levels!r}")
    if name in _MODEL and name not in _DISCRETE:
        raise ConfigError(
            f"OOD family {name!r} is not on the level grid; use ood_family() and score it with "
            f"nats_to_bpd(flow.log_prob(v), D, levels). Discrete families: {', '.join(_DISCRETE)}"
        )
    return _call(_DISCRETE, "discrete ", name, reference, n, seed, levels, params)
