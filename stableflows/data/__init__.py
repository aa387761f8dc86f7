"""Datasets and out-of-distribution inputs.

``load_dataset(DataConfig, seed) -> Splits`` (:mod:`.registry`) covers the embedded digits
(default), generated 2-D toys (:mod:`.toys`) and local-file MNIST / Fashion-MNIST / CIFAR-10 /
SVHN (:mod:`.files`; never downloaded). :func:`ood_family` builds the OOD inputs of docs/METRICS.md
(:mod:`.ood`).

>>> from stableflows.config import DataConfig
>>> s = load_dataset(DataConfig(name="digits"))
>>> s.shape, s.levels, len(s.train) + len(s.val), len(s.test)
((1, 8, 8), 17, 1437, 360)
"""
from .errors import DatasetFormatError, DatasetNotFound, UnsafePickleError
from .files import read_idx
from .ood import DISCRETE_FAMILIES, OOD_FAMILIES, cell_centres, discrete_ood_family, ood_family
from .registry import DATASETS, dataset_names, load_dataset
from .safe_pickle import restricted_load
from .splits import Splits, carve_validation
from .toys import TOYS, sample_toy

__all__ = [
    "load_dataset",
    "Splits",
    "DATASETS",
    "dataset_names",
    "carve_validation",
    "TOYS",
    "sample_toy",
    "read_idx",
    "restricted_load",
    "DatasetNotFound",
    "DatasetFormatError",
    "UnsafePickleError",
    "OOD_FAMILIES",
    "DISCRETE_FAMILIES",
    "ood_family",
    "discrete_ood_family",
    "cell_centres",
]
