"""Frozen configuration dataclasses. The CLI maps onto their fields; every checkpoint stores them.

A run is described by :class:`RunConfig` = model + data + train sections. A config file (TOML or
YAML) has the same three sections::

    [model]
    model = "glow"
    hidden = 64
    [data]
    name = "digits"
    [train]
    steps = 2000
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .transforms.base import StableflowsError
from .transforms.elementwise import DEFAULT_LOGIT_ALPHA  # the measured default (see there)

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "RunConfig", "ConfigError", "load_config",
           "DEFAULT_LOGIT_ALPHA"]



class ConfigError(StableflowsError, ValueError):
    """An unknown option, a value of the wrong type, or an unreadable config file."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Each factory in :mod:`stableflows.models` reads the fields it accepts."""

    model: str = "glow"  # glow | realnvp | nice | cv_glow | resflow | iresnet | cinn | ...
    hidden: int = 64  # width of conditioner / residual-block hidden layers
    levels: int = 2  # multi-scale levels (images)
    steps_per_level: int = 4  # flow steps (or residual blocks) per level
    # None: the model's own (glow, realnvp, hybrid: affine; classifier: additive) | affine | additive | spline
    coupling: str | None = None
    scale: str = "sigmoid"  # exp | sigmoid | biased_sigmoid | bounded | tanh_clamp | atan_clamp
    permutation: str = "lu"  # lu | conv1x1 | reverse | shuffle
    mask: str = "channel"  # channel | checkerboard
    # logit pre-transform alpha (0 disables it); None: the model's own, DEFAULT_LOGIT_ALPHA (measured: see above)
    # for density models, 0 for classifier (its FD penalty moves inputs outside the logit's domain)
    logit_alpha: float | None = None
    split_prior: bool = True  # Glow's learned conditional prior for factored-out channels
    actnorm: bool | None = None  # None: the model's default (on; off for residual flows on 2-D toys)
    split_condition: str = "kept"  # glow: which half conditions the last coupling before a split: kept | factored
    split_shuffle: bool = False  # glow: fixed random channel permutation between a level and its split
    scale_floor: float | None = None  # lower bound of biased_sigmoid (eps) / bounded (a) scales; None: default
    base: str = "normal"  # base distribution of flows: normal (N(0, I)) | diag_normal | mixture (learned parameters)
    base_components: int = 10  # Gaussians of the mixture base
    context_features: int | None = None  # cinn: size of the context vector; None: n_classes (one-hot labels)
    # residual flows. None = "not given": the model's default (resflow / hybrid: 0.98, lipswish,
    # roulette, 1 / 5 power iterations; iresnet: 0.9, elu, series, 1)
    coeff: float | None = None  # Lipschitz coefficient c of spectral normalisation
    activation: str | None = None  # lipswish | elu | softplus
    estimator: str | None = None  # exact | series | roulette
    n_exact_terms: int = 2
    n_series_terms: int = 5  # truncated series length (i-ResNet)
    n_power_iter: int | None = None
    neumann_grad: bool = True
    grad_in_forward: bool = True
    fc_blocks: int = 0
    factor_out: bool = False
    squeeze_first: bool = False  # residual flows on images: squeeze before the first scale (002's ImageNet models)
    norm: str = "spectral"  # spectral | inf (induced infinity-norm)
    # invertible classifiers and hybrid models (models "classifier", "hybrid")
    n_classes: int = 10  # classes of the head
    head: str = "linear"  # linear | mlp | bn_relu | conv
    head_hidden: int = 128  # hidden width of the mlp / conv heads
    block: str = "residual"  # hybrid blocks: residual | coupling | coupling_1x1
    lam: float = 1.0  # hybrid: weight of -log p(x) (nats) next to the cross-entropy
    memory_saving: bool = False  # recompute activations by inversion in the backward pass
    n_samples: int = 1  # Hutchinson probes per block (roulette / series)
    dist: str = "geometric"  # geometric | poisson: number of terms of the Russian roulette
    p: float = 0.0  # roulette: geometric success probability / Poisson mean (0: the estimator default)
    probe: str = "gaussian"  # gaussian | rademacher Hutchinson probes
    eval_exact_terms: int = 20  # exact terms of the roulette estimator in evaluation mode (paper: 20)
    mlp_layers: int = 3  # normalised linear layers per residual branch of vector models
    fc_hidden: int = 0  # width of the fully connected blocks after the last scale (0: hidden)
    # None: n_power_iter iterations per step, no device read; a number: adaptive, stops when sigma
    # changes by < atol + rtol * sigma (one device read per iteration)
    power_atol: float | None = None
    power_rtol: float | None = None
    max_power_iter: int = 100  # cap of the power iteration per training step
    inverse_atol: float = 1e-6  # fixed-point inverse of residual blocks: tolerances and iteration cap
    inverse_rtol: float = 1e-6
    inverse_max_iter: int = 500
    strict: bool = False  # raise InverseNotConverged instead of recording an unconverged inverse


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | svhn | moons | checkerboard ...
    data_dir: str | None = None  # directory of local dataset files (never downloaded)
    flatten: bool = False  # images as vectors (B, D) instead of (B, C, H, W)
    val_size: float = 0.1  # fraction of the training split held out for validation
    n_toy: int = 20000  # samples of a 2-D toy density


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    time_budget: float | None = None  # seconds of training; stops at whichever comes first
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW)
    warmup: int = 100  # linear learning-rate warm-up steps
    grad_clip: float = 50.0  # gradient-norm clipping (0 disables)
    ema_decay: float = 0.999  # Polyak average of the weights used for evaluation (0 disables)
    eval_every: int = 200
    seed: int = 0
    out_dir: str | None = None  # None: a new runs/<model>-<data>-<UTC time> per run
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads
    progress: bool = True
    log_every: float = 30.0  # seconds between progress lines when stdout is not a terminal
    compile: bool = False  # torch.compile the model's entry points after initialisation (Flow.compile)
    # objective (stableflows.train.supervised.make_objective for classification / hybrid)
    objective: str = "likelihood"  # likelihood | classification | hybrid
    label_smoothing: float = 0.0
    fd_forward: float = 0.0  # weight of the forward finite-difference penalty (0 disables)
    fd_inverse: float = 0.0  # weight of the inverse finite-difference penalty (0 disables)
    fd_eps: float = 0.1  # finite-difference step; the penalty is ||F(x + eps d) - F(x)||^2 / eps^2
    fd_every: int = 10  # apply the FD penalties every k-th step
    fd_mode: str = "fd"  # fd (finite differences, exploding rows through a bounded surrogate) | jvp (exact ||J d||^2)
    nf_weight: float = 0.0  # weight of the normalizing-flow objective (bits/dim) as a regulariser
    # memory-saving gradients: check against stored activations (stableflows.memory.GradientGuard)
    angle_every: int = 0  # log the gradient angle every k steps (0: never)
    fallback: bool = False  # use stored activations for a step whose memory-saving gradient is off
    max_angle: float = 1.0  # degrees: a larger angle counts as off
    max_rel_error: float = 0.05  # ||g_ms - g_stored|| / ||g_stored|| above this counts as off


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping with sections model/data/train, got {type(d).__name__}")
        unknown = set(d) - {"model", "data", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected model, data, train")
        return cls(
            model=_section(ModelConfig, d.get("model", {}), "model"),
            data=_section(DataConfig, d.get("data", {}), "data"),
            train=_section(TrainConfig, d.get("train", {}), "train"),
        )

    def replace(self, section: str, **changes: Any) -> "RunConfig":
        """A copy with fields of one section changed (fields are checked)."""
        cur = getattr(self, section)
        return dataclasses.replace(self, **{section: _section(type(cur), {**dataclasses.asdict(cur), **changes}, section)})


def _coerce(value: Any, default: Any, name: str) -> Any:
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"option {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"option {name} must be a string, got {value!r}")
    return value


_TYPE_EXAMPLES = {bool: False, int: 0, float: 0.0, str: ""}


def _example(cls, name: str, default: Any) -> Any:
    """A value of the field's type: the default, or for an optional field whose default is None a
    value of the annotated type (so ``coeff = "x"`` is refused like any other ill-typed value)."""
    if default is not None:
        return default
    hint = typing.get_type_hints(cls)[name]
    rest = [a for a in typing.get_args(hint) if a is not type(None)]
    return _TYPE_EXAMPLES.get(rest[0]) if len(rest) == 1 else None


def _section(cls, values: dict[str, Any], section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section [{section}] must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} in section [{section}]; known: {sorted(known)}"
        )
    defaults = cls()
    out = {k: _coerce(v, _example(cls, k, getattr(defaults, k)), f"{section}.{k}") for k, v in values.items()}
    return cls(**out)


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file into a :class:`RunConfig`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            d = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {p} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    return RunConfig.from_dict(d)
