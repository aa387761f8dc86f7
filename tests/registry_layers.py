"""Conformance entries for the coupling family, the Glow layers and the base composites (tiny sizes)."""
from registry import Entry
from stableflows.transforms.base import Compose, Identity, Inverse
from stableflows.transforms.coupling import AdditiveCoupling, AffineCoupling
from stableflows.transforms.elementwise import Logit
from stableflows.transforms.linear import Invertible1x1, Permutation
from stableflows.transforms.normalization import ActNorm
from stableflows.transforms.reshape import Squeeze
from stableflows.transforms.scales import SCALES
from stableflows.transforms.splines import SplineCoupling

ABSTRACT_BASES = {
    "stableflows.transforms.coupling.Coupling": "template of Additive/AffineCoupling; no elementwise map of its own",
}

H = 8  # conditioner width
VEC, VEC_ODD, IMG, IMG4, IMG_ODD = (6,), (5,), (2, 4, 4), (4, 4, 4), (3, 4, 4)


def _affine(shape, **kw):
    return lambda: AffineCoupling(shape, hidden=H, **kw)


def _additive(shape, **kw):
    return lambda: AdditiveCoupling(shape, hidden=H, **kw)


def _glow_step(shape):
    return Compose(ActNorm(shape), Invertible1x1(shape), AffineCoupling(shape, hidden=H))


def _small_flow():
    """Logit -> Squeeze -> two Glow-like steps on (8, 2, 2) with both masks and both couplings."""
    s = (8, 2, 2)
    return Compose(
        Logit(0.05), Squeeze(2),
        ActNorm(s), Invertible1x1(s, lu=True), AffineCoupling(s, hidden=H, scale="biased_sigmoid"),
        ActNorm(s), Invertible1x1(s, lu=False), AdditiveCoupling(s, mask="checkerboard", parity=1, hidden=H),
        Permutation(s, kind="shuffle", seed=3), AffineCoupling(s, mask="checkerboard", hidden=H, scale="tanh_clamp"),
    )


ENTRIES = {
    # affine coupling: every scale parameterisation, vectors and images
    **{f"affine_vec_{name}": Entry(_affine(VEC, scale=name), VEC) for name in SCALES},
    **{f"affine_img_{name}": Entry(_affine(IMG, scale=name), IMG, gradcheck=False) for name in SCALES},
    "affine_vec_bounded_custom": Entry(_affine(VEC, scale="bounded", scale_kwargs={"a": 0.2, "b": 3.0}), VEC),
    "affine_vec_biased_sigmoid_eps": Entry(_affine(VEC, scale="biased_sigmoid", scale_kwargs={"eps": 0.1}), VEC),
    "affine_vec_atan_c1": Entry(_affine(VEC, scale="atan_clamp", scale_kwargs={"c": 1.0}), VEC),
    # affine coupling: masks x parities, odd sizes
    "affine_vec_channel_p1": Entry(_affine(VEC, parity=1), VEC),
    "affine_vec_checker_p0": Entry(_affine(VEC, mask="checkerboard"), VEC),
    "affine_vec_checker_p1": Entry(_affine(VEC, mask="checkerboard", parity=1, scale="exp"), VEC),
    "affine_vecodd_channel_p0": Entry(_affine(VEC_ODD, scale="bounded"), VEC_ODD),
    "affine_vecodd_checker_p1": Entry(_affine(VEC_ODD, mask="checkerboard", parity=1), VEC_ODD),
    "affine_img_channel_p1": Entry(_affine(IMG, parity=1), IMG),
    "affine_img_checker_p0": Entry(_affine(IMG, mask="checkerboard"), IMG),
    "affine_img_checker_p1": Entry(_affine(IMG, mask="checkerboard", parity=1, scale="tanh_clamp"), IMG,
                                   gradcheck=False),
    "affine_imgodd_channel_p0": Entry(_affine(IMG_ODD, scale="biased_sigmoid"), IMG_ODD, gradcheck=False),
    # additive coupling
    "additive_vec_channel_p0": Entry(_additive(VEC), VEC),
    "additive_vec_channel_p1": Entry(_additive(VEC, parity=1), VEC),
    "additive_vec_checker_p0": Entry(_additive(VEC, mask="checkerboard"), VEC),
    "additive_vecodd_checker_p1": Entry(_additive(VEC_ODD, mask="checkerboard", parity=1), VEC_ODD),
    "additive_img_channel_p0": Entry(_additive(IMG), IMG),
    "additive_img_checker_p1": Entry(_additive(IMG, mask="checkerboard", parity=1), IMG, gradcheck=False),
    "additive_imgodd_channel_p1": Entry(_additive(IMG_ODD, parity=1), IMG_ODD, gradcheck=False),
    # rational-quadratic spline coupling: inside the interval, and with most inputs in the identity tails
    "spline_vec_channel_p0": Entry(lambda: SplineCoupling(VEC, hidden=H, bins=4, bound=3.0), VEC),
    "spline_vec_checker_p1_tails": Entry(lambda: SplineCoupling(VEC, mask="checkerboard", parity=1, hidden=H, bins=3,
                                                                bound=0.5), VEC),
    "spline_img_channel_p1": Entry(lambda: SplineCoupling(IMG, parity=1, hidden=H, bins=5, bound=2.0), IMG,
                                   gradcheck=False),
    "spline_img_checker_p0": Entry(lambda: SplineCoupling(IMG, mask="checkerboard", hidden=H), IMG, gradcheck=False),
    # normalisation, channel mixing, reshaping, elementwise
    "actnorm_vec": Entry(lambda: ActNorm(VEC), VEC),
    "actnorm_img": Entry(lambda: ActNorm(IMG), IMG),
    "conv1x1_lu_vec": Entry(lambda: Invertible1x1(VEC, lu=True), VEC),
    "conv1x1_lu_img": Entry(lambda: Invertible1x1(IMG4, lu=True), IMG4),
    "conv1x1_plain_vec": Entry(lambda: Invertible1x1(VEC, lu=False), VEC),
    "conv1x1_plain_img": Entry(lambda: Invertible1x1(IMG4, lu=False), IMG4, gradcheck=False),
    "permutation_reverse_vec": Entry(lambda: Permutation(VEC, kind="reverse"), VEC),
    "permutation_shuffle_vec": Entry(lambda: Permutation(VEC, kind="shuffle", seed=1), VEC),
    "permutation_shuffle_img": Entry(lambda: Permutation(IMG4, kind="shuffle"), IMG4),
    "squeeze": Entry(lambda: Squeeze(2), IMG),
    "squeeze_f4": Entry(lambda: Squeeze(4), (1, 4, 8), gradcheck=False),
    "logit_vec": Entry(lambda: Logit(0.05), VEC, domain="unit"),
    "logit_img_alpha0": Entry(lambda: Logit(0.0), IMG, domain="unit"),
    # composites of stableflows.transforms.base
    "identity": Entry(lambda: Identity(), VEC),
    "inverse_affine_vec": Entry(lambda: Inverse(AffineCoupling(VEC, hidden=H, scale="bounded")), VEC),
    "glow_step_img": Entry(lambda: _glow_step(IMG), IMG, gradcheck=False),
    "inverse_glow_step_vec": Entry(lambda: Inverse(_glow_step(VEC)), VEC),
    "compose_small_flow": Entry(_small_flow, IMG, domain="unit", gradcheck=False),
}
