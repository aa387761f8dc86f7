"""Conformance entries for the residual-flow model factories (``resflow``, ``iresnet``), tiny sizes.

The checks are exact in float64, so every block uses the brute-force log-det (``estimator="exact"``)
and a fixed-point inverse converged to 1e-13; ``coeff`` is small so that the blocks stay
contractive after the test perturbs every parameter.
"""
from registry import Entry
from stableflows.models.residual import iresnet, resflow

EXACT = dict(estimator="exact", inverse_atol=1e-13, inverse_rtol=0.0, inverse_max_iter=2000, coeff=0.7)
IMG = (1, 4, 4)

ENTRIES = {
    "resflow_vec": Entry(build=lambda: resflow(shape=(3,), levels=1, steps_per_level=2, hidden=6, **EXACT),
                         shape=(3,), domain="unit"),
    "resflow_toy2d_inf": Entry(build=lambda: resflow(shape=(2,), levels=1, steps_per_level=2, hidden=5, norm="inf",
                                                     **EXACT), shape=(2,)),
    "resflow_toy2d_mixed": Entry(build=lambda: resflow(shape=(2,), levels=1, steps_per_level=2, hidden=5,
                                                       norm="mixed", **EXACT), shape=(2,)),
    "resflow_img": Entry(build=lambda: resflow(shape=IMG, levels=2, steps_per_level=1, hidden=3, **EXACT),
                         shape=IMG, domain="unit", gradcheck=False),
    "resflow_img_factor_out_fc": Entry(
        build=lambda: resflow(shape=IMG, levels=2, steps_per_level=1, hidden=3, factor_out=True, fc_blocks=1,
                              fc_hidden=4, **EXACT), shape=IMG, domain="unit", gradcheck=False),
    "resflow_img_squeeze_first": Entry(
        build=lambda: resflow(shape=IMG, levels=2, steps_per_level=1, hidden=3, squeeze_first=True, **EXACT),
        shape=IMG, domain="unit", gradcheck=False),
    "iresnet_vec": Entry(build=lambda: iresnet(shape=(4,), levels=1, steps_per_level=2, hidden=6, **EXACT),
                         shape=(4,), domain="unit"),
    "iresnet_img_no_actnorm": Entry(
        build=lambda: iresnet(shape=IMG, levels=2, steps_per_level=1, hidden=3, actnorm=False, **EXACT),
        shape=IMG, domain="unit", gradcheck=False),
}
