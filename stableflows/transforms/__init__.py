"""Invertible layers. Every class follows the contract of :mod:`stableflows.transforms.base`."""
from .base import *  # noqa: F401,F403
from .coupling import MASKS, AdditiveCoupling, AffineCoupling, Coupling  # noqa: F401
from .elementwise import Logit  # noqa: F401
from .linear import PERMUTATIONS, Invertible1x1, Permutation  # noqa: F401
from .nets import MLP, GlowCNN  # noqa: F401
from .normalization import ActNorm  # noqa: F401
from .reshape import Squeeze, as_event_shape  # noqa: F401
from .scales import SCALES, Scale, make_scale  # noqa: F401
from .multiscale import ElementwiseAffine, Flatten, MultiScale, SplitPrior  # noqa: F401
from .activations import ACTIVATIONS, ELU, LipSwish, Softplus, make_activation  # noqa: F401
from .lipschitz import (NORMS, LipschitzConv2d, LipschitzLinear, SpectralConv2d, SpectralLinear,  # noqa: F401
                        compute_lipschitz_exact, frozen_normalization, lipschitz_bound, operator_matrix,
                        power_iteration_buffers, refresh_normalization, RefreshOnEval)
from .residual import (InverseNotConvergedWarning, NotContractiveError, ResidualBlock,  # noqa: F401
                       conv_lipschitz, mlp_lipschitz)
