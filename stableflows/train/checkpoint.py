"""Checkpoints: written atomically, loaded without executing code.

A checkpoint is a ``dict`` of plain containers (dict / list / tuple) holding tensors, numbers,
strings, booleans and None -- nothing else -- saved with :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``, which refuses any pickle that would construct an arbitrary
object (no ``__reduce__`` payload runs). The run configuration is stored as a plain dict
(:meth:`RunConfig.to_dict`) and restored with :meth:`RunConfig.from_dict`.

Atomicity: the bytes go to a temporary file in the target's directory, are flushed and fsync'ed,
and only then renamed over the target with :func:`os.replace` (atomic on POSIX and Windows). A kill
at any moment leaves either the previous checkpoint or the new one, never a torn file (the
temporary file it may leave, ``.NAME.XXXX.tmp``, is removed by the next run in that directory).
Files get the permissions of ``open()``: ``0o666`` less the user's umask.

Integrity (format version 2): the checkpoint stores a SHA-256 digest of every tensor's bytes
(with its dtype and shape) and one of the whole state (keys, numbers, strings and the tensor
digests), under ``"checksum"``. :func:`load_checkpoint` checks the zip CRCs (which PyTorch itself
does not) and both digests, and names the damaged tensor. Version-1 checkpoints (no digests) still
load, with an :class:`UnverifiedCheckpointWarning`. Every failure to load is a
:class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..transforms.base import StableflowsError

__all__ = [
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "resolve_checkpoint",
    "state_digest",
    "require",
]

FORMAT = "stableflows-checkpoint"  # marker stored in every checkpoint
FORMAT_VERSION = 2  # 2: "checksum" entry (tensor and state digests); 1: none (loads with a warning)
CHECKSUM_KEY = "checksum"
DIGEST = "sha256"
_PLAIN_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(StableflowsError, RuntimeError):
    """A checkpoint is missing, corrupt, not a stableflows checkpoint, or holds non-plain objects."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message if path is None else f"{message} [{path}]")
        self.reason = message  # without the path
        self.path = None if path is None else Path(path)


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of an older format without checksums was loaded without verification."""


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
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    The file gets mode ``0o666 & ~umask`` (what ``open()`` gives), not mkstemp's ``0o600``. On any
    failure (disk full, ...) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask sets it too)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = hashlib.new(DIGEST)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_digest(state: Any) -> tuple[str, dict[str, str]]:
    """``(digest of the whole state, {tensor path: digest})``; paths as ``model.layer.weight``."""
    tensors: dict[str, str] = {}
    h = hashlib.new(DIGEST)

    def feed(obj: Any, where: str) -> None:
        if torch.is_tensor(obj):
            tensors[where] = d = _tensor_digest(obj)
            h.update(b"T" + d.encode())
        elif isinstance(obj, dict):
            h.update(b"D%d" % len(obj))
            for k, v in obj.items():
                h.update(b"K" + repr(k).encode())
                feed(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, (list, tuple)):
            h.update((b"L" if isinstance(obj, list) else b"U") + b"%d" % len(obj))
            for i, v in enumerate(obj):
                feed(v, f"{where}[{i}]")
        else:  # plain scalar: type and exact repr (float repr round-trips)
            h.update(b"S" + type(obj).__name__.encode() + b":" + repr(obj).encode())

    feed(state, "")
    return h.hexdigest(), tensors


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save ``state`` (plain containers only) atomically to ``path``; returns the path.

    The format marker, version and checksums are added to the stored dict.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"a checkpoint state must be a dict, got {type(state).__name__}", path)
    full = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    full.update(format=FORMAT, format_version=FORMAT_VERSION)
    _check_plain(full, "state")
    whole, tensors = state_digest(full)
    full[CHECKSUM_KEY] = {"algorithm": DIGEST, "state": whole, "tensors": tensors}
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without executing code.

    Raises :class:`CheckpointError` (with the path) if the file is missing, unreadable, corrupt or
    damaged (zip CRC or checksum mismatch), contains anything but plain containers of
    tensors/numbers/strings, or is not a stableflows checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError("checkpoint file does not exist", p)
    if not p.is_file():
        raise CheckpointError("checkpoint path is not a file", p)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint: {e.strerror or e}", p) from e
    _check_zip(data, p)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global / custom object
        raise CheckpointError(f"refused to load: the file holds objects other than tensors and plain "
                              f"containers (no code is executed from checkpoints): {_unpickler_reason(e)}", p) from e
    except MemoryError as e:
        raise CheckpointError("corrupt checkpoint: it asks for more memory than there is", p) from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged archive makes torch raise
        raise CheckpointError(f"corrupt or unreadable checkpoint: {type(e).__name__}: {_first_line(e)}", p) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a stableflows checkpoint (no '{FORMAT}' marker)", p)
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint format version {version!r} is not valid", p)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this stableflows "
                              f"(supports <= {FORMAT_VERSION})", p)
    if version >= 2:
        _verify(state, p)
    else:
        warnings.warn(f"{p}: checkpoint of format version {version} (an older stableflows) has no checksums; "
                      "loaded without verifying its contents", UnverifiedCheckpointWarning, stacklevel=2)
    return state


def _check_zip(data: bytes, p: Path) -> None:
    """The archive opens and every member matches its CRC-32 (torch.load ignores the CRCs)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001 - BadZipFile, struct.error, OverflowError, zlib.error ...
        raise CheckpointError(f"corrupt or unreadable checkpoint: not a readable zip archive written by "
                              f"torch.save ({type(e).__name__}: {_first_line(e)})", p) from e
    if bad is not None:
        raise CheckpointError(f"damaged checkpoint: member {bad} does not match its CRC-32", p)


def _verify(state: dict[str, Any], p: Path) -> None:
    """Recompute the digests stored by :func:`save_checkpoint`; name what differs."""
    stored = state.pop(CHECKSUM_KEY, None)
    if not (isinstance(stored, dict) and isinstance(stored.get("state"), str)
            and isinstance(stored.get("tensors"), dict) and stored.get("algorithm") == DIGEST):
        raise CheckpointError("damaged checkpoint: its checksum entry is missing or malformed", p)
    whole, tensors = state_digest(state)
    if whole == stored["state"]:
        return
    bad = [k for k, d in tensors.items() if stored["tensors"].get(k) != d]
    what = (f"tensor {bad[0]}" + (f" and {len(bad) - 1} more do" if len(bad) > 1 else " does")
            if bad else "its non-tensor entries (numbers, strings, structure) do")
    raise CheckpointError(f"damaged checkpoint: {what} not match the stored checksum", p)


def require(state: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str | os.PathLike | None,
            what: str = "checkpoint") -> Any:
    """``state[key]`` if it exists with type ``kind``, else a :class:`CheckpointError` naming the entry."""
    if not isinstance(state, dict) or key not in state:
        raise CheckpointError(f"{what} has no '{key}' entry", path)
    value = state[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{what} entry '{key}' is a {type(value).__name__}, expected {names}", path)
    return value


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
