"""Conformance entries for residual blocks (i-ResNet / Residual Flow), tiny sizes.

The conformance checks are exact in float64, so these blocks use the brute-force log-det
(``estimator="exact"``) and a fixed-point inverse converged to 1e-13; ``coeff`` is small so that
the blocks stay contractive after the test perturbs every parameter.
"""
from registry import Entry
from stableflows.transforms.residual import ResidualBlock, conv_lipschitz, mlp_lipschitz

EXACT = dict(estimator="exact", inverse_atol=1e-13, inverse_rtol=0.0, max_iter=2000)
COEFF = 0.7


def _mlp_block(dim, **kw):
    return lambda: ResidualBlock(mlp_lipschitz(dim, 8, coeff=COEFF, **kw), **EXACT)


def _conv_block(shape, **kw):
    c, h, w = shape
    return lambda: ResidualBlock(conv_lipschitz(c, 4, coeff=COEFF, input_shape=(h, w), **kw), **EXACT)


ENTRIES = {
    "resblock_mlp_lipswish": Entry(build=_mlp_block(4), shape=(4,)),
    "resblock_mlp_elu_inf": Entry(build=_mlp_block(3, activation="elu", norm="inf"), shape=(3,)),
    "resblock_mlp_softplus_preact": Entry(build=_mlp_block(5, activation="softplus", preact=True, n_layers=2),
                                          shape=(5,)),
    "resblock_conv_lipswish": Entry(build=_conv_block((2, 3, 3)), shape=(2, 3, 3)),
    "resblock_conv_inf": Entry(build=_conv_block((1, 3, 3), norm="inf", activation="elu"), shape=(1, 3, 3)),
}
