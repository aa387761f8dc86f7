"""``MODELS``: name -> factory, and :func:`build_model` from a :class:`~stableflows.config.ModelConfig`."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

from ..config import ConfigError, ModelConfig
from . import factories

__all__ = ["MODELS", "register_model", "build_model"]

MODELS: dict[str, Callable] = {
    "glow": factories.glow,
    "realnvp": factories.realnvp,
    "nice": factories.nice,
    "cv_glow": factories.cv_glow,
}


def register_model(name: str, factory: Callable) -> None:
    MODELS[name] = factory


def build_model(cfg: ModelConfig, shape: Sequence[int]):
    """Build the model ``cfg.model`` for data of event shape ``shape``; the factory receives the
    config fields it accepts that are set (a field left at None means "not given": the factory's
    own default applies, e.g. ``coeff`` 0.98 for ``resflow`` and 0.9 for ``iresnet``, ``coupling``
    affine for ``glow`` and additive for ``classifier``), ``model.base`` is applied to the built flow, and the
    returned flow carries ``cfg`` as ``.config``."""
    _load_optional()
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(sorted(MODELS))}")
    factory = MODELS[cfg.model]
    params = inspect.signature(factory).parameters
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name in params and getattr(cfg, f.name) is not None}  # None: not given, the factory's own
    model = factory(shape=tuple(shape), config=cfg, **kwargs)
    return _with_base(model, cfg)


def _with_base(model, cfg: ModelConfig):
    """Apply ``cfg.base`` (:mod:`stableflows.models.distributions`) to the flow a factory built."""
    if cfg.base == "normal":
        return model
    from .flow import Flow

    if not isinstance(model, Flow):
        raise ConfigError(f"model.base = {cfg.base!r} applies to flows; model {cfg.model!r} keeps N(0, I) "
                          "(use model.base = \"normal\")")
    return model.with_base(cfg.base, components=cfg.base_components)


def _load_optional() -> None:
    """Model families that register themselves on import (residual flows, classifiers)."""
    import importlib

    for mod in ("stableflows.models.residual", "stableflows.models.classifier"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
