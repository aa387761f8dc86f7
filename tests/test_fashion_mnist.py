"""Fashion-MNIST, 28x28: where its files are found (stableflows.data.locate) and the real files of
Debian's package ``dataset-fashion-mnist``.

The locator tests write tiny IDX files under temporary folders. The real-file tests read
``/usr/share/datasets/fashion-mnist``; where the package is not installed they are skipped with
the apt command in the reason, unless ``STABLEFLOWS_REQUIRE_FASHION_MNIST=1`` (set by ``.ci/run``,
where the package is installed first), which turns the skip into a failure. The references are
independent of stableflows' reader: the IDX headers and first image are decoded here with
gzip + struct, and the class counts (6,000 per class in training, 1,000 in test) and the mean
pixel value of the training images (0.2860 of 255, the normalisation constant quoted for
Fashion-MNIST) are published facts of the data set.
"""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stableflows.config import DataConfig
from stableflows.data import DatasetNotFound, load_dataset
from stableflows.data import locate as L

from fashion_data import APT, NAMES, PACKAGE_DIR
from fashion_data import needs_fashion_mnist as real
ENV = (L.GENERIC_ENV, *L.ENV_VARS.values())


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- tiny files, locator
def _idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def _write(folder: Path, fill: int, n: int = 6) -> None:
    """Four IDX files whose images are all ``fill`` (which folder was read shows in the pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(np.full((n, 28, 28), fill)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))


def _fill(**kw) -> int:
    s = load_dataset(DataConfig(name="fashion-mnist", val_size=0.0, **kw))
    return int(s.test[0, 0, 0, 0])


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A stand-in for the package folder (so these tests do not depend on what is installed)."""
    folder = tmp_path / "pkg"
    monkeypatch.setitem(L.PACKAGES, "fashion-mnist", L.Package("dataset-fashion-mnist", str(folder)))
    return folder


def test_search_order_data_dir_env_generic_env_package(tmp_path, monkeypatch, package):
    _write(package, 1)
    assert _fill() == 1  # nothing set: the package's folder
    _write(tmp_path / "root" / "fashion-mnist", 2)
    monkeypatch.setenv(L.GENERIC_ENV, str(tmp_path / "root"))
    assert _fill() == 2  # the shared root, with its sub-folder
    _write(tmp_path / "own", 3)
    monkeypatch.setenv(L.ENV_VARS["fashion-mnist"], str(tmp_path / "own"))
    assert _fill() == 3  # the dataset's own variable before the shared root
    _write(tmp_path / "given", 4)
    assert _fill(data_dir=str(tmp_path / "given")) == 4  # data_dir first
    (tmp_path / "empty").mkdir()
    assert _fill(data_dir=str(tmp_path / "empty")) == 3  # a folder without the files is passed over


def test_a_given_folder_that_does_not_exist_is_an_error(tmp_path, monkeypatch, package):
    _write(package, 1)
    with pytest.raises(DatasetNotFound, match="data_dir .*nowhere does not exist"):
        _fill(data_dir=str(tmp_path / "nowhere"))
    monkeypatch.setenv(L.ENV_VARS["fashion-mnist"], str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFound, match=r"\$STABLEFLOWS_FASHION_MNIST_DIR .*typo does not exist"):
        _fill()


def test_missing_files_name_the_apt_command_and_the_files(tmp_path, package):
    (tmp_path / "some").mkdir()
    with pytest.raises(DatasetNotFound) as e:
        _fill(data_dir=str(tmp_path / "some"))
    msg = str(e.value)
    assert APT in msg and str(package) in msg and "no such folder" in msg
    assert all(n in msg for n in NAMES) and str(tmp_path / "some") in msg
    assert "STABLEFLOWS_FASHION_MNIST_DIR" in msg and "never downloads" in msg
    _write(package, 1)
    (package / NAMES[3]).unlink()  # a package folder lacking one file says which
    with pytest.raises(DatasetNotFound, match=f"{package} lacks {NAMES[3]}"):
        _fill()


def test_mnist_uses_the_same_mechanism_without_a_package(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(DataConfig(name="mnist"))
    msg = str(e.value)
    assert "no data_dir given" in msg and "STABLEFLOWS_MNIST_DIR" in msg and "apt-get" not in msg
    _write(tmp_path / "m" / "mnist", 7)
    monkeypatch.setenv(L.GENERIC_ENV, str(tmp_path / "m"))
    assert int(load_dataset(DataConfig(name="mnist", val_size=0.0)).test.max()) == 7
    _write(tmp_path / "m2", 8)
    monkeypatch.setenv(L.ENV_VARS["mnist"], str(tmp_path / "m2"))
    assert int(load_dataset(DataConfig(name="mnist", val_size=0.0)).test.max()) == 8


# ----------------------------------------------------------------------------- evaluation passes at 28x28
def test_evaluation_passes_at_28x28_and_the_value_does_not_depend_on_them():
    """On CPU a pass holds at most 2**16 values (83 images of 28x28, 512 of 8x8 digits); on a GPU the
    512 stay. The bits/dim equal a one-pass float64 recomputation of -(log p(v) - D log L) / (D ln 2)
    with the fixed noise u = rand(seed 0) (docs/METRICS.md)."""
    from stableflows.models import glow
    from stableflows.train.evaluate import EVAL_BATCH, eval_batch, evaluate

    x28, x8 = torch.zeros(5, 1, 28, 28), torch.zeros(5, 1, 8, 8)
    assert (eval_batch(x28, "cpu"), eval_batch(x8, "cpu"), eval_batch(x28, "cuda")) == (83, 512, EVAL_BATCH)
    assert eval_batch(torch.zeros(0, 3, 256, 256), "cpu") == 1 and eval_batch(x28, "cpu", 16) == 16
    torch.manual_seed(0)
    flow = glow(shape=(1, 28, 28), levels=2, steps_per_level=1, hidden=8)
    x = torch.randint(0, 256, (200, 1, 28, 28)).float()
    with torch.no_grad():
        flow.log_prob((x + 0.5) / 256)  # ActNorm initialisation
    got = evaluate(flow, x, 256)  # passes of 83, 83, 34
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    flow64 = flow.double().eval()
    with torch.no_grad():
        logp = flow64.log_prob((x.double() + u.double()) / 256)
    want = float((-(logp - 784 * math.log(256)) / (784 * math.log(2))).mean())
    assert math.isclose(got, want, rel_tol=0, abs_tol=1e-4), (got, want)
    assert math.isclose(evaluate(flow.float(), x, 256, batch_size=7), got, abs_tol=1e-5)


# ----------------------------------------------------------------------------- the real files
def _raw(name: str) -> bytes:
    p = PACKAGE_DIR / f"{name}.gz"
    return gzip.decompress(p.read_bytes()) if p.is_file() else (PACKAGE_DIR / name).read_bytes()


@pytest.fixture(scope="module")
def fmnist():
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV:
            mp.delenv(var, raising=False)
        return load_dataset(DataConfig(name="fashion-mnist"), seed=0)  # no data_dir: the package's folder


@real
def test_real_files_shapes_levels_and_split_sizes(fmnist):
    s = fmnist
    assert s.name == "fashion-mnist" and s.shape == (1, 28, 28) and s.levels == 256
    assert (len(s.train), len(s.val), len(s.test)) == (54_000, 6_000, 10_000)  # val_size 0.1 of 60,000
    for x in (s.train, s.val, s.test):
        assert x.dtype == torch.float32 and torch.equal(x, x.round())
        assert float(x.min()) == 0.0 and float(x.max()) == 255.0
    # stratified validation split: exactly 600 of each class; the test split has 1,000 of each
    assert torch.bincount(s.y_val, minlength=10).tolist() == [600] * 10
    assert torch.bincount(s.y_train, minlength=10).tolist() == [5_400] * 10
    assert torch.bincount(s.y_test, minlength=10).tolist() == [1_000] * 10
    train_all = torch.cat([s.train, s.val])
    assert math.isclose(float(train_all.double().mean()) / 255, 0.2860, abs_tol=5e-5)


@real
def test_real_files_agree_with_an_independent_idx_decoding(fmnist):
    s = fmnist
    for name, n, dims in ((NAMES[0], 60_000, (28, 28)), (NAMES[2], 10_000, (28, 28)), (NAMES[1], 60_000, ()),
                          (NAMES[3], 10_000, ())):
        buf = _raw(name)
        magic = 0x0803 if dims else 0x0801
        assert struct.unpack(">I", buf[:4])[0] == magic
        assert struct.unpack(f">{1 + len(dims)}I", buf[4:8 + 4 * len(dims)]) == (n, *dims)
    test_img = np.frombuffer(_raw(NAMES[2]), dtype=np.uint8, offset=16).reshape(10_000, 28, 28)
    test_lab = np.frombuffer(_raw(NAMES[3]), dtype=np.uint8, offset=8)
    np.testing.assert_array_equal(s.test[:, 0].numpy(), test_img)
    np.testing.assert_array_equal(s.y_test.numpy(), test_lab)
    train_img = np.frombuffer(_raw(NAMES[0]), dtype=np.uint8, offset=16).reshape(60_000, 28, 28)
    np.testing.assert_array_equal(s.val[:, 0].numpy(), train_img[s.val_index.numpy()])


@real
def test_a_few_training_steps_at_28x28_lower_the_bits_per_dim(fmnist):
    """A small Glow (2 levels x 2 steps, width 16) trained 60 steps on the real images: test bits/dim
    (8-bit, 256 levels, fixed noise) well below the uniform model's 8 and below its start."""
    from stableflows.metrics import bits_per_dim
    from stableflows.models import glow

    torch.manual_seed(0)
    flow = glow(shape=(1, 28, 28), levels=2, steps_per_level=2, hidden=16)
    g = torch.Generator().manual_seed(0)
    train_x, test_x = fmnist.train[:2048], fmnist.test[:256]
    flow.train()
    with torch.no_grad():
        flow.log_prob((train_x[:256] + torch.rand(train_x[:256].shape, generator=g)) / 256)  # ActNorm init

    def test_bpd() -> float:
        flow.eval()
        with torch.no_grad():
            return float(bits_per_dim(flow, test_x, 256).mean())

    start = test_bpd()
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    flow.train()
    for step in range(60):
        idx = torch.randint(0, len(train_x), (32,), generator=g)
        v = (train_x[idx] + torch.rand((32, 1, 28, 28), generator=g)) / 256
        loss = -(flow.log_prob(v) - 784 * math.log(256)).mean() / (784 * math.log(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = test_bpd()
    assert math.isfinite(start) and math.isfinite(end)
    assert end < start - 0.5 and end < 6.5, (start, end)  # measured: 7.26 -> 5.92
