"""The run directory of a training: one owner at a time, nothing of an earlier run lost.

:func:`open_run_dir` is called once set-up has passed every check and before the first step:

1. create the directory (a path that is a file, lies below a file, or sits on a read-only or full
   file system is refused in one line) and take an exclusive lock on ``OUT/.lock``
   (:func:`fcntl.flock`: the kernel drops it when the process dies, so the lock of a killed run
   is never stale); a second training of the same directory is refused while the first runs;
2. remove the temporary files (``.NAME.*.tmp``) that a kill during an atomic write left behind,
   and finish an interrupted ``--overwrite`` (below);
3. refuse a directory that holds anything (hidden files aside) unless the run resumes it, or
   ``overwrite`` is given *and* it holds a stableflows run (a folder of other files is never
   overwritten);
4. write and remove a probe file (the file system takes writes).

``overwrite`` does not delete the earlier run: its files move into ``OUT/.replaced/`` and are deleted
only once the new run has written its first checkpoint (:meth:`RunDir.committed`). If the new run
fails before that, the earlier files move back (:meth:`RunDir.close`); if it is killed, the next
start in that directory moves them back (no ``last.pt`` of the new run) or deletes them (there is one).
"""
from __future__ import annotations

import datetime as _dt
import errno
import os
import re
import shutil
import socket
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..transforms.base import StableflowsError

__all__ = ["RunDirError", "RunWriteError", "RunDir", "open_run_dir", "recover", "default_out_dir", "check_reusable",
           "LOCK_NAME", "REPLACED_NAME", "RUN_MARKERS", "stale_temporaries"]

LOCK_NAME = ".lock"
REPLACED_NAME = ".replaced"  # the earlier run, while an --overwrite run has no checkpoint yet
PROBE_NAME = ".write-probe"
RUN_MARKERS = ("last.pt", "best.pt", "metrics.jsonl", "metrics.json", "config.yaml")  # a stableflows run holds one
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # checkpoint.atomic_write_bytes: .NAME.XXXXXXXX.tmp
DEFAULT_ROOT = "runs"


class RunDirError(ConfigError):
    """The run directory cannot be used: not creatable or writable, in use, or holding another run."""


class RunWriteError(StableflowsError, OSError):
    """A write into the run directory failed during training (disk full, file system gone read-only...)."""


def default_out_dir(cfg: RunConfig, root: str | os.PathLike = DEFAULT_ROOT,
                    now: _dt.datetime | None = None) -> Path:
    """``runs/<model>-<data>-<UTC time>`` (``-2``, ``-3`` ... appended if that exists): unique per run."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stem = f"{cfg.model.model}-{cfg.data.name}-{now:%Y%m%dT%H%M%SZ}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    base = Path(root) / stem
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{stem}-{i}")
    return path


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.XXXX.tmp``) directly in ``out``."""
    try:
        return sorted(p for p in out.iterdir() if _TMP.match(p.name) and p.is_file())
    except OSError:
        return []


def _entries(out: Path) -> list[str]:
    """What ``out`` holds besides hidden files (the lock, stale temporaries, ``.DS_Store`` ...)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _holds_run(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS)


def check_reusable(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (a fresh run) unless ``overwrite`` and it holds a stableflows run.

    Called once early (before the data are loaded, so the refusal is quick) and again under the lock.
    """
    out = Path(out)
    if not out.is_dir():
        return
    try:
        names = _entries(out)
    except OSError as e:
        raise RunDirError(f"cannot read run directory {out}: {e.strerror or e}") from e
    if not names:
        return
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    if not _holds_run(out):
        raise RunDirError(f"out-dir {out} is not empty and holds no stableflows run ({shown}); "
                          "choose another --out-dir (it is never overwritten)")
    if not overwrite:
        raise RunDirError(f"out-dir {out} holds an earlier run ({shown}); continue it with --resume, "
                          "replace it with --overwrite (kept until the new run's first checkpoint), "
                          "or choose another --out-dir")


def _one_line(e: OSError) -> str:
    return e.strerror or str(e)


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # out (or a parent) exists and is not a directory
        raise RunDirError(f"out-dir {out} cannot be created: {e.filename or out} exists and is not a directory") from e
    except NotADirectoryError as e:
        parent = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        raise RunDirError(f"out-dir {out} lies below a file ({parent or e.filename} is not a directory)") from e
    except OSError as e:
        raise RunDirError(f"out-dir {out} cannot be created: {_one_line(e)}") from e
    if not out.is_dir():
        raise RunDirError(f"out-dir {out} exists and is not a directory")


class _Lock:
    """An exclusive, non-blocking lock on ``OUT/.lock``, holding the owner's pid and host for messages."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunDirError(f"out-dir {self.path.parent} is not writable: cannot create {self.path.name}: "
                              f"{_one_line(e)}") from e
        try:
            _lock_fd(fd)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"out-dir {self.path.parent} is in use by another training{owner}; wait for it to "
                              "end or choose another --out-dir") from None
        except OSError as e:  # e.g. a file system without locks: proceed without one
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise RunDirError(f"cannot lock out-dir {self.path.parent}: {_one_line(e)}") from e
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:  # the owner line is only for messages
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            _unlock_fd(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, _, host = os.read(fd, 200).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return ""
    return f" (pid {pid}{' on ' + host if host else ''})" if pid.isdigit() else ""


try:  # POSIX
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock_fd(fd: int) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            raise BlockingIOError(str(e)) from e

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class RunDir:
    """An opened run directory (see the module docstring); :meth:`close` on every exit path."""

    def __init__(self, path: Path, lock: _Lock, replaced: bool, notes: list[str]):
        self.path, self._lock, self.notes = path, lock, notes
        self._replaced = replaced  # an earlier run waits in .replaced/ for our first checkpoint

    def committed(self) -> None:
        """The new run wrote its first checkpoint: the replaced run may go."""
        if self._replaced:
            shutil.rmtree(self.path / REPLACED_NAME, ignore_errors=True)
            self._replaced = False

    def close(self) -> None:
        """Release the lock; bring the replaced run back if ours never wrote a checkpoint."""
        try:
            if self._replaced:
                _restore(self.path)
                self._replaced = False
        finally:
            self._lock.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _restore(out: Path) -> None:
    """Put the files of ``.replaced/`` back, dropping what the replacing run left (it has no checkpoint)."""
    keep = out / REPLACED_NAME
    for p in out.iterdir():
        if p.name in (LOCK_NAME, REPLACED_NAME):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in keep.iterdir():
        os.replace(p, out / p.name)
    keep.rmdir()


def _move_aside(out: Path, names: list[str]) -> None:
    """Move ``names`` into ``.replaced/``, all or none (renames within one file system)."""
    keep = out / REPLACED_NAME
    keep.mkdir()
    moved = []
    try:
        for name in names:
            os.replace(out / name, keep / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            os.replace(keep / name, out / name)
        keep.rmdir()
        raise


def _finish_replacement(out: Path, notes: list[str]) -> None:
    """An earlier ``--overwrite`` was killed: keep the new run if it checkpointed, else restore the old."""
    keep = out / REPLACED_NAME
    if not keep.is_dir():
        return
    if (out / "last.pt").is_file():
        shutil.rmtree(keep, ignore_errors=True)
        notes.append(f"removed the run that an --overwrite run replaced in {out} (it had written its first checkpoint)")
    else:
        _restore(out)
        notes.append(f"restored the earlier run in {out}: the --overwrite run that replaced it stopped before "
                     "its first checkpoint")


def recover(out: str | os.PathLike) -> list[str]:
    """Finish an ``--overwrite`` that was killed (under the lock), before ``out`` is read for a resume."""
    out = Path(out)
    if not (out / REPLACED_NAME).is_dir():
        return []
    lock = _Lock(out / LOCK_NAME)
    lock.acquire()
    notes: list[str] = []
    try:
        _finish_replacement(out, notes)
    finally:
        lock.release()
    return notes


def _probe(out: Path) -> None:
    probe = out / PROBE_NAME
    try:
        with open(probe, "wb") as f:
            f.write(b"stableflows write probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(f"out-dir {out} is not writable: {_one_line(e)}") from e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def open_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunDir:
    """Create, lock, clean, check and probe ``out`` (module docstring); raises :class:`RunDirError`."""
    out = Path(out)
    _make_dir(out)
    lock = _Lock(out / LOCK_NAME)
    lock.acquire()
    notes: list[str] = []
    try:
        for tmp in stale_temporaries(out):
            tmp.unlink(missing_ok=True)
            notes.append(f"removed {tmp.name}, left by a write that was interrupted")
        _finish_replacement(out, notes)
        _probe(out)
        replaced = False
        if not resume:
            check_reusable(out, overwrite=overwrite)
            names = _entries(out)
            if names:  # overwrite: move the earlier run aside until our first checkpoint
                _move_aside(out, names)
                replaced = True
    except OSError as e:
        lock.release()
        raise RunDirError(f"cannot prepare out-dir {out}: {_one_line(e)}") from e
    except BaseException:
        lock.release()
        raise
    return RunDir(out, lock, replaced, notes)
