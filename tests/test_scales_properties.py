"""Property tests of the bounded scale parameterisations with extreme raw inputs (hypothesis)."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from stableflows.transforms import AffineCoupling, make_scale
from stableflows.transforms.base import collect_stats, read_stats

BOUNDED = {
    "sigmoid": {},
    "biased_sigmoid": {},
    "biased_sigmoid_small": {"eps": 1e-3},
    "bounded": {},
    "bounded_wide": {"a": 1e-2, "b": 50.0},
    "tanh_clamp": {},
    "atan_clamp": {},
    "atan_clamp_large": {"c": 10.0},
}
EXTREMES = [0.0, 1e4, -1e4, 1e30, -1e30, 88.0, -88.0, 710.0, -710.0, 3e38, -3e38]
LOG_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
LOG_ATOL = {torch.float32: 1e-6, torch.float64: 1e-14}


def _scale(key):
    return make_scale(key.replace("_small", "").replace("_wide", "").replace("_large", ""), **BOUNDED[key])


def _raws(dtype):
    info = torch.finfo(dtype)
    finite = st.floats(min_value=float(-info.max), max_value=float(info.max), allow_nan=False, allow_infinity=False,
                       width=32 if dtype == torch.float32 else 64)
    return st.lists(st.one_of(finite, st.floats(-1e4, 1e4), st.sampled_from(EXTREMES)), min_size=1, max_size=32)


def _check(key, values, dtype):
    scale_fn = _scale(key)
    raw = torch.tensor(values, dtype=dtype)
    scale, log_scale = scale_fn(raw)
    assert scale.dtype == dtype and log_scale.dtype == dtype
    assert torch.isfinite(scale).all() and torch.isfinite(log_scale).all()
    # the stated closed bounds (the open interval rounds to its ends for saturated inputs)
    assert (scale >= scale_fn.lower).all() and (scale <= scale_fn.upper).all()
    lo, hi = math.log(scale_fn.lower) if scale_fn.lower > 0 else -math.inf, math.log(scale_fn.upper)
    assert (log_scale.double() >= lo - 1e-6).all() and (log_scale.double() <= hi + 1e-6).all()
    # log_scale == log(scale) wherever the scale is a normal float (not underflowed)
    ok = scale > torch.finfo(dtype).tiny
    ref = torch.log(scale[ok].double())
    assert torch.allclose(log_scale[ok].double(), ref, rtol=LOG_RTOL[dtype], atol=LOG_ATOL[dtype])


@given(key=st.sampled_from(sorted(BOUNDED)), values=_raws(torch.float64))
def test_bounded_scales_float64(key, values):
    _check(key, values, torch.float64)


@given(key=st.sampled_from(sorted(BOUNDED)), values=_raws(torch.float32))
def test_bounded_scales_float32(key, values):
    _check(key, values, torch.float32)


def test_log_scale_is_exact_where_the_scale_underflows():
    # Glow's sigmoid: sigma(-200 + 2) underflows to 0 in float32, its log is still exact (-198)
    scale, log_scale = make_scale("sigmoid")(torch.tensor([-200.0], dtype=torch.float32))
    assert scale.item() == 0.0 and math.isclose(log_scale.item(), -198.0, rel_tol=1e-6)
    # bounded / biased sigmoid never underflow: their log is exactly log(lower) at -inf saturation
    for name, low in [("bounded", 0.5), ("biased_sigmoid", 0.5)]:
        s, ls = make_scale(name)(torch.tensor([-1e30], dtype=torch.float64))
        assert s.item() == low and math.isclose(ls.item(), math.log(low), rel_tol=1e-15)


_COUPLINGS = {}


def _coupling(scale, shape):
    """A perturbed (non-trivial) coupling with a bounded scale, built once per (scale, shape)."""
    key = (scale, shape)
    if key not in _COUPLINGS:
        torch.manual_seed(1)
        layer = AffineCoupling(shape, hidden=8, scale=scale).double()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        _COUPLINGS[key] = layer
    return _COUPLINGS[key]


@given(
    scale=st.sampled_from(["biased_sigmoid", "bounded", "tanh_clamp", "atan_clamp"]),
    shape=st.sampled_from([(6,), (2, 2, 2)]),
    magnitude=st.sampled_from([1.0, 1e2, 1e4, 1e6]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_affine_coupling_with_bounded_scale_stays_finite_on_extreme_inputs(scale, shape, magnitude, seed, dtype):
    layer = _coupling(scale, shape).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = magnitude * torch.randn(4, *shape, generator=g, dtype=dtype)
    with torch.no_grad(), collect_stats():
        y, ld = layer(x)
        x_rec, ld_inv = layer.inverse(y)
    for t in (y, ld, x_rec, ld_inv):
        assert torch.isfinite(t).all()
    # the stated bound, rounded to the working precision (exp(-c) is not a float32 number)
    assert read_stats(layer)["min_scale"] >= torch.tensor(layer.scale.lower, dtype=dtype).item()
    # the inverse error of one layer is bounded by rounding of |y| and |t| <= |y| + b |x|, amplified by 1/a
    s = layer.scale
    bound = 64 * torch.finfo(dtype).eps * (2 * y.abs().max() + s.upper * x.abs().max() + 1) / s.lower
    assert (x_rec - x).abs().max() <= bound
