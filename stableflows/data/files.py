"""Readers of local dataset files in their standard formats. Nothing is ever downloaded.

Each dataset's files are taken from the first of its folders that holds all of them
(``DIR`` is ``DataConfig.data_dir``, then the environment variables and a system package's folder
of :mod:`.locate`; ``DIR`` itself is searched last):

- ``mnist``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; in ``DIR/mnist``, ``DIR/MNIST/raw``, ``DIR``.
- ``fashion-mnist``: the same IDX names; in ``DIR/fashion-mnist``, ``DIR/FashionMNIST/raw``, ``DIR``.
- ``cifar10``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``; in ``DIR/cifar-10-batches-py``, ``DIR``.
- ``svhn``: ``train_32x32.mat``, ``test_32x32.mat``; in ``DIR/svhn``, ``DIR``.

All four are 8-bit images (``levels = 256``) returned as ``(N, C, H, W)`` integer levels with
labels 0..9 (SVHN's label 10 is digit 0).

Formats. IDX (LeCun et al.): two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions ``d``, ``d`` big-endian uint32 sizes, then the data in C order. CIFAR-10 batches are
pickled dicts ``{data: uint8 (N, 3072), labels: [int]}`` (each row: 1024 red, 1024 green, 1024
blue values, row-major 32x32), read with :func:`~.safe_pickle.restricted_load`. SVHN ``.mat``
files (MATLAB v5) hold ``X`` ``(32, 32, 3, N)`` uint8 and ``y`` ``(N, 1)`` in 1..10.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError, DatasetNotFound, UnsafePickleError
from .locate import locate
from .safe_pickle import restricted_load
from .splits import RawData

__all__ = ["read_idx", "load_mnist_raw", "load_cifar10_raw", "load_svhn_raw", "find_files", "IDX_DTYPES", "FILE_DATASETS"]

IMAGE_LEVELS = 256  # 8-bit images
N_CLASSES = 10
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_UBYTE = 0x08
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_HW = (28, 28)
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_SHAPE = (3, 32, 32)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
SVHN_HWC = (32, 32, 3)
SVHN_ZERO_LABEL = 10  # SVHN writes digit 0 as label 10

SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "."),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "."),
    "cifar10": ("cifar-10-batches-py", "."),
    "svhn": ("svhn", "."),
}
GZ_OK = {"mnist": True, "fashion-mnist": True, "cifar10": False, "svhn": False}


# ----------------------------------------------------------------------------- finding files
def find_files(dataset: str, data_dir: str | Path | None, names: tuple[str, ...]) -> dict[str, Path]:
    """Paths of ``names`` in the first folder that holds all of them: ``data_dir``, the environment
    variables, then a system package's folder, each with the sub-folders of :data:`SUBDIRS`
    (:func:`~.locate.locate`). Raises :class:`DatasetNotFound` naming every expected file, the
    folders searched, what each lacks and how to get the files.
    """
    return locate(dataset, data_dir, names, subdirs=SUBDIRS[dataset], gz=GZ_OK[dataset])


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"cannot read {path}: corrupt or truncated ({e})") from e


# ----------------------------------------------------------------------------- IDX
DEFLATE_MAX_RATIO = 1032  # deflate expands at most ~1032:1 (a 258-byte match per 2 bits), RFC 1951
GZ_SLACK = 1 << 16  # bytes allowed beyond that bound (headers, tiny files)


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    b = f.read(n)
    if len(b) < n:
        raise DatasetFormatError(f"{path}: truncated IDX {what} ({len(b)} bytes, need {n})")
    return b


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (optionally gzipped), checking the magic number and size.

    The header is read first; the data size it claims must fit the file (plain: exactly the bytes
    after the header; gzip: at most ``DEFLATE_MAX_RATIO`` times the compressed size), and at most
    that many bytes plus one are ever inflated, so a decompression bomb costs no more memory than
    the array its header announces.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise DatasetFormatError(f"{path}: not an IDX file (only {len(magic)} bytes)")
            zero, code, ndim = struct.unpack(">HBB", magic)
            if zero != 0 or code not in IDX_DTYPES or ndim == 0:
                raise DatasetFormatError(
                    f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000 then a type byte in "
                    f"{[hex(c) for c in IDX_DTYPES]} and a nonzero number of dimensions)"
                )
            header = 4 + 4 * ndim
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "header"))
            dtype = np.dtype(IDX_DTYPES[code])
            need = math.prod(dims) * dtype.itemsize
            if gz and need > DEFLATE_MAX_RATIO * size + GZ_SLACK:
                raise DatasetFormatError(f"{path}: the IDX header claims dims {dims} ({need} data bytes), more than "
                                         f"a {size}-byte gzip file can hold")
            if not gz and need > size - header:
                raise DatasetFormatError(f"{path}: truncated: dims {dims} need {need} data bytes, "
                                         f"found {size - header}")
            data = f.read(need + 1)  # one byte more reveals trailing data without inflating them all
    except DatasetFormatError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, OverflowError, MemoryError) as e:
        raise DatasetFormatError(f"cannot read {path}: corrupt or truncated ({type(e).__name__}: {e})") from e
    if len(data) != need:
        what, found = ("truncated", f"found {len(data)}") if len(data) < need else ("has trailing bytes", "found more")
        raise DatasetFormatError(f"{path}: {what}: dims {dims} need {need} data bytes, {found}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_images(path: Path) -> np.ndarray:
    a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != MNIST_HW:
        raise DatasetFormatError(f"{path}: expected unsigned-byte images (N, 28, 28), got {a.dtype} {a.shape}")
    return a[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)


def _idx_labels(path: Path, n: int, images: Path) -> np.ndarray:
    a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise DatasetFormatError(f"{path}: expected unsigned-byte labels (N,), got {a.dtype} {a.shape}")
    return _check_labels(a, n, path, images)


def _check_labels(y: np.ndarray, n: int, path: Path, images: Path) -> np.ndarray:
    if len(y) != n:
        raise DatasetFormatError(f"{path}: {len(y)} labels but {images} holds {n} images")
    if len(y) and (y.min() < 0 or y.max() >= N_CLASSES):
        raise DatasetFormatError(f"{path}: labels must lie in 0..{N_CLASSES - 1}, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def load_mnist_raw(data_dir: str | Path | None, dataset: str = "mnist") -> RawData:
    """MNIST or Fashion-MNIST (``dataset="fashion-mnist"``) from local IDX files."""
    p = find_files(dataset, data_dir, MNIST_FILES)
    tr_img, tr_lab, te_img, te_lab = (p[n] for n in MNIST_FILES)
    x_tr, x_te = _idx_images(tr_img), _idx_images(te_img)
    y_tr = _idx_labels(tr_lab, len(x_tr), tr_img)
    y_te = _idx_labels(te_lab, len(x_te), te_img)
    return RawData(x_tr, y_tr, x_te, y_te, IMAGE_LEVELS)


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = restricted_load(_read_bytes(path))
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except DatasetFormatError:
        raise
    except Exception as e:  # truncated or garbled pickle stream
        raise DatasetFormatError(f"{path}: not a readable CIFAR-10 batch pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise DatasetFormatError(f"{path}: the batch dict lacks 'data' or 'labels' (keys: {sorted(map(str, d))})")
    x, n_pix = d["data"], math.prod(CIFAR_SHAPE)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != n_pix:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 array (N, {n_pix}), got {desc}")
    labels = d["labels"]
    if not (isinstance(labels, np.ndarray) or (isinstance(labels, list) and all(type(v) is int for v in labels))):
        raise DatasetFormatError(f"{path}: 'labels' must be a list of ints")
    y = _check_labels(np.asarray(labels, dtype=np.int64), len(x), path, path)
    return x.reshape(len(x), *CIFAR_SHAPE), y  # (N, 3072) -> (N, 3, 32, 32), channel-major rows


def load_cifar10_raw(data_dir: str | Path | None) -> RawData:
    """CIFAR-10 from the python batches ``cifar-10-batches-py/{data_batch_1..5, test_batch}``."""
    p = find_files("cifar10", data_dir, CIFAR_FILES)
    train = [_cifar_batch(p[n]) for n in CIFAR_FILES[:-1]]
    x_te, y_te = _cifar_batch(p["test_batch"])
    x_tr = np.concatenate([b[0] for b in train])
    y_tr = np.concatenate([b[1] for b in train])
    return RawData(x_tr, y_tr, x_te, y_te, IMAGE_LEVELS)


# ----------------------------------------------------------------------------- SVHN
def _svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise DatasetFormatError(f"{path}: MATLAB v7.3 files are not supported; save as v5 ({e})") from e
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError... on garbage
        raise DatasetFormatError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from e
    if "X" not in m or "y" not in m:
        raise DatasetFormatError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in m if not k.startswith('__'))}")
    X, y = m["X"], np.asarray(m["y"])
    if X.ndim != 4 or X.shape[:3] != SVHN_HWC or X.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, N), got {X.dtype} {X.shape}")
    y = y.reshape(-1)
    if len(y) and (not np.all(y == np.round(y)) or y.min() < 1 or y.max() > SVHN_ZERO_LABEL):
        raise DatasetFormatError(f"{path}: 'y' must hold integer labels 1..10, found {y.min()}..{y.max()}")
    y = np.where(y == SVHN_ZERO_LABEL, 0, y)
    y = _check_labels(y.astype(np.int64), X.shape[3], path, path)
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)), y  # (H, W, C, N) -> (N, C, H, W)


def load_svhn_raw(data_dir: str | Path | None) -> RawData:
    """SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat``."""
    p = find_files("svhn", data_dir, SVHN_FILES)
    x_tr, y_tr = _svhn_mat(p["train_32x32.mat"])
    x_te, y_te = _svhn_mat(p["test_32x32.mat"])
    return RawData(x_tr, y_tr, x_te, y_te, IMAGE_LEVELS)


FILE_DATASETS = {
    "mnist": lambda d: load_mnist_raw(d, "mnist"),
    "fashion-mnist": lambda d: load_mnist_raw(d, "fashion-mnist"),
    "cifar10": load_cifar10_raw,
    "svhn": load_svhn_raw,
}
