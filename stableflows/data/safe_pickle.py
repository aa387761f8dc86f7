"""A restricted unpickler for data files (the CIFAR-10 python batches).

``pickle.load`` runs whatever a pickle names (``os.system`` included). :func:`restricted_load`
resolves only the globals that a pickled dict of numpy arrays needs, each through a guard:

- numpy's array reconstruction: ``_reconstruct(ndarray, (0,), dtype)`` (the empty stub that the
  pickle then fills with its stored bytes; any other shape would allocate an array of data that
  are not in the file: refused), ``numpy.ndarray`` only as that argument (calling it is refused),
  ``numpy.dtype`` of plain (non-object) types, and ``_frombuffer(buffer, dtype, shape, order)`` of
  protocol-5 pickles with a buffer the file holds;
- ``bytes()`` / ``bytes(b)`` and ``_codecs.encode(text, "latin1")``, which protocol-2 pickles
  written by Python 3 use for bytes (``bytes(n)``, n zero bytes that are not in the file, and any
  other codec are refused).

Every array is thus built from bytes stored in the file (numpy checks that their length is the
array's size). Dicts, lists, str, bytes, int and float are pickle opcodes and need no global. Any
other global raises :class:`UnsafePickleError` before anything is called; so do persistent ids
and out-of-band buffers.
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
_STORED = (bytes, bytearray, pickle.PickleBuffer)  # data that a pickle can only hold by storing it


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to latin-1 (how Python 3 pickles bytes at protocol 2)."""
    if not isinstance(text, str) or str(encoding).lower() not in LATIN1_NAMES or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r} in a pickle (only latin1 is allowed)")
    return codecs.encode(text, "latin1")


def _bytes(*args: Any) -> bytes:
    """``bytes()`` or a copy of stored bytes; ``bytes(n)`` would make n bytes the file does not hold."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], _STORED):
        return bytes(args[0])
    raise UnsafePickleError("refusing bytes(...) of anything but stored bytes in a pickle (bytes(n) makes data "
                            "that are not in the file)")


def _ndarray(*args: Any, **kwargs: Any) -> Any:
    raise UnsafePickleError("refusing numpy.ndarray(...) in a pickle: it allocates an array from no stored data")


def _plain_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafePickleError(f"refusing an object dtype ({dt}) in a pickle")
    return dt


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's _frombuffer (protocol 5)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """The empty stub numpy pickles start from; the stored bytes come with the BUILD that follows."""
    if subtype is not _ndarray:
        raise UnsafePickleError("refusing _reconstruct of anything but numpy.ndarray in a pickle")
    if tuple(shape) != (0,):
        raise UnsafePickleError(f"refusing _reconstruct with shape {shape!r} in a pickle: an array must be "
                                "built from the bytes stored in the file")
    if not isinstance(dtype, (bytes, str)) or len(dtype) > 8:
        raise UnsafePickleError(f"refusing _reconstruct with dtype {dtype!r} in a pickle")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buf, _STORED):
        raise UnsafePickleError(f"refusing _frombuffer of a {type(buf).__name__} in a pickle (only stored bytes)")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"refusing _frombuffer with dtype {dtype!r} in a pickle")
    return _FROMBUFFER(buf, dtype, shape, order)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
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
    become ``bytes``. Raises :class:`UnsafePickleError` for a forbidden global or a construction
    from data the file does not hold. (No ``buffers`` are given, so out-of-band buffers fail.)
    """
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
