"""The :class:`Splits` container and the validation carve-out shared by every dataset.

A loader produces a training split and a test split (:class:`RawData`); :func:`make_splits`
holds out a fraction ``val_size`` of the *training* split for validation (never of the test
split), stratified by label where labels exist, deterministically in ``seed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..transforms.base import ShapeError

__all__ = ["Splits", "RawData", "make_splits", "carve_validation"]


@dataclass(frozen=True)
class RawData:
    """What a loader returns: one training and one test split, as numpy arrays."""

    x_train: np.ndarray  # (N, *shape)
    y_train: np.ndarray | None  # (N,) integer labels
    x_test: np.ndarray  # (M, *shape)
    y_test: np.ndarray | None  # (M,)
    levels: int | None  # number of discrete levels, None for continuous data


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset split three ways.

    ``train, val, test`` are float32 tensors ``(N, *shape)``: integer levels ``0..levels-1`` for
    discrete data (``levels`` is an int), raw values for continuous data (``levels is None``).
    ``y_*`` are int64 labels or None. ``train_index`` / ``val_index`` are the positions of the
    train / val examples in the source training split (disjoint, sorted, together all of it).
    """

    train: Tensor
    val: Tensor
    test: Tensor
    y_train: Tensor | None
    y_val: Tensor | None
    y_test: Tensor | None
    levels: int | None
    shape: tuple[int, ...]
    name: str
    train_index: Tensor | None = None
    val_index: Tensor | None = None

    @property
    def dim(self) -> int:
        """Number of dimensions of one example, ``prod(shape)``."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, shape={self.shape}, levels={self.levels}, "
            f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"labels={self.y_train is not None})"
        )


def _can_stratify(y: np.ndarray, n_val: int) -> bool:
    """sklearn's stratified split needs >= 2 examples per class and room for every class on both sides."""
    _, counts = np.unique(y, return_counts=True)
    k = len(counts)
    return bool(counts.min() >= 2 and n_val >= k and len(y) - n_val >= k)


def carve_validation(n: int, val_size: float, y: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted index arrays ``(train_idx, val_idx)`` partitioning ``range(n)``.

    ``n_val = ceil(val_size * n)`` (sklearn's rounding). The split is stratified by ``y`` when
    labels are given and every class has at least two examples and fits on both sides; otherwise
    it is a plain random split. ``val_size = 0`` gives an empty validation split.
    """
    from sklearn.model_selection import train_test_split

    if not (isinstance(val_size, (int, float)) and 0.0 <= val_size < 1.0):
        raise ConfigError(f"data.val_size must be a fraction in [0, 1), got {val_size!r}")
    n_val = math.ceil(val_size * n)
    idx = np.arange(n)
    if n_val == 0:
        return idx, idx[:0]
    if n - n_val < 1:
        raise ConfigError(f"data.val_size={val_size} leaves no training examples out of {n}")
    strat = y if (y is not None and _can_stratify(y, n_val)) else None
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def _tensor_x(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _tensor_y(a: np.ndarray | None) -> Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def make_splits(raw: RawData, *, name: str, val_size: float, seed: int, flatten: bool) -> Splits:
    """Carve validation out of ``raw``'s training split and convert everything to tensors."""
    x_tr, y_tr = raw.x_train, raw.y_train
    if y_tr is not None and len(y_tr) != len(x_tr):
        raise ShapeError(f"{name}: {len(x_tr)} training examples but {len(y_tr)} labels")
    tr, va = carve_validation(len(x_tr), val_size, y_tr, seed)
    shape = tuple(int(s) for s in raw.x_train.shape[1:])

    def prep(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1) if flatten else a  # (N, C, H, W) -> (N, C*H*W)

    return Splits(
        train=_tensor_x(prep(x_tr[tr])),
        val=_tensor_x(prep(x_tr[va])),
        test=_tensor_x(prep(raw.x_test)),
        y_train=None if y_tr is None else _tensor_y(y_tr[tr]),
        y_val=None if y_tr is None else _tensor_y(y_tr[va]),
        y_test=_tensor_y(raw.y_test),
        levels=raw.levels,
        shape=(math.prod(shape),) if flatten else shape,
        name=name,
        train_index=torch.from_numpy(tr.astype(np.int64)),
        val_index=torch.from_numpy(va.astype(np.int64)),
    )
