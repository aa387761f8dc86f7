"""UCI optical digits, embedded in scikit-learn (no download): 1797 images 8x8, levels 0..16.

The train/test split is fixed (docs/METRICS.md)::

    train_test_split(X, y, test_size=360, random_state=0, stratify=y)   # 1437 train, 360 test

so every run and every paper table sees the same test images, whatever the run's seed.
"""
from __future__ import annotations

import numpy as np

from .splits import RawData

__all__ = ["DIGITS_LEVELS", "DIGITS_SHAPE", "DIGITS_TEST_SIZE", "load_digits_raw"]

DIGITS_LEVELS = 17  # pixel values 0..16
DIGITS_SHAPE = (1, 8, 8)
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def load_digits_raw() -> RawData:
    """The fixed digits train/test split as integer levels, images ``(N, 1, 8, 8)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X, y = d.data, d.target  # (1797, 64) float64 in 0..16, (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(
        X, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return RawData(_images(x_tr), y_tr.astype(np.int64), _images(x_te), y_te.astype(np.int64), DIGITS_LEVELS)


def _images(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), *DIGITS_SHAPE).astype(np.float32)  # (N, 64) -> (N, 1, 8, 8)
