"""Errors of :mod:`stableflows.data` (all are :class:`~stableflows.transforms.base.StableflowsError`)."""
from __future__ import annotations

import pickle

from ..transforms.base import StableflowsError

__all__ = ["DatasetNotFound", "DatasetFormatError", "UnsafePickleError"]


class DatasetNotFound(StableflowsError, FileNotFoundError):
    """The local files of a dataset are missing. The message names every expected file and directory.

    stableflows never downloads data.
    """


class DatasetFormatError(StableflowsError, ValueError):
    """A dataset file is corrupt, truncated, or holds the wrong shape / dtype / number of labels."""


class UnsafePickleError(DatasetFormatError, pickle.UnpicklingError):
    """A pickle names a global outside the allow-list of :mod:`stableflows.data.safe_pickle`."""
