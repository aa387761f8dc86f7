"""Conformance entries of the conditional layers and models (cINNs): each gets a context per example."""
from registry import Entry
from stableflows.models import cinn, make_conditional, realnvp
from stableflows.transforms.base import Compose, Inverse
from stableflows.transforms.conditional import (ConditionalAdditiveCoupling, ConditionalAffineCoupling,
                                                ConditionalElementwiseAffine, ConditionalSplineCoupling)
from stableflows.transforms.linear import Permutation

ABSTRACT_BASES = {}

H = 8
VEC, IMG = (6,), (2, 4, 4)
K = (3,)  # vector context
CIMG = (2, 8, 8)  # image context, pooled to the layers' 4x4 / 2x2


def _compose():
    """A conditional coupling, a permutation and an inverted conditional coupling: context through Compose / Inverse."""
    return Compose(ConditionalAffineCoupling(VEC, context_shape=K, hidden=H, scale="exp"),
                   Permutation(VEC, kind="reverse"),
                   Inverse(ConditionalSplineCoupling(VEC, context_shape=K, hidden=H, parity=1)))


ENTRIES = {
    "cond_affine_vec": Entry(lambda: ConditionalAffineCoupling(VEC, context_shape=K, hidden=H, scale="exp"), VEC,
                             context_shape=K),
    "cond_affine_vec_checker_sigmoid": Entry(
        lambda: ConditionalAffineCoupling(VEC, context_shape=K, mask="checkerboard", parity=1, hidden=H), VEC,
        context_shape=K),
    "cond_affine_img": Entry(lambda: ConditionalAffineCoupling(IMG, context_shape=K, hidden=H, scale="tanh_clamp"),
                             IMG, context_shape=K, gradcheck=False),
    "cond_affine_img_checker_imgctx": Entry(
        lambda: ConditionalAffineCoupling(IMG, context_shape=CIMG, mask="checkerboard", hidden=H), IMG,
        context_shape=CIMG, gradcheck=False),
    "cond_additive_vec": Entry(lambda: ConditionalAdditiveCoupling(VEC, context_shape=K, hidden=H, parity=1), VEC,
                               context_shape=K),
    "cond_additive_img_imgctx": Entry(lambda: ConditionalAdditiveCoupling(IMG, context_shape=CIMG, hidden=H), IMG,
                                      context_shape=CIMG, gradcheck=False),
    "cond_spline_vec": Entry(lambda: ConditionalSplineCoupling(VEC, context_shape=K, hidden=H, bins=4, bound=3.0),
                             VEC, context_shape=K),
    "cond_spline_img": Entry(lambda: ConditionalSplineCoupling(IMG, context_shape=K, hidden=H), IMG,
                             context_shape=K, gradcheck=False),
    "cond_prior_vec": Entry(lambda: ConditionalElementwiseAffine(VEC, context_shape=K), VEC, context_shape=K),
    "cond_prior_img": Entry(lambda: ConditionalElementwiseAffine(IMG, context_shape=CIMG), IMG, context_shape=CIMG),
    "cond_compose_inverse": Entry(_compose, VEC, context_shape=K),
    # models: the Glow architecture made conditional (multi-scale: context through MultiScale and Flow)
    "cinn_img": Entry(lambda: cinn(shape=(1, 4, 4), context_features=3, levels=2, steps_per_level=2, hidden=H),
                      (1, 4, 4), domain="unit", context_shape=K, gradcheck=False),
    "cinn_img_spline_imgctx": Entry(
        lambda: cinn(shape=(1, 4, 4), context_shape=(1, 4, 4), levels=1, steps_per_level=2, hidden=H,
                     coupling="spline"), (1, 4, 4), domain="unit", context_shape=(1, 4, 4), gradcheck=False),
    "cinn_vec_additive": Entry(lambda: cinn(shape=(6,), n_classes=4, levels=1, steps_per_level=3, hidden=H,
                                            coupling="additive"), (6,), domain="unit", context_shape=(4,)),
    "cond_realnvp_img": Entry(
        lambda: make_conditional(realnvp(shape=(1, 4, 4), levels=2, steps_per_level=2, hidden=H), context_shape=2),
        (1, 4, 4), domain="unit", context_shape=(2,), gradcheck=False),
}
