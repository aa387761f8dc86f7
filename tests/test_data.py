"""stableflows.data: digits split, toys, local-file readers (IDX, CIFAR-10, SVHN), errors.

Every file is written here independently of the readers (struct / gzip / pickle / scipy.io).
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from stableflows.config import ConfigError, DataConfig
from stableflows.data import (
    TOYS,
    DatasetFormatError,
    DatasetNotFound,
    Splits,
    UnsafePickleError,
    carve_validation,
    load_dataset,
    read_idx,
    restricted_load,
    sample_toy,
)
from stableflows.transforms.base import StableflowsError

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DataConfig(name="digits", val_size=0.1), seed=0)


@pytest.fixture(scope="module")
def sk_split():
    d = load_digits()
    idx = np.arange(len(d.target))
    i_tr, i_te = train_test_split(idx, test_size=360, random_state=0, stratify=d.target)
    return d.data, d.target, i_tr, i_te


def test_digits_reproduces_sklearn_split(digits, sk_split):
    X, y, i_tr, i_te = sk_split
    assert len(i_tr) == 1437 and len(i_te) == 360
    assert len(digits.train) + len(digits.val) == 1437 and len(digits.test) == 360
    assert digits.shape == (1, 8, 8) and digits.levels == 17 and digits.name == "digits"
    assert digits.train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    np.testing.assert_array_equal(digits.test.numpy().reshape(360, 64), X[i_te])
    np.testing.assert_array_equal(digits.y_test.numpy(), y[i_te])
    tr, va = digits.train_index.numpy(), digits.val_index.numpy()
    np.testing.assert_array_equal(digits.train.numpy().reshape(-1, 64), X[i_tr[tr]])
    np.testing.assert_array_equal(digits.val.numpy().reshape(-1, 64), X[i_tr[va]])
    np.testing.assert_array_equal(digits.y_val.numpy(), y[i_tr[va]])
    # val and train partition the original training split; val never touches test
    assert len(np.intersect1d(tr, va)) == 0 and np.array_equal(np.sort(np.r_[tr, va]), np.arange(1437))
    assert len(np.intersect1d(i_tr[va], i_te)) == 0
    assert len(digits.val) == math.ceil(0.1 * 1437)
    # integer levels 0..16
    assert float(digits.train.min()) == 0 and float(digits.train.max()) == 16
    assert torch.equal(digits.train, digits.train.round())


def test_digits_validation_is_stratified(digits, sk_split):
    _, y, i_tr, _ = sk_split
    y_pool = y[i_tr]
    n_val = len(digits.val)
    for c in range(10):
        expected = n_val * np.mean(y_pool == c)
        assert abs(int((digits.y_val == c).sum()) - expected) <= 1.0


def test_validation_deterministic_in_seed(digits):
    again = load_dataset(DataConfig(name="digits"), seed=0)
    other = load_dataset(DataConfig(name="digits"), seed=1)
    assert torch.equal(again.val_index, digits.val_index) and torch.equal(again.val, digits.val)
    assert not torch.equal(other.val_index, digits.val_index)
    assert torch.equal(other.test, digits.test)  # the test split never depends on the seed


def test_flatten_and_val_size_zero(digits):
    flat = load_dataset(DataConfig(name="digits", flatten=True))
    assert flat.shape == (64,) and flat.train.shape == (len(digits.train), 64)
    assert torch.equal(flat.train, digits.train.reshape(-1, 64))
    none = load_dataset(DataConfig(name="digits", val_size=0.0))
    assert len(none.val) == 0 and none.val.shape == (0, 1, 8, 8) and len(none.train) == 1437


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_val_size(bad):
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset(DataConfig(name="digits", val_size=bad))


def test_unknown_dataset_lists_names():
    with pytest.raises(ConfigError) as e:
        load_dataset(DataConfig(name="imagenet"))
    for name in ("digits", "moons", "checkerboard", "mnist", "fashion-mnist", "cifar10", "svhn"):
        assert name in str(e.value)


def test_carve_validation_partition_and_fallback():
    y = np.repeat(np.arange(4), [40, 30, 20, 10])
    tr, va = carve_validation(100, 0.2, y, seed=5)
    assert len(va) == 20 and np.array_equal(np.sort(np.r_[tr, va]), np.arange(100))
    np.testing.assert_array_equal(np.bincount(y[va], minlength=4), [8, 6, 4, 2])  # exact proportions
    y_rare = np.r_[np.zeros(19, int), 1]  # a class with a single example cannot be stratified
    tr, va = carve_validation(20, 0.25, y_rare, seed=0)
    assert len(va) == 5 and len(np.intersect1d(tr, va)) == 0 and len(tr) == 15
    tr2, va2 = carve_validation(20, 0.25, None, seed=0)
    assert np.array_equal(va, va2)  # the fallback is the plain random split
    with pytest.raises(ConfigError, match="no training"):
        carve_validation(1, 0.5, None, seed=0)


# ----------------------------------------------------------------------------- toys
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_splits(name):
    s = load_dataset(DataConfig(name=name, n_toy=1000, val_size=0.2), seed=3)
    assert s.levels is None and s.shape == (2,) and s.name == name
    assert s.train.shape == (800, 2) and s.val.shape == (200, 2) and s.test.shape == (1000, 2)
    assert s.train.dtype == torch.float32 and bool(torch.isfinite(s.train).all())
    again = load_dataset(DataConfig(name=name, n_toy=1000, val_size=0.2), seed=3)
    other = load_dataset(DataConfig(name=name, n_toy=1000, val_size=0.2), seed=4)
    assert torch.equal(again.train, s.train) and torch.equal(again.test, s.test)
    assert not torch.equal(other.train, s.train)
    pool = torch.cat([s.train, s.val])
    assert not torch.isin(s.test[:, 0], pool[:, 0]).any()  # the test points come from another stream


def test_checkerboard_support_and_balance():
    x, _ = sample_toy("checkerboard", 40000, seed=0)
    assert x.min() >= -4 and x.max() <= 4
    col, row = np.floor((x[:, 0] + 4) / 2).astype(int), np.floor((x[:, 1] + 4) / 2).astype(int)
    assert np.all((col + row) % 2 == 0)  # only the alternating squares of side 2
    counts = np.bincount(col * 4 + row, minlength=16)[(np.add.outer(np.arange(4), np.arange(4)) % 2 == 0).ravel()]
    assert len(counts) == 8 and np.all(np.abs(counts / 40000 - 1 / 8) < 0.01)
    # uniform within a square: the mean position inside squares is their centre
    frac = (x + 4) / 2 - np.floor((x + 4) / 2)
    np.testing.assert_allclose(frac.mean(0), [0.5, 0.5], atol=0.01)


def test_8gaussians_modes():
    x, y = sample_toy("8gaussians", 16000, seed=1)
    angles = np.arange(8) * np.pi / 4
    centres = 2 * math.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], 1)
    nearest = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == y) > 0.99
    resid = x - centres[y]
    np.testing.assert_allclose(resid.std(0), [0.5 / math.sqrt(2)] * 2, rtol=0.05)
    np.testing.assert_allclose(np.bincount(y, minlength=8) / 16000, [1 / 8] * 8, atol=0.015)


@pytest.mark.parametrize("name,radii,noise", [("rings", (0.75, 1.5, 2.25, 3.0), 0.08), ("circles", (3.0, 1.5), 0.24)])
def test_ring_radii(name, radii, noise):
    x, y = sample_toy(name, 20000, seed=2)
    r = np.linalg.norm(x, axis=1)
    for k, rad in enumerate(radii):
        assert abs(np.median(r[y == k]) - rad) < 0.02
        assert abs(np.std(r[y == k]) - noise) < 0.2 * noise


def test_moons_halves():
    x, y = sample_toy("moons", 20000, seed=0)
    p = (x - np.array([-1.0, -0.2])) / 2  # back to the unit half circles
    upper, lower = p[y == 0], p[y == 1] - np.array([1.0, 0.5])
    for pts, sign in ((upper, 1), (lower, -1)):
        assert abs(np.median(np.linalg.norm(pts, axis=1)) - 1) < 0.02
        assert np.mean(sign * pts[:, 1] > -0.2) > 0.95


def test_pinwheel_fivefold_symmetry():
    x, y = sample_toy("pinwheel", 25000, seed=0)
    arm0 = x[y == 0]
    for k in range(1, 5):
        a = -2 * np.pi * k / 5
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        armk = x[y == k] @ rot.T  # rotate arm k back onto arm 0
        np.testing.assert_allclose(armk.mean(0), arm0.mean(0), atol=0.05)
        np.testing.assert_allclose(np.cov(armk.T), np.cov(arm0.T), atol=0.08)


def test_bad_toy_size():
    with pytest.raises(ConfigError):
        sample_toy("moons", 0)
    with pytest.raises(ConfigError, match="known"):
        sample_toy("spirals", 10)


# ----------------------------------------------------------------------------- IDX / MNIST
def _idx_bytes(a: np.ndarray, code: int = 0x08, fmt: str = "B") -> bytes:
    head = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + struct.pack(f">{a.size}{fmt}", *a.ravel().tolist())


def _write_mnist(directory, rng, n_train=24, n_test=7, gz=False, skip=()):
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        MNIST_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28)),
        MNIST_NAMES[1]: np.repeat(np.arange(10), 3)[:n_train],
        MNIST_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28)),
        MNIST_NAMES[3]: rng.integers(0, 10, n_test),
    }
    for name, a in data.items():
        if name in skip:
            continue
        raw = _idx_bytes(a)
        (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return data


def test_idx_round_trip_mnist(tmp_path):
    data = _write_mnist(tmp_path / "mnist", np.random.default_rng(0))
    s = load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path), val_size=0.25), seed=0)
    assert s.levels == 256 and s.shape == (1, 28, 28) and s.name == "mnist"
    np.testing.assert_array_equal(s.test.numpy()[:, 0], data[MNIST_NAMES[2]])
    np.testing.assert_array_equal(s.y_test.numpy(), data[MNIST_NAMES[3]])
    tr, va = s.train_index.numpy(), s.val_index.numpy()
    np.testing.assert_array_equal(s.train.numpy()[:, 0], data[MNIST_NAMES[0]][tr])
    np.testing.assert_array_equal(s.val.numpy()[:, 0], data[MNIST_NAMES[0]][va])
    np.testing.assert_array_equal(s.y_train.numpy(), data[MNIST_NAMES[1]][tr])
    assert len(va) == 6


def test_idx_gz_equals_plain_and_torchvision_layout(tmp_path):
    _write_mnist(tmp_path / "plain" / "fashion-mnist", np.random.default_rng(1))
    _write_mnist(tmp_path / "gz" / "FashionMNIST" / "raw", np.random.default_rng(1), gz=True)
    a = load_dataset(DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "plain")))
    b = load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path / "gz")))
    assert b.name == "fashion-mnist"
    for f in ("train", "val", "test", "y_train", "y_val", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))


def test_read_idx_other_dtypes(tmp_path):
    a = np.arange(-6, 6).reshape(3, 4)
    p = tmp_path / "shorts.idx"
    p.write_bytes(_idx_bytes(a, code=0x0B, fmt="h"))
    out = read_idx(p)
    assert out.dtype == np.int16 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, a)
    f = np.linspace(-1, 1, 5)
    p.write_bytes(_idx_bytes(f, code=0x0E, fmt="d"))
    np.testing.assert_array_equal(read_idx(p), f)


def test_idx_bad_inputs(tmp_path):
    p = tmp_path / "x"
    good = _idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    for blob, msg in [
        (b"\x01\x02" + good[2:], "magic"),
        (good[:2] + b"\x07" + good[3:], "magic"),
        (good[:-1], "truncated"),
        (good + b"\x00", "trailing"),
        (good[:10], "truncated IDX header"),
        (b"\x00", "not an IDX"),
    ]:
        p.write_bytes(blob)
        with pytest.raises(DatasetFormatError, match=msg) as e:
            read_idx(p)
        assert str(p) in str(e.value)


def _mnist_error(tmp_path, mutate, match):
    d = tmp_path / "mnist"
    _write_mnist(d, np.random.default_rng(2))
    mutate(d)
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
    return str(e.value)


def test_mnist_shape_and_label_errors(tmp_path):
    def wrong_hw(d):
        (d / MNIST_NAMES[2]).write_bytes(_idx_bytes(np.zeros((7, 14, 14), dtype=np.uint8)))

    def images_as_labels(d):
        (d / MNIST_NAMES[2]).write_bytes(_idx_bytes(np.zeros(7, dtype=np.uint8)))

    def label_count(d):
        (d / MNIST_NAMES[1]).write_bytes(_idx_bytes(np.zeros(23, dtype=np.uint8)))

    def label_range(d):
        (d / MNIST_NAMES[3]).write_bytes(_idx_bytes(np.full(7, 10, dtype=np.uint8)))

    assert MNIST_NAMES[2] in _mnist_error(tmp_path / "a", wrong_hw, r"\(N, 28, 28\)")
    assert MNIST_NAMES[2] in _mnist_error(tmp_path / "b", images_as_labels, "images")
    assert "23 labels" in _mnist_error(tmp_path / "c", label_count, MNIST_NAMES[1])
    assert MNIST_NAMES[3] in _mnist_error(tmp_path / "d", label_range, "0..9")


def test_corrupt_and_truncated_gzip(tmp_path):
    d = tmp_path / "mnist"
    _write_mnist(d, np.random.default_rng(3), gz=True)
    gz = d / (MNIST_NAMES[0] + ".gz")
    full = gz.read_bytes()
    for blob in (full[: len(full) // 2], b"not a gzip stream at all"):
        gz.write_bytes(blob)
        with pytest.raises(DatasetFormatError) as e:
            load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
        assert str(gz) in str(e.value)


def _peak_bytes(fn) -> int:
    """Peak Python-heap allocation (tracemalloc) while ``fn`` runs; its exception is swallowed."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except StableflowsError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_decompression_bomb_is_refused_without_inflating_it(tmp_path):
    """A gzip that expands to 64 MiB behind a header announcing 10 images (7840 bytes) is refused
    after inflating at most the announced size; a header announcing more than any gzip of that
    size can hold (deflate expands at most 1032:1) is refused before inflating anything."""
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    head = struct.pack(">BBBB3I", 0, 0, 0x08, 3, 10, 28, 28)
    bomb.write_bytes(gzip.compress(head + bytes(64 << 20), compresslevel=1))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DatasetFormatError, match="trailing bytes"):
        read_idx(bomb)
    assert _peak_bytes(lambda: read_idx(bomb)) < 4 << 20  # the 64 MiB are never held
    huge = tmp_path / "huge-idx3-ubyte.gz"
    huge.write_bytes(gzip.compress(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 60000, 2800, 2800) + bytes(1000)))
    with pytest.raises(DatasetFormatError, match="more than a .*-byte gzip file can hold"):
        read_idx(huge)
    assert _peak_bytes(lambda: read_idx(huge)) < 1 << 20
    plain = tmp_path / "claims-idx3-ubyte"
    plain.write_bytes(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 60000, 28, 28) + bytes(100))
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(plain)


def test_missing_files_named(tmp_path):
    _write_mnist(tmp_path / "mnist", np.random.default_rng(4), skip=(MNIST_NAMES[3],))
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, StableflowsError)
    for name in MNIST_NAMES:
        assert name in msg
    assert str(tmp_path / "mnist") in msg and "lacks t10k-labels-idx1-ubyte" in msg and "download" in msg
    for name in ("cifar10", "svhn"):
        with pytest.raises(DatasetNotFound, match="never downloads") as e:
            load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
        expected = ("data_batch_1", "data_batch_5", "test_batch") if name == "cifar10" else ("train_32x32.mat", "test_32x32.mat")
        assert all(f in str(e.value) for f in expected)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DatasetNotFound, match="no data_dir"):
        load_dataset(DataConfig(name="mnist"))
    with pytest.raises(DatasetNotFound, match="does not exist") as e:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in str(e.value)


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_batch(rng, n, protocol=2, byte_keys=True):
    data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    d = {"batch_label": "training batch", "labels": labels, "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
    if byte_keys:  # as the original Python 2 pickles read with encoding="bytes"
        d = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in d.items()}
    return pickle.dumps(d, protocol=protocol), data, labels


def _write_cifar(directory, rng, protocol=2, byte_keys=True):
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        blob, data, labels = _cifar_batch(rng, 3 + i, protocol, byte_keys)
        (directory / name).write_bytes(blob)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("protocol,byte_keys", [(2, True), (4, False), (5, True)])
def test_cifar_batches(tmp_path, protocol, byte_keys):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(5), protocol, byte_keys)
    s = load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), val_size=0.0))
    assert s.shape == (3, 32, 32) and s.levels == 256
    data = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert len(s.train) == len(data) == 3 + 4 + 5 + 6 + 7
    np.testing.assert_array_equal(s.y_train.numpy(), labels)
    # CIFAR rows: 1024 red, then green, then blue values, each a 32x32 image in row-major order
    rng = np.random.default_rng(0)
    for _ in range(50):
        i, c, h, w = rng.integers(len(data)), rng.integers(3), rng.integers(32), rng.integers(32)
        assert s.train[i, c, h, w].item() == data[i, c * 1024 + h * 32 + w]
    te_data, te_labels = written["test_batch"]
    np.testing.assert_array_equal(s.test.numpy().reshape(len(te_data), -1), te_data)
    np.testing.assert_array_equal(s.y_test.numpy(), te_labels)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    assert "system" in "".join(str(arg) for _, arg, _ in pickletools.genops(blob))  # it would run os.system
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_load(blob)
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d, np.random.default_rng(6))
    (d / "data_batch_3").write_bytes(blob)
    with pytest.raises(UnsafePickleError) as e:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    assert "data_batch_3" in str(e.value) and isinstance(e.value, DatasetFormatError)
    assert not marker.exists()


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    "fn,args",
    [(np.load, ("x.npy",)), (eval, ("1+1",)), (__import__("codecs").encode, ("abc", "rot13")), (getattr, ("abc", "upper"))],
)
def test_restricted_unpickler_refuses_other_globals(fn, args):
    with pytest.raises(UnsafePickleError):
        restricted_load(pickle.dumps(_Reduce(fn, args), protocol=2))


def test_restricted_unpickler_plain_values():
    obj = {b"a": [1, 2, b"x", "s", 2.5], "b": np.arange(5, dtype=np.int16), "c": b""}
    out = restricted_load(pickle.dumps(obj, protocol=2))
    assert out[b"a"] == [1, 2, b"x", "s", 2.5] and out["c"] == b""
    np.testing.assert_array_equal(out["b"], np.arange(5))


class _Stub:
    """Pickles as ``fn(*args)`` with an optional BUILD ``state``: hand-made array constructions."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


_RECON = np.ndarray.__reduce__(np.zeros(1))[0]
N_FAKE = 12000  # 12000 x 3072 bytes = 35 MiB that are not in the file


@pytest.mark.parametrize("payload", [
    _Stub(np.ndarray, ((N_FAKE, 3072), "u1")),  # numpy.ndarray(shape): an allocation from nothing
    _Stub(_RECON, (np.ndarray, (N_FAKE, 3072), b"B")),  # _reconstruct with the full shape, no data
    _Stub(_RECON, (np.ndarray, (0,), b"b"), (1, (N_FAKE, 3072), np.dtype("u1"), False,
                                              _Stub(bytes, (N_FAKE * 3072,)))),  # bytes(n): zeros not stored
    np.array([1, "a", None], dtype=object),  # an object array
], ids=["ndarray-call", "reconstruct-shape", "bytes-n", "object-dtype"])
def test_pickles_that_build_arrays_from_no_stored_data_are_refused(tmp_path, payload):
    blob = pickle.dumps({b"data": payload, b"labels": [0] * N_FAKE}, protocol=2)
    assert len(blob) < 64 << 10  # a small file ...
    with pytest.raises(UnsafePickleError):
        restricted_load(blob)
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d, np.random.default_rng(8))
    (d / "data_batch_1").write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="data_batch_1"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    assert _peak_bytes(lambda: restricted_load(blob)) < 4 << 20  # ... that never becomes 35 MiB


def test_arrays_of_stored_bytes_still_load():
    a = np.arange(3072 * 2, dtype=np.uint16).reshape(2, 3072).astype(np.uint8)
    for proto in (2, 3, 4, 5):
        out = restricted_load(pickle.dumps({b"data": a, b"t": a[:, ::2], b"e": a[:0]}, protocol=proto))
        np.testing.assert_array_equal(out[b"data"], a)
        np.testing.assert_array_equal(out[b"t"], a[:, ::2])  # not contiguous: _reconstruct + BUILD at any protocol
        assert out[b"e"].shape == (0, 3072)


def test_cifar_bad_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d, np.random.default_rng(7))
    cases = [
        (pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, protocol=2), r"\(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, protocol=2), "3 labels"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, protocol=2), "uint8"),
        (pickle.dumps([1, 2], protocol=2), "dict"),
        ((d / "data_batch_2").read_bytes()[:500], "not a readable"),
    ]
    for blob, msg in cases:
        (d / "test_batch").write_bytes(blob)
        with pytest.raises(DatasetFormatError, match=msg) as e:
            load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
        assert "test_batch" in str(e.value)


# ----------------------------------------------------------------------------- SVHN
def _write_svhn(directory, rng, n_train=12, n_test=5):
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, 10 = digit 0
        scipy.io.savemat(directory / name, {"X": X, "y": y})
        out[name] = (X, y)
    return out


def test_svhn_mat(tmp_path):
    written = _write_svhn(tmp_path / "svhn", np.random.default_rng(8))
    s = load_dataset(DataConfig(name="svhn", data_dir=str(tmp_path), val_size=0.0))
    assert s.shape == (3, 32, 32) and s.levels == 256
    for split, y_split, name in ((s.train, s.y_train, "train_32x32.mat"), (s.test, s.y_test, "test_32x32.mat")):
        X, y = written[name]
        expected_y = np.where(y[:, 0] == 10, 0, y[:, 0])
        np.testing.assert_array_equal(y_split.numpy(), expected_y)
        assert 0 in y_split.tolist() or len(y) < 10
        for i in range(X.shape[3]):
            for c in range(3):
                np.testing.assert_array_equal(split[i, c].numpy(), X[:, :, c, i])


def test_svhn_bad_files(tmp_path):
    d = tmp_path / "svhn"
    _write_svhn(d, np.random.default_rng(9))
    bad = d / "test_32x32.mat"
    for write, msg in [
        (lambda: bad.write_bytes(b"garbage" * 20), "not a readable"),
        (lambda: scipy.io.savemat(bad, {"X": np.zeros((28, 28, 1, 3), np.uint8), "y": np.ones((3, 1))}), "32, 32, 3"),
        (lambda: scipy.io.savemat(bad, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.ones((4, 1))}), "4 labels"),
        (lambda: scipy.io.savemat(bad, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.zeros((3, 1))}), "1..10"),
        (lambda: scipy.io.savemat(bad, {"images": np.zeros(3)}), "'X' and 'y'"),
    ]:
        write()
        with pytest.raises(DatasetFormatError, match=msg) as e:
            load_dataset(DataConfig(name="svhn", data_dir=str(tmp_path)))
        assert "test_32x32.mat" in str(e.value)
