"""stableflows' own contenders and the registry of every benchmarked model.

``CONTENDERS``: name -> builder ``(hidden: int | None, preprocess: str, shape=EVENT_SHAPE) -> Contender``
(``shape``: the task's event shape, :data:`~.contender.TASKS`). Names are
``library-model``. The peer libraries' builders live in :mod:`.peers` and are listed only when
the library imports. :data:`REFERENCE` (stableflows' Glow at its default width) fixes the
parameter count the other contenders are matched to.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from torch import Tensor, nn

from ..config import ModelConfig
from .contender import EVENT_SHAPE, LOGIT_ALPHA, PREPROCESS, Contender, match_hidden

__all__ = ["CONTENDERS", "REFERENCE", "DEFAULT_HIDDEN", "available", "build", "stableflows_config",
           "reference_params"]

REFERENCE = "stableflows-glow"
DEFAULT_HIDDEN = 128  # stableflows' Glow of configs/demo.toml (2 levels x 4 steps): the reference size


def stableflows_config(model: str, hidden: int, preprocess: str) -> ModelConfig:
    """The :class:`ModelConfig` of a stableflows contender (2 levels x 4 steps/blocks; 8x8 digits and
    28x28 images both squeeze twice: 8 -> 4 -> 2, 28 -> 14 -> 7)."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    alpha = LOGIT_ALPHA if preprocess == "logit" else 0.0
    cfg = ModelConfig(model=model, hidden=hidden, levels=2, steps_per_level=4, logit_alpha=alpha)
    if model == "realnvp":
        cfg = dataclasses.replace(cfg, scale="exp", mask="checkerboard")
    if model == "splineglow":  # the Glow above with rational-quadratic spline couplings
        cfg = dataclasses.replace(cfg, model="glow", coupling="spline")
    if model == "resflow":  # the vector model of configs/resflow_digits.toml: 8 FC blocks on 64-d inputs
        cfg = dataclasses.replace(cfg, levels=1, steps_per_level=8, n_power_iter=1)
    return cfg


FLATTEN = {"resflow"}  # contenders trained on flattened images (as configs/resflow_digits.toml)


def _stableflows(model: str, family: str, description: str) -> Callable[..., Contender]:
    def build(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
        from ..models.registry import build_model

        h = DEFAULT_HIDDEN if hidden is None else hidden
        flat = model in FLATTEN
        image = tuple(shape)
        flow = build_model(stableflows_config(model, h, preprocess), (math.prod(image),) if flat else image)

        def _in(v: Tensor) -> Tensor:
            return v.flatten(1) if flat else v

        def log_prob(m: nn.Module, v: Tensor) -> Tensor:
            return m.log_prob(_in(v))

        def forward(m: nn.Module, v: Tensor) -> Tensor:
            return m(_in(v))[0]

        def inverse(m: nn.Module, z: Tensor) -> Tensor:
            x = m.inverse(z)[0]
            return x.view(-1, *image) if flat else x

        return Contender(name=f"stableflows-{model}", library="stableflows", family=family, module=flow,
                         log_prob=log_prob, forward=forward, inverse=inverse, hidden=h, description=description)

    return build


def _has_model(name: str) -> bool:
    from ..models.registry import MODELS, _load_optional

    _load_optional()
    return name in MODELS


CONTENDERS: dict[str, Callable[..., Contender]] = {
    "stableflows-glow": _stableflows("glow", "glow-like", "2 levels x 4 steps [ActNorm, LU 1x1 conv, affine "
                                     "coupling sigma(s+2)], learned split prior, logit"),
    "stableflows-realnvp": _stableflows("realnvp", "realnvp-like", "2 levels x 4 affine couplings (exp scale, "
                                        "checkerboard), ActNorm, logit"),
    "stableflows-splineglow": _stableflows("splineglow", "spline", "the Glow with rational-quadratic spline "
                                           "couplings (8 bins on [-5, 5], identity outside), learned split prior, logit"),
    "stableflows-resflow": _stableflows("resflow", "residual", "8 fully connected residual blocks on flattened "
                                        "digits (LipSwish, spectral norm c=0.98, Russian roulette), logit"),
}
_OPTIONAL = {"stableflows-resflow": "resflow"}  # contender -> stableflows model it needs


def available() -> dict[str, Callable[..., Contender]]:
    """Every contender that can be built here (stableflows' and those of the peers that import)."""
    from . import peers

    out = {k: v for k, v in CONTENDERS.items() if k not in _OPTIONAL or _has_model(_OPTIONAL[k])}
    out.update(peers.available())
    return out


def reference_params(preprocess: str = "logit", shape=EVENT_SHAPE) -> int:
    return CONTENDERS[REFERENCE](None, preprocess, shape=shape).n_params


def build(name: str, *, hidden: int | None = None, match: int | None = None, preprocess: str = "logit",
          shape=EVENT_SHAPE) -> Contender:
    """Build contender ``name`` for event ``shape`` at width ``hidden``, or at the width whose parameter
    count is closest to ``match`` (``hidden`` and ``match`` both None: the contender's default width)."""
    table = available()
    if name not in table:
        raise KeyError(f"unknown or unavailable contender {name!r}; available: {', '.join(table)}")
    builder = table[name]
    shape = tuple(shape)
    if hidden is None and match is not None:
        hidden = match_hidden(lambda h: builder(h, preprocess, shape=shape), match)
    return builder(hidden, preprocess, shape=shape)
