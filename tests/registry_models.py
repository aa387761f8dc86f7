"""Conformance entries for the multi-scale structure and every model factory (tiny sizes)."""
import torch

from registry import Entry
from stableflows.config import ModelConfig
from stableflows.models import build_model, cv_glow, glow, nice, realnvp
from stableflows.transforms.multiscale import ElementwiseAffine, Flatten, MultiScale, SplitPrior
from stableflows.transforms.base import Compose, Identity


def _multiscale():
    prior = SplitPrior((4, 2, 2))
    inner = Compose(ElementwiseAffine((2, 2, 2)), Flatten((2, 2, 2)))
    return MultiScale(Identity(), prior, inner, (4, 2, 2))


IMG = (1, 4, 4)
RESFLOW_EXACT = dict(estimator="exact", inverse_atol=1e-13, inverse_rtol=0.0, inverse_max_iter=2000, coeff=0.7)


def _built(shape, **fields):
    """A model built from a ModelConfig (the path of the CLI and of checkpoints), e.g. with a learned base."""
    return build_model(ModelConfig(**fields), shape)


ENTRIES = {
    "flatten": Entry(build=lambda: Flatten((2, 3, 2)), shape=(2, 3, 2)),
    "elementwise_affine_img": Entry(build=lambda: ElementwiseAffine((3, 2, 2)), shape=(3, 2, 2)),
    "elementwise_affine_vec": Entry(build=lambda: ElementwiseAffine((5,)), shape=(5,)),
    "split_prior": Entry(build=lambda: SplitPrior((4, 3, 3)), shape=(4, 3, 3)),
    "split_prior_odd": Entry(build=lambda: SplitPrior((3, 2, 2)), shape=(3, 2, 2)),
    "multiscale": Entry(build=_multiscale, shape=(4, 2, 2)),
    "glow_img_affine": Entry(build=lambda: glow(shape=IMG, levels=2, steps_per_level=2, hidden=8), shape=IMG,
                             domain="unit", gradcheck=False),
    "glow_img_additive_shuffle": Entry(
        build=lambda: glow(shape=IMG, levels=1, steps_per_level=2, hidden=8, coupling="additive",
                           permutation="shuffle", logit_alpha=0.0), shape=IMG, domain="unit", gradcheck=False),
    "glow_img_split_factored_shuffled": Entry(
        build=lambda: glow(shape=IMG, levels=2, steps_per_level=2, hidden=8, split_condition="factored",
                           split_shuffle=True, scale="biased_sigmoid", scale_floor=0.05), shape=IMG, domain="unit",
        gradcheck=False),
    "glow_vec": Entry(build=lambda: glow(shape=(6,), levels=1, steps_per_level=3, hidden=8, scale="tanh_clamp"),
                      shape=(6,), domain="unit"),
    "realnvp_img": Entry(build=lambda: realnvp(shape=IMG, levels=2, steps_per_level=2, hidden=8), shape=IMG,
                         domain="unit", gradcheck=False),
    "realnvp_vec": Entry(build=lambda: realnvp(shape=(5,), levels=1, steps_per_level=3, hidden=8), shape=(5,),
                         domain="unit"),
    "nice_vec": Entry(build=lambda: nice(shape=(6,), steps_per_level=4, hidden=8), shape=(6,), domain="unit"),
    "nice_img": Entry(build=lambda: nice(shape=(1, 4, 4), steps_per_level=2, hidden=8, mask="checkerboard"),
                      shape=(1, 4, 4), domain="unit", gradcheck=False),
    "cv_glow_img": Entry(build=lambda: cv_glow(shape=IMG, levels=2, steps_per_level=2, hidden=8), shape=IMG,
                         domain="unit", gradcheck=False),
    # learned base distributions (stableflows.models.distributions); tests/test_distributions.py checks the
    # log-density of every Flow entry against torch.distributions + the autograd Jacobian
    "glow_vec_diag_normal_base": Entry(
        build=lambda: _built((6,), model="glow", hidden=8, levels=1, steps_per_level=2, base="diag_normal"),
        shape=(6,), domain="unit"),
    "realnvp_img_mixture_base": Entry(
        build=lambda: _built(IMG, model="realnvp", hidden=8, levels=2, steps_per_level=2, base="mixture",
                             base_components=3), shape=IMG, domain="unit", gradcheck=False),
    "resflow_vec_mixture_base": Entry(
        build=lambda: _built((3,), model="resflow", hidden=6, levels=1, steps_per_level=2, base="mixture",
                             base_components=2, **RESFLOW_EXACT), shape=(3,), domain="unit"),
}
