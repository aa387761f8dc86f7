"""Checkpoints: written atomically, loaded without executing code.

A checkpoint is a ``dict`` of plain containers (dict / list / tuple) holding tensors, numbers,
strings, booleans and None -- nothing else -- saved with :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``, which refuses any pickle that would construct an arbitrary
object (no ``__reduce__`` payload runs). The run configuration is stored as a plain dict
(:meth:`RunConfig.to_dict`) and restored with :meth:`RunConfig.from_dict`.

Atomicity: the bytes go to a temporary file in the target's directory, are flushed and fsync'ed,
and only then renamed over the target with :func:`os.replace` (atomic on POSIX and Windows). A kill
at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..transforms.base import StableflowsError

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "resolve_checkpoint",
]

FORMAT = "stableflows-checkpoint"  # marker stored in every checkpoint
FORMAT_VERSION = 1
_PLAIN_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(StableflowsError, RuntimeError):
    """A checkpoint is missing, corrupt, not a stableflows checkpoint, or holds non-plain objects."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message if path is None else f"{message} [{path}]")
        self.path = None if path is None else Path(path)


def _check_plain(obj: Any, where: str) -> None:
    """Only plain containers of tensors / numbers / strings can be saved (and loaded safely)."""
    if isinstance(obj, _PLAIN_SCALARS) or torch.is_tensor(obj):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"checkpoint key {k!r} at {where} is a {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, torch.Size):  # pragma: no cover - Size is a tuple subclass
        return
    raise CheckpointError(f"checkpoint entry {where} is a {type(obj).__name__}; only tensors, numbers, "
                          "strings and dict/list/tuple of them can be stored")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save ``state`` (plain containers only) atomically to ``path``; returns the path.

    The format marker and version are added to the stored dict.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"a checkpoint state must be a dict, got {type(state).__name__}", path)
    full = {**state, "format": FORMAT, "format_version": FORMAT_VERSION}
    _check_plain(full, "state")
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without executing code.

    Raises :class:`CheckpointError` (with the path) if the file is missing, unreadable, corrupt,
    contains anything but plain containers of tensors/numbers/strings, or is not a stableflows
    checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError("checkpoint file does not exist", p)
    if not p.is_file():
        raise CheckpointError("checkpoint path is not a file", p)
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError("corrupt or unreadable checkpoint: not a zip archive written by torch.save", p)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global / custom object
        raise CheckpointError(f"refused to load: the file holds objects other than tensors and plain "
                              f"containers (no code is executed from checkpoints): {_unpickler_reason(e)}", p) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise CheckpointError(f"corrupt or unreadable checkpoint: {_first_line(e)}", p) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a stableflows checkpoint (no '{FORMAT}' marker)", p)
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this stableflows "
                              f"(supports <= {FORMAT_VERSION})", p)
    return state


def _unpickler_reason(e: BaseException) -> str:
    """The one line of torch's weights-only error that names the refused global."""
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def resolve_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = ("best.pt", "last.pt")) -> Path:
    """A checkpoint file, or the first of ``prefer`` inside a run directory."""
    p = Path(path)
    if p.is_dir():
        for name in prefer:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run directory holds none of {', '.join(prefer)}", p)
    if not p.exists():
        raise CheckpointError("no such run directory or checkpoint file", p)
    return p
