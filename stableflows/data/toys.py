"""Two-dimensional toy densities (generated, continuous, deterministic in the seed).

The densities and their scales follow the 2-D benchmarks of FFJORD and Residual Flows
(Chen et al. 2019, Fig. 16 "Checkerboard 2D"); every generator here is written from its
description. Each returns points ``(n, 2)`` and the index of the mixture component a point was
drawn from (``(n,)``, used as a label, e.g. for stratified validation splits):

- ``moons``: two interleaved half circles of radius 1, noise std 0.1, mapped by ``2 p + (-1, -0.2)``.
- ``circles``: concentric circles of radii 3 and 1.5, noise std 0.24.
- ``8gaussians``: 8 equal Gaussians of std ``0.5 / sqrt 2`` on the circle of radius ``2 sqrt 2``.
- ``checkerboard``: uniform on the 8 squares of side 2 of ``[-4, 4]^2`` whose column + row
  (counted from the bottom-left corner) is even; density 1/32 there, 0 elsewhere.
- ``pinwheel``: 5 spiral arms; radial std 0.3, tangential std 0.1, twist rate 0.25, scale 2.
- ``rings``: 4 concentric rings of radii 0.75, 1.5, 2.25, 3, noise std 0.08.

The training split (``n`` points) and the test split (``n`` further points) come from two
independent random streams of the same seed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import ConfigError
from .splits import RawData

__all__ = ["TOYS", "sample_toy", "load_toy_raw"]

TRAIN_STREAM, TEST_STREAM = 0, 1

MOONS_NOISE = 0.1
CIRCLES_RADII = (3.0, 1.5)
CIRCLES_NOISE = 0.24
GAUSS8_RADIUS = 2.0 * np.sqrt(2.0)
GAUSS8_STD = 0.5 / np.sqrt(2.0)
CHECKER_SIDE = 2.0  # squares of side 2 tile [-4, 4]^2 in a 4 x 4 grid
PINWHEEL_ARMS, PINWHEEL_RADIAL_STD, PINWHEEL_TANGENTIAL_STD, PINWHEEL_RATE, PINWHEEL_SCALE = 5, 0.3, 0.1, 0.25, 2.0
RINGS_RADII = (0.75, 1.5, 2.25, 3.0)
RINGS_NOISE = 0.08

Sampler = Callable[[int, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def _moons(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    t = rng.uniform(0.0, np.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)  # (n, 2) upper half circle
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1)  # shifted lower half circle
    p = np.where(y[:, None] == 0, upper, lower) + MOONS_NOISE * rng.standard_normal((n, 2))
    return 2.0 * p + np.array([-1.0, -0.2]), y


def _circles(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    t = rng.uniform(0.0, 2.0 * np.pi, n)
    r = np.asarray(CIRCLES_RADII)[y]
    p = r[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    return p + CIRCLES_NOISE * rng.standard_normal((n, 2)), y


def _gaussians8(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 8, n)
    angle = y * (np.pi / 4.0)
    centres = GAUSS8_RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1)  # (n, 2)
    return centres + GAUSS8_STD * rng.standard_normal((n, 2)), y


def _checkerboard(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    col = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + col % 2  # column + row even
    corner = -4.0 + CHECKER_SIDE * np.stack([col, row], 1)  # bottom-left corner of the square
    p = corner + CHECKER_SIDE * rng.uniform(0.0, 1.0, (n, 2))
    return p, 2 * col + row // 2  # square index 0..7


def _pinwheel(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, PINWHEEL_ARMS, n)
    radial = 1.0 + PINWHEEL_RADIAL_STD * rng.standard_normal(n)
    tangential = PINWHEEL_TANGENTIAL_STD * rng.standard_normal(n)
    angle = y * (2.0 * np.pi / PINWHEEL_ARMS) + PINWHEEL_RATE * np.exp(radial)  # arms twist outwards
    c, s = np.cos(angle), np.sin(angle)
    p = np.stack([c * radial - s * tangential, s * radial + c * tangential], 1)  # rotate (radial, tangential)
    return PINWHEEL_SCALE * p, y


def _rings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(RINGS_RADII), n)
    t = rng.uniform(0.0, 2.0 * np.pi, n)
    r = np.asarray(RINGS_RADII)[y]
    p = r[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    return p + RINGS_NOISE * rng.standard_normal((n, 2)), y


TOYS: dict[str, Sampler] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _gaussians8,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "rings": _rings,
}


def sample_toy(name: str, n: int, *, seed: int = 0, stream: int = TRAIN_STREAM) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points ``(n, 2)`` float32 and component labels ``(n,)`` int64 of toy ``name``.

    Deterministic in ``(seed, stream)``; different streams are independent.
    """
    if name not in TOYS:
        raise ConfigError(f"unknown toy density {name!r}; known: {sorted(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"the number of toy samples must be a positive integer, got {n!r}")
    rng = np.random.default_rng([int(seed), int(stream)])
    x, y = TOYS[name](int(n), rng)
    return x.astype(np.float32), y.astype(np.int64)


def load_toy_raw(name: str, n: int, seed: int = 0) -> RawData:
    """``n`` training points and ``n`` test points of toy ``name`` (continuous, ``levels=None``)."""
    x_tr, y_tr = sample_toy(name, n, seed=seed, stream=TRAIN_STREAM)
    x_te, y_te = sample_toy(name, n, seed=seed, stream=TEST_STREAM)
    return RawData(x_tr, y_tr, x_te, y_te, None)
