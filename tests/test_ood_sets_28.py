"""The OOD companion set of 28x28 data (stableflows.data.ood.COMPANION_28): constant, uniform,
grayed_mid, inverted, natural_patches, digits28; and the analyses that use it at 28x28.

References: ``digits28`` is checked against scikit-learn's digits with a bilinear resize written
out here (source coordinate ``(i + 1/2) h / H - 1/2``, clamped at the edges) and against MNIST's
construction (longer side of the ink box 20, centre of mass at the field's centre (13.5, 13.5)
within half a pixel, nothing cut off); ``grayed_mid`` against the formula of paper 004 (levels
pulled toward 128); patches are found again in the quantised sample images.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, load_sample_images

from stableflows.config import ConfigError
from stableflows.data.ood import (
    COMPANION_28,
    EXTRA_FAMILIES,
    FAMILY_DESCRIPTIONS,
    digits_mnist_layout,
    discrete_ood_family,
    ood_family,
)
from stableflows.metrics import check_levels
from stableflows.transforms.base import ShapeError

L = 256
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def ref_int() -> torch.Tensor:
    """Stand-in 28x28 8-bit images (the families do not depend on what the reference shows)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, L, (64, *SHAPE), generator=g).float()


@pytest.fixture(scope="module")
def ref_v(ref_int) -> torch.Tensor:
    return (ref_int + torch.rand(ref_int.shape, generator=torch.Generator().manual_seed(1))) / L


@pytest.fixture(scope="module")
def layout() -> np.ndarray:
    return digits_mnist_layout(L)


def _bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres: output pixel i samples the input at (i + 1/2) h / H - 1/2."""
    def axis(n_in, n_out):
        s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(s).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    r0, r1, wr = axis(*a.shape[:1], out_h)
    c0, c1, wc = axis(a.shape[1], out_w)
    top = a[r0][:, c0] * (1 - wc) + a[r0][:, c1] * wc
    bot = a[r1][:, c0] * (1 - wc) + a[r1][:, c1] * wc
    return top * (1 - wr)[:, None] + bot * wr[:, None]


def _box(a: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_companion_names_and_honest_descriptions():
    assert COMPANION_28 == ("constant", "uniform", "grayed_mid", "inverted", "natural_patches", "digits28")
    assert set(EXTRA_FAMILIES) == {"grayed_mid", "digits28"}
    d = FAMILY_DESCRIPTIONS["digits28"]
    assert "sklearn digits" in d and "not MNIST" in d and "mnist" not in d.replace("MNIST", "")


def test_digits28_is_mnist_layout(layout):
    d = load_digits().images  # (1797, 8, 8) in 0..16
    assert layout.shape == (1797, 28, 28) and np.array_equal(layout, np.round(layout))
    assert layout.min() == 0 and layout.max() == 255
    for x, g in zip(layout, d):
        r0, r1, c0, c1 = _box(x)
        h, w = (lambda b: (b[1] - b[0], b[3] - b[2]))(_box(g))
        assert max(r1 - r0, c1 - c0) == 20  # the ink fits a 20x20 box, longer side 20
        assert (r1 - r0, c1 - c0) == (round(h * 20 / max(h, w)), round(w * 20 / max(h, w)))  # aspect kept
        m = x.sum()
        com = ((x.sum(1) * np.arange(28)).sum() / m, (x.sum(0) * np.arange(28)).sum() / m)
        assert abs(com[0] - 13.5) <= 0.51 and abs(com[1] - 13.5) <= 0.51, com  # centred by mass


@pytest.mark.parametrize("i", [0, 1, 7, 500, 1796])
def test_digits28_matches_a_written_out_bilinear_resize(layout, i):
    g = load_digits().images[i] / 16.0
    b = _box(g)
    crop = g[b[0]:b[1], b[2]:b[3]]
    x = layout[i]
    r0, r1, c0, c1 = _box(x)
    expected = np.clip(_bilinear(crop, r1 - r0, c1 - c0), 0, 1) * 255
    assert np.all(np.abs(x[r0:r1, c0:c1] - expected) <= 0.5 + 1e-9)  # rounded to the nearest level
    outside = x.copy()
    outside[r0:r1, c0:c1] = 0
    assert not outside.any()


def test_digits28_family_shapes_levels_order_and_limits(ref_int, ref_v, layout):
    x = discrete_ood_family("digits28", ref_int, 100, levels=L, seed=3)
    assert x.shape == (100, *SHAPE)
    check_levels(x, L)
    perm = np.random.default_rng(3).permutation(1797)[:100]
    np.testing.assert_array_equal(x[:, 0].numpy(), layout[perm])
    assert torch.equal(x[:10], discrete_ood_family("digits28", ref_int, 10, levels=L, seed=3))  # prefix-stable
    assert not torch.equal(x, discrete_ood_family("digits28", ref_int, 100, levels=L, seed=4))
    assert discrete_ood_family("digits28", ref_int, 5000, levels=L).shape[0] == 1797  # every digit once
    v = ood_family("digits28", ref_v, 20, seed=3, levels=L)
    assert torch.allclose(v.double(), (x[:20].double() + 0.5) / L)  # model space: cell centres
    flat = ood_family("digits28", ref_v.reshape(64, -1), 20, seed=3, levels=L)
    assert flat.shape == (20, 784) and torch.equal(flat, v.reshape(20, 784))
    rgb = discrete_ood_family("digits28", torch.zeros(2, 3, 28, 28), 4, levels=L, seed=3)
    assert rgb.shape == (4, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, 1], x[:4, 0])
    x17 = discrete_ood_family("digits28", ref_int, 4, levels=17, seed=3)
    np.testing.assert_array_equal(x17[:, 0].numpy(), digits_mnist_layout(17)[perm[:4]])
    check_levels(x17, 17)
    with pytest.raises(ShapeError, match="28x28"):
        discrete_ood_family("digits28", torch.zeros(3, 1, 8, 8), 3, levels=17)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0])
def test_grayed_mid_pulls_levels_toward_128(ref_int, ref_v, factor):
    g = discrete_ood_family("grayed_mid", ref_int, 64, levels=L, factor=factor).double().numpy()
    x = ref_int.double().numpy()
    np.testing.assert_array_equal(g, np.clip(np.round(128 + factor * (x - 128)), 0, 255))
    if factor == 0.5:
        assert g.min() >= 64 and g.max() <= 192
    # model space: the reference's own levels grayed, its dequantisation noise kept
    # (the cell of v: float32 rounding puts a few x + u with u near 1 in the next cell)
    v = ood_family("grayed_mid", ref_v.double(), 64, levels=L, factor=factor)
    lv, u = torch.floor(ref_v.double() * L), ref_v.double() * L - torch.floor(ref_v.double() * L)
    assert float((lv - ref_int.double()).abs().max()) <= 1
    gv = np.clip(np.round(128 + factor * (lv.numpy() - 128)), 0, 255)
    torch.testing.assert_close(v * L, torch.from_numpy(gv) + u, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="factor"):
        ood_family("grayed_mid", ref_v, 3, levels=L, factor=2.0)


def _gray_quantised(levels: int) -> list[np.ndarray]:
    return [np.minimum(np.floor((im.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) * levels / 256), levels - 1)
            for im in load_sample_images().images]


def test_companion_families_at_28x28(ref_int, ref_v):
    images = _gray_quantised(L)
    for fam in COMPANION_28:
        x = discrete_ood_family(fam, ref_int, 12, levels=L, seed=0)
        assert x.shape == (12, *SHAPE), fam
        check_levels(x, L)
        v = ood_family(fam, ref_v, 12, seed=0, levels=L)
        assert v.shape == (12, *SHAPE) and float(v.min()) >= 0 and float(v.max()) < 1, fam
    inv = discrete_ood_family("inverted", ref_int, 12, levels=L)
    assert torch.equal(inv, 255 - ref_int[:12])
    const = discrete_ood_family("constant", ref_int, 12, levels=L).reshape(12, -1)
    assert torch.all(const == const[:, :1]) and const[0, 0] == 0 and const[-1, 0] == 255
    patches = discrete_ood_family("natural_patches", ref_int, 4, levels=L, seed=0)[:, 0].numpy()
    for p in patches:  # each patch is a 28x28 window of one quantised grayscale sample image
        hits = [(im, i, j) for im in images for i, j in zip(*np.nonzero(im[:-27, :-27] == p[0, 0]))
                if np.array_equal(im[i:i + 28, j:j + 28], p)]
        assert hits


# ----------------------------------------------------------------------------- the analyses at 28x28
def _idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    """A tiny Glow trained 4 steps with ``stableflows train`` on tiny Fashion-MNIST-format files."""
    from stableflows.cli import main

    root = tmp_path_factory.mktemp("fm28")
    d = root / "fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 16)):
        img = np.clip(rng.normal(60, 50, (n, 28, 28)), 0, 255)
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(img))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    out = root / "run"
    code = main(["train", "--model", "glow", "--data", "fashion-mnist", "--data-dir", str(root), "--hidden", "4",
                 "--steps-per-level", "1", "--steps", "4", "--eval-every", "4", "--batch-size", "8",
                 "--out-dir", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    return root, out


def test_ood_command_with_the_companion_set(fmnist_run, tmp_path):
    import json

    from stableflows.cli import main

    root, run = fmnist_run
    code = main(["ood", str(run), "--in", "fashion-mnist", "--ood", ",".join(COMPANION_28), "--data-dir", str(root),
                 "--n", "8", "--bootstrap", "10", "--typicality-m", "1", "--no-second-order",
                 "--report", str(tmp_path / "ood")])
    assert code == 0
    s = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert s["data"]["shape"] == [1, 28, 28] and s["data"]["levels"] == 256
    assert set(COMPANION_28) <= set(s["data"]["families"])
    assert s["data"]["sizes"]["digits28"] == 8 and s["data"]["sizes"]["grayed_mid"] == 8
    assert s["data"]["descriptions"]["digits28"] == FAMILY_DESCRIPTIONS["digits28"]
    for fam in COMPANION_28:
        a = s["scores"][fam]["likelihood (bpd)"]["auroc"]
        assert 0 <= a <= 1 and math.isfinite(s["sets"][fam]["bpd"]["mean"]), fam


def test_audit_families_at_28x28(fmnist_run, tmp_path):
    import json

    from stableflows.audit.families import expand_families
    from stableflows.cli import main

    assert expand_families("ood") == ["uniform", "gaussian", "constant", "grayed", "inverted", "out_of_range",
                                      "natural_patches"]  # the extras are named only
    root, run = fmnist_run
    code = main(["audit", str(run), "--data-dir", str(root), "--families", "test,grayed_mid,digits28,patches",
                 "--n", "6", "--repeat", "1", "--spectra-points", "1", "--threads", "1", "--tolerance", "1e-2",
                 "--report", str(tmp_path / "audit")])
    assert code == 0
    fams = json.loads((tmp_path / "audit" / "report.json").read_text())["families"]
    for fam in ("grayed_mid", "digits28", "natural_patches"):
        assert fams[fam]["verdict"]["n_checked"] == 6 and fams[fam]["verdict"]["status"] == "invertible", fam
    assert fams["digits28"]["description"] == FAMILY_DESCRIPTIONS["digits28"]
