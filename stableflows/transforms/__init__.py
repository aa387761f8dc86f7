"""Invertible layers. Every class follows the contract of :mod:`stableflows.transforms.base`."""
from .base import *  # noqa: F401,F403
from .coupling import MASKS, AdditiveCoupling, AffineCoupling, Coupling  # noqa: F401
from .elementwise import Logit  # noqa: F401
from .linear import PERMUTATIONS, Invertible1x1, Permutation  # noqa: F401
from .nets import MLP, GlowCNN  # noqa: F401
from .normalization import ActNorm  # noqa: F401
from .reshape import Squeeze, as_event_shape  # noqa: F401
from .scales import SCALES, Scale, make_scale  # noqa: F401
