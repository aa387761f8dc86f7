"""``load_dataset(DataConfig, seed) -> Splits``: one entry point for every dataset.

- ``digits`` (default): scikit-learn's embedded 8x8 digits, levels 17, shape (1, 8, 8).
- ``moons circles 8gaussians checkerboard pinwheel rings``: generated 2-D toys (:mod:`.toys`),
  continuous (levels None), shape (2,).
- ``mnist fashion-mnist``: local IDX files, levels 256, shape (1, 28, 28).
- ``cifar10 svhn``: local files, levels 256, shape (3, 32, 32).

With ``DataConfig.flatten`` images become vectors, shape ``(C*H*W,)``.
"""
from __future__ import annotations

from typing import Callable

from ..config import ConfigError, DataConfig
from .digits import load_digits_raw
from .files import FILE_DATASETS
from .splits import RawData, Splits, make_splits
from .toys import TOYS, load_toy_raw

__all__ = ["DATASETS", "ALIASES", "load_dataset", "dataset_names"]

DATASETS: dict[str, Callable[[DataConfig, int], RawData]] = {
    "digits": lambda cfg, seed: load_digits_raw(),
    **{name: (lambda cfg, seed, _n=name: load_toy_raw(_n, cfg.n_toy, seed)) for name in TOYS},
    **{name: (lambda cfg, seed, _f=fn: _f(cfg.data_dir)) for name, fn in FILE_DATASETS.items()},
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10", "8-gaussians": "8gaussians"}


def dataset_names() -> list[str]:
    """The canonical names :func:`load_dataset` accepts."""
    return list(DATASETS)


def load_dataset(cfg: DataConfig | None = None, seed: int = 0) -> Splits:
    """Load dataset ``cfg.name`` split into train / val / test (see :class:`Splits`).

    The validation split is ``cfg.val_size`` of the training split, chosen with ``seed``
    (stratified by label where possible); the test split never changes with ``seed`` except for
    generated toys, whose every split is drawn with ``seed``.
    """
    cfg = DataConfig() if cfg is None else cfg
    name = ALIASES.get(cfg.name, cfg.name)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    raw = DATASETS[name](cfg, seed)
    return make_splits(raw, name=name, val_size=cfg.val_size, seed=seed, flatten=cfg.flatten)
