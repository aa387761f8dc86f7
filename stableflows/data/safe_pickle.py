"""A restricted unpickler for data files (the CIFAR-10 python batches).

``pickle.load`` runs whatever a pickle names (``os.system`` included). :func:`restricted_load`
resolves only the globals that a pickled dict of numpy arrays needs:

- numpy's array reconstruction (``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``,
  ``numpy.dtype``, and ``numpy[._]core.numeric._frombuffer`` of protocol-5 pickles);
- ``bytes`` and ``_codecs.encode(text, "latin1")``, which protocol-2 pickles written by Python 3
  use for bytes (any other codec is refused).

Dicts, lists, str, bytes, int and float are pickle opcodes and need no global. Any other global
raises :class:`UnsafePickleError` before anything is called; so do persistent ids.
"""
from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from .errors import UnsafePickleError

__all__ = ["restricted_load", "ALLOWED_GLOBALS"]

LATIN1_NAMES = ("latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1")


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to latin-1 (how Python 3 pickles bytes at protocol 2)."""
    if not isinstance(text, str) or str(encoding).lower() not in LATIN1_NAMES or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r} in a pickle (only latin1 is allowed)")
    return codecs.encode(text, "latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's _frombuffer (protocol 5)

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "bytes"): bytes,
    ("__builtin__", "bytes"): bytes,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from a pickle: only numpy arrays, dicts, "
                "lists, str, bytes and numbers are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids")


def restricted_load(data: bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` with only :data:`ALLOWED_GLOBALS` resolvable.

    ``encoding="bytes"`` reads Python 2 pickles (such as the CIFAR-10 batches): their ``str``
    become ``bytes``. Raises :class:`UnsafePickleError` for a forbidden global.
    """
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
