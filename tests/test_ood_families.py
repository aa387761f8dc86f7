"""OOD input families (stableflows.data.ood): shapes, ranges, definitions, determinism, patches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.datasets import load_digits, load_sample_images

from stableflows.config import ConfigError
from stableflows.data import DISCRETE_FAMILIES, OOD_FAMILIES, discrete_ood_family, ood_family
from stableflows.metrics import bits_per_dim, check_levels
from stableflows.transforms.base import ShapeError

L = 17  # digits levels
RANDOM_FAMILIES = ("uniform", "gaussian", "natural_patches")


@pytest.fixture(scope="module")
def digits_int() -> torch.Tensor:
    return torch.tensor(load_digits().data[:200], dtype=torch.float32).reshape(200, 1, 8, 8)  # levels 0..16


@pytest.fixture(scope="module")
def digits_v(digits_int) -> torch.Tensor:
    u = torch.rand(digits_int.shape, generator=torch.Generator().manual_seed(0))
    return (digits_int + u) / L  # model space, independent of the package's dequantize


def test_family_names():
    assert set(OOD_FAMILIES) == {"uniform", "gaussian", "constant", "grayed", "inverted", "out_of_range", "natural_patches"}
    assert set(DISCRETE_FAMILIES) == {"uniform", "constant", "grayed", "inverted", "natural_patches"}


@pytest.mark.parametrize("name", OOD_FAMILIES)
@pytest.mark.parametrize("flat", [False, True])
def test_shapes_dtype_determinism(name, flat, digits_v):
    ref = digits_v.reshape(200, 64) if flat else digits_v
    a = ood_family(name, ref, 30, seed=0, levels=L)
    assert a.shape == (30, *ref.shape[1:]) and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, ood_family(name, ref, 30, seed=0, levels=L))
    b = ood_family(name, ref, 30, seed=1, levels=L)
    assert (not torch.equal(a, b)) if name in RANDOM_FAMILIES else torch.equal(a, b)
    if flat:  # flattening commutes with every family
        assert torch.equal(a, ood_family(name, digits_v, 30, seed=0, levels=L).reshape(30, 64))
    d64 = ood_family(name, ref.double(), 5, seed=0, levels=L)
    assert d64.dtype == torch.float64


def test_uniform_and_gaussian_statistics(digits_v):
    u = ood_family("uniform", digits_v, 500, seed=3).double()
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    g = ood_family("gaussian", digits_v, 500, seed=3).double()
    assert abs(float(g.mean()) - 0.5) < 0.005 and abs(float(g.std()) - 0.25) < 0.003
    outside = float(((g < 0) | (g > 1)).double().mean())  # not clamped: P(|Z| > 2) = 4.55 %
    assert abs(outside - math.erfc(2 / math.sqrt(2))) < 0.005
    g2 = ood_family("gaussian", digits_v, 500, seed=3, mean=0.2, std=0.1).double()
    assert abs(float(g2.mean()) - 0.2) < 0.003 and abs(float(g2.std()) - 0.1) < 0.002


def test_constant(digits_v):
    c = ood_family("constant", digits_v, 17, levels=L).double()
    per = c.reshape(17, -1)
    assert torch.all(per == per[:, :1])  # every image constant
    np.testing.assert_allclose(per[:, 0].numpy(), (np.arange(17) + 0.5) / 17, rtol=0, atol=1e-7)
    c5 = ood_family("constant", digits_v, 5).double().reshape(5, -1)[:, 0]  # no levels: (k + 1/2) / n
    np.testing.assert_allclose(c5.numpy(), [0.1, 0.3, 0.5, 0.7, 0.9], atol=1e-7)
    d = discrete_ood_family("constant", digits_v, 5, levels=L).reshape(5, -1)
    np.testing.assert_array_equal(d[:, 0].numpy(), [0, 4, 8, 12, 16])


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.5, 1.0])
def test_grayed(digits_v, digits_int, factor):
    v = digits_v.double()
    g = ood_family("grayed", v, 50, factor=factor)
    m = v[:50].mean(dim=(1, 2, 3))
    np.testing.assert_allclose(g.mean(dim=(1, 2, 3)).numpy(), m.numpy(), atol=1e-12)  # mean kept
    np.testing.assert_allclose((g - m[:, None, None, None]).numpy(), factor * (v[:50] - m[:, None, None, None]).numpy(), atol=1e-12)
    np.testing.assert_allclose(g.std(dim=(1, 2, 3)).numpy(), factor * v[:50].std(dim=(1, 2, 3)).numpy(), atol=1e-12)
    gd = discrete_ood_family("grayed", digits_int, 50, levels=L, factor=factor).double().numpy()
    x = digits_int[:50].double().numpy()
    mx = x.reshape(50, -1).mean(1)[:, None, None, None]
    assert np.all(np.abs(gd - (mx + factor * (x - mx))) <= 0.5 + 1e-9) and np.all(gd == np.round(gd))
    check_levels(torch.from_numpy(gd), L)
    if factor == 1.0:
        assert np.array_equal(gd, x)


def test_grayed_toward_fixed_center(digits_v, digits_int):
    g = ood_family("grayed", digits_v.double(), 20, factor=0.25, center=0.5)
    np.testing.assert_allclose(g.numpy(), (0.5 + 0.25 * (digits_v[:20].double() - 0.5)).numpy(), atol=1e-12)
    gd = discrete_ood_family("grayed", digits_int, 20, levels=L, factor=0.25, center=0.5)  # toward level 8
    expected = np.round(8.0 + 0.25 * (digits_int[:20].double().numpy() - 8.0))
    np.testing.assert_array_equal(gd.double().numpy(), expected)


def test_inverted(digits_v, digits_int):
    inv = ood_family("inverted", digits_v, 40)
    assert torch.equal(inv, 1.0 - digits_v[:40])
    di = discrete_ood_family("inverted", digits_int, 40, levels=L)
    assert torch.equal(di, 16.0 - digits_int[:40])  # digits: 16 - x
    # 1 - v lies in the cell of the inverted level
    assert torch.equal(torch.floor((1.0 - digits_v[:40].double()) * L).clamp(max=L - 1), di.double())


def test_out_of_range(digits_v):
    o = ood_family("out_of_range", digits_v.double(), 100)
    np.testing.assert_allclose(o.numpy(), (2.0 * digits_v[:100].double() - 0.5).numpy(), atol=1e-12)
    assert float(o.min()) < 0 and float(o.max()) > 1
    o3 = ood_family("out_of_range", digits_v.double(), 10, scale=3.0, center=0.0)
    np.testing.assert_allclose(o3.numpy(), (3.0 * digits_v[:10].double()).numpy(), atol=1e-12)


def _quantised_gray_images(levels: int) -> list[np.ndarray]:
    out = []
    for im in load_sample_images().images:
        g = im[..., 0] * 0.299 + im[..., 1] * 0.587 + im[..., 2] * 0.114
        out.append(np.minimum(np.floor(g * levels / 256.0), levels - 1)[None])  # (1, H, W)
    return out


def _found_in(patch: np.ndarray, images: list[np.ndarray]) -> bool:
    """Whether ``patch`` (C, h, w) is a window of one of ``images`` (C, H, W): match the top row, then all."""
    c, h, w = patch.shape
    for im in images:
        rows = sliding_window_view(im[0], (1, w))[:, :, 0]  # (H, W - w + 1, w): every 1 x w window
        for top, left in zip(*np.nonzero(np.all(rows == patch[0, 0], axis=-1))):
            if top + h <= im.shape[1] and np.array_equal(im[:, top : top + h, left : left + w], patch):
                return True
    return False


def test_natural_patches_are_quantised_digit_patches(digits_v):
    v = ood_family("natural_patches", digits_v, 40, seed=5, levels=L).double()
    x = v * L - 0.5  # cell centres (x + 1/2) / 17
    assert torch.allclose(x, x.round(), atol=1e-5)
    x = x.round()
    assert float(x.min()) >= 0 and float(x.max()) <= 16
    assert len(torch.unique(x)) > 8  # real image content, not a constant
    assert torch.equal(discrete_ood_family("natural_patches", digits_v, 40, seed=5, levels=L).double(), x)
    images = _quantised_gray_images(L)
    for i in range(3):  # each patch is a window of a quantised grayscale sample image
        assert _found_in(x[i].numpy(), images)
    assert not _found_in(np.full((1, 8, 8), -1.0), images)


def test_natural_patches_rgb_and_256_levels():
    ref = torch.rand(4, 3, 32, 32)
    v = ood_family("natural_patches", ref, 6, seed=0, levels=256).double()
    assert v.shape == (6, 3, 32, 32)
    x = v * 256 - 0.5
    assert torch.allclose(x, x.round(), atol=1e-4) and float(x.max()) <= 255
    rgb = [im.transpose(2, 0, 1).astype(np.float64) for im in load_sample_images().images]
    assert all(_found_in(x[i].round().numpy(), rgb) for i in range(2))
    v2 = ood_family("natural_patches", ref, 2, seed=0, levels=None)  # continuous data: the 8-bit grid
    assert torch.equal(v2, v[:2])


def test_natural_patches_need_an_image_shape():
    with pytest.raises(ShapeError, match="image_shape"):
        ood_family("natural_patches", torch.rand(5, 2), 3)
    p = ood_family("natural_patches", torch.rand(5, 48), 3, levels=L, image_shape=(3, 4, 4))
    assert p.shape == (3, 48)
    with pytest.raises(ShapeError):
        ood_family("natural_patches", torch.rand(5, 48), 3, image_shape=(1, 4, 4))
    big = ood_family("natural_patches", torch.rand(2, 1, 100, 100), 2, levels=L, downscale=4)  # 106 x 160 images
    assert big.shape == (2, 1, 100, 100)
    with pytest.raises(ShapeError, match="do not fit"):
        ood_family("natural_patches", torch.rand(2, 1, 200, 200), 2, downscale=4)
    with pytest.raises(ConfigError, match="downscale"):
        ood_family("natural_patches", torch.rand(2, 1, 8, 8), 2, downscale=0)


class _UniformModel:
    """log p(v) = 0 on [0,1)^D: the uniform density, whose bits/dim is log2 L on any level data."""

    def log_prob(self, v):
        return torch.zeros(len(v), dtype=v.dtype)


@pytest.mark.parametrize("name", DISCRETE_FAMILIES)
def test_discrete_families_are_level_data(name, digits_int):
    x = discrete_ood_family(name, digits_int, 20, levels=L, seed=2)
    assert x.shape == (20, 1, 8, 8) and x.dtype == torch.float32
    check_levels(x, L)
    bpd = bits_per_dim(_UniformModel(), x, L)
    np.testing.assert_allclose(bpd.numpy(), math.log2(17), rtol=1e-6)


def test_discrete_uniform_levels(digits_int):
    x = discrete_ood_family("uniform", digits_int, 400, levels=L, seed=0)
    counts = np.bincount(x.numpy().astype(int).ravel(), minlength=L)
    assert len(counts) == L and np.all(np.abs(counts / x.numel() - 1 / L) < 0.01)


def test_bad_requests(digits_v, digits_int):
    with pytest.raises(ConfigError, match="uniform"):
        ood_family("noise", digits_v, 3)
    with pytest.raises(ConfigError, match="not on the level grid"):
        discrete_ood_family("gaussian", digits_int, 3, levels=L)
    with pytest.raises(ConfigError, match="factor"):
        ood_family("grayed", digits_v, 3, factor=1.5)
    with pytest.raises(ConfigError, match="unknown"):
        ood_family("uniform", digits_v, 3, factor=0.5)
    with pytest.raises(ShapeError, match="reference"):
        ood_family("inverted", digits_v, 201)
    with pytest.raises(ConfigError):
        ood_family("uniform", digits_v, 0)
    with pytest.raises(ShapeError):
        ood_family("uniform", torch.rand(0, 4), 3)
    with pytest.raises(ConfigError, match="levels"):
        discrete_ood_family("uniform", digits_int, 3, levels=1)
