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

Two more families, :data:`EXTRA_FAMILIES` (named only, never in the defaults above), both [d]:

- ``grayed_mid``: graying as Nalisnick et al. 2019 (paper 004, Fig. 6b) define it, toward the mid
  level: levels ``round(c + factor (x - c))``, ``c = L // 2`` (128 of 256), factor 0.5, rounded half
  to even and clamped; in model space the reference's levels ``floor(v L)`` are grayed and keep
  their own dequantisation noise ``v L - floor(v L)``.
- ``digits28``: scikit-learn's 1,797 digits (8x8, 0..16) upscaled to MNIST's layout, 28x28 event
  shapes only: each digit's ink bounding box is resized (bilinear) so its longer side is 20 pixels,
  aspect ratio kept, and placed in a 28x28 field with its centre of mass moved to the field's
  centre (13.5, 13.5) by a whole-pixel shift, as MNIST was made (LeCun et al.); values ``g/16`` on
  ``[0, 1]`` become levels ``round(g (L - 1) / 16)`` (0 = background, as MNIST / Fashion-MNIST).
  NOT MNIST: a finite set, ``min(n, 1797)`` distinct digits in an order drawn with ``seed``.

:data:`COMPANION_28` is the companion set of 28x28 data (Fashion-MNIST, MNIST), needing no download:
``constant, uniform, grayed_mid, inverted, natural_patches, digits28``.

Families derived from the reference (grayed, grayed_mid, inverted, out_of_range) map ``reference[i]``
to output ``i``, so ``n <= len(reference)``. :func:`discrete_ood_family` gives the integer-level
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

__all__ = ["OOD_FAMILIES", "DISCRETE_FAMILIES", "EXTRA_FAMILIES", "COMPANION_28", "FAMILY_DESCRIPTIONS", "ood_family",
           "discrete_ood_family", "cell_centres", "natural_patches", "digits_mnist_layout"]

GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.25
GRAY_FACTOR = 0.5
OUT_OF_RANGE_SCALE, OUT_OF_RANGE_CENTER = 2.0, 0.5
NATIVE_LEVELS = 256  # the sample images are 8-bit
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale weights
MNIST_FIELD, MNIST_BOX = 28, 20  # MNIST: digits fit a 20x20 box, centred by mass in a 28x28 field
DIGITS_MAX = 16  # scikit-learn digits: values 0..16


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


# ----------------------------------------------------------------------------- digits in MNIST's layout
def _mnist_layout(g: np.ndarray) -> np.ndarray:
    """One digit ``g`` (8x8 in [0, 1]) in MNIST's layout: ink box resized to a longer side of 20,
    centre of mass shifted (whole pixels) to the centre of a 28x28 field. ``(28, 28)`` in [0, 1]."""
    rows, cols = np.nonzero(g.any(1))[0], np.nonzero(g.any(0))[0]
    crop = g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # (h, w) ink bounding box
    h, w = crop.shape
    size = (max(1, round(h * MNIST_BOX / max(h, w))), max(1, round(w * MNIST_BOX / max(h, w))))
    big = torch.nn.functional.interpolate(torch.from_numpy(crop)[None, None], size=size, mode="bilinear",
                                          align_corners=False)[0, 0].clamp(0, 1).numpy()  # (H, W), H or W = 20
    mass = big.sum()
    com = ((big.sum(1) * np.arange(size[0])).sum() / mass, (big.sum(0) * np.arange(size[1])).sum() / mass)
    centre = (MNIST_FIELD - 1) / 2  # 13.5: the field's centre in pixel-centre coordinates
    top = int(np.clip(round(centre - com[0]), 0, MNIST_FIELD - size[0]))  # the box always fits the field
    left = int(np.clip(round(centre - com[1]), 0, MNIST_FIELD - size[1]))
    out = np.zeros((MNIST_FIELD, MNIST_FIELD))
    out[top:top + size[0], left:left + size[1]] = big
    return out


@lru_cache(maxsize=4)
def digits_mnist_layout(levels: int = NATIVE_LEVELS) -> np.ndarray:
    """scikit-learn's 1,797 digits in MNIST's layout, ``(1797, 28, 28)`` integer levels ``0..levels-1``
    (see ``digits28`` in the module doc). Cached: treat the array as read-only."""
    from sklearn.datasets import load_digits

    g = load_digits().images / DIGITS_MAX  # (1797, 8, 8) in [0, 1]
    out = np.rint(np.stack([_mnist_layout(d) for d in g]) * (levels - 1))
    out.setflags(write=False)
    return out


def _digits28(n: int, event: tuple[int, ...], seed: int, levels: int, image_shape) -> Tensor:
    C, H, W = _image_shape(event, image_shape)
    if (H, W) != (MNIST_FIELD, MNIST_FIELD):
        raise ShapeError(f"digits28 is scikit-learn's digits in MNIST's 28x28 layout; the event shape {event} is "
                         f"{H}x{W}")
    pool = digits_mnist_layout(levels)
    idx = np.random.default_rng(seed).permutation(len(pool))[:n]  # at most 1797 distinct digits
    x = np.repeat(pool[idx][:, None], C, axis=1)  # (m, C, 28, 28)
    return torch.from_numpy(x.copy()).reshape(len(idx), *event)


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


def _m_grayed_mid(ref, n, event, seed, levels, *, factor: float = GRAY_FACTOR):
    _check_factor(factor)
    v = _derived(ref, n, "grayed_mid")
    if levels is None:
        return 0.5 + factor * (v - 0.5)
    x = torch.floor(v * levels).clamp(0, levels - 1)  # the reference's levels and its own noise u = vL - x
    return (_gray_mid(x, levels, factor) + (v * levels - x)) / levels


def _m_digits28(ref, n, event, seed, levels, *, image_shape=None):
    L = NATIVE_LEVELS if levels is None else levels
    return cell_centres(_digits28(n, event, seed, L, image_shape).double(), L)


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


def _gray_mid(x: Tensor, levels: int, factor: float) -> Tensor:
    c = float(levels // 2)  # 128 of 256 (paper 004: "pixel values closer to 128")
    return torch.round(c + factor * (x - c)).clamp(0, levels - 1)


def _d_grayed_mid(ref, n, event, seed, levels, *, factor: float = GRAY_FACTOR):
    _check_factor(factor)
    return _gray_mid(_derived(ref, n, "grayed_mid"), levels, factor)


def _d_digits28(ref, n, event, seed, levels, *, image_shape=None):
    return _digits28(n, event, seed, levels, image_shape).double()


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
_M_EXTRA: dict[str, Callable[..., Tensor]] = {"grayed_mid": _m_grayed_mid, "digits28": _m_digits28}
_DISCRETE: dict[str, Callable[..., Tensor]] = {
    "uniform": _d_uniform,
    "constant": _d_constant,
    "grayed": _d_grayed,
    "inverted": _d_inverted,
    "natural_patches": _d_natural_patches,
}
_D_EXTRA: dict[str, Callable[..., Tensor]] = {"grayed_mid": _d_grayed_mid, "digits28": _d_digits28}
OOD_FAMILIES: tuple[str, ...] = tuple(_MODEL)  # the defaults: every event shape
DISCRETE_FAMILIES: tuple[str, ...] = tuple(_DISCRETE)
EXTRA_FAMILIES: tuple[str, ...] = tuple(_M_EXTRA)  # named only; on the level grid and in model space
COMPANION_28: tuple[str, ...] = ("constant", "uniform", "grayed_mid", "inverted", "natural_patches", "digits28")
FAMILY_DESCRIPTIONS = {
    "uniform": "uniform noise", "gaussian": "Gaussian noise N(0.5, 0.25^2), not clamped", "constant": "constant images",
    "grayed": "contrast halved toward the image mean", "inverted": "inverted images L-1-x",
    "out_of_range": "data scaled x2 about 0.5 (beyond [0, 1])", "natural_patches": "natural-image patches "
    "(scikit-learn sample images, grayscale)", "grayed_mid": "contrast halved toward the mid level L/2 (paper 004)",
    "digits28": "sklearn digits upscaled to MNIST layout (20x20 box, centred by mass in 28x28; not MNIST)",
}


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
    return _call({**_MODEL, **_M_EXTRA}, "", name, reference, n, seed, levels, params)


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
    return _call({**_DISCRETE, **_D_EXTRA}, "discrete ", name, reference, n, seed, levels, params)
