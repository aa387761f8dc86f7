"""Command-line flags generated from the config dataclasses, and the config they produce.

Every field of :class:`ModelConfig`, :class:`DataConfig` and :class:`TrainConfig` becomes one flag:
``steps_per_level`` -> ``--steps-per-level``, ``DataConfig.name`` -> ``--data``, booleans as
``--x/--no-x``, optional fields accept ``none``. A flag given on the command line overrides the
config file (``--config run.toml``), which overrides the defaults (or, with ``--resume``, the
config stored in the checkpoint).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from ..config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, load_config

__all__ = ["SECTIONS", "HELP", "flag_for", "add_config_arguments", "config_from_args"]

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
FLAG_OVERRIDES = {("data", "name"): "data"}  # (section, field) -> flag name without dashes
NONE_WORDS = ("none", "null")
RESERVED_FLAGS = ("config", "resume", "overwrite", "help")  # flags of the commands themselves
METAVARS = {"model.model": "NAME", "data.name": "NAME", "data.data_dir": "DIR", "train.out_dir": "DIR",
            "train.device": "DEVICE", "train.time_budget": "SECONDS",
            "train.objective": "KIND", "model.head": "KIND", "model.block": "KIND"}

# One help string per config field ("section.field"); tests check it is complete.
HELP: dict[str, str] = {
    # model
    "model.model": "model family: glow | realnvp | nice | cv_glow (constant-volume Glow) | resflow | iresnet | "
                   "classifier (invertible classifier, --objective classification) | hybrid (flow + classifier "
                   "head, --objective hybrid) | cinn (conditional Glow of p(x | label), labelled data)",
    "model.hidden": "hidden width (channels of CNN conditioners, units of MLP conditioners / residual blocks)",
    "model.levels": "multi-scale levels of image flows (squeeze -> steps -> split per level)",
    "model.steps_per_level": "flow steps (or residual blocks) per level",
    "model.coupling": "coupling layer: affine (scale and shift) | additive (shift only, volume preserving) | "
                      "spline (monotone rational-quadratic spline on [-5, 5], 8 bins, identity outside) | "
                      "default (the model's own: affine for glow / hybrid; additive for classifier: Lip(F) and "
                      "Lip(F^-1) of additive blocks have global bounds, of affine blocks only local ones, poster 001)",
    "model.scale": "scale parameterisation of affine coupling: exp | sigmoid (Glow's sigma(s+2)) | "
                   "biased_sigmoid (sigma(s)+eps) | bounded (a+(b-a)sigma(s)) | tanh_clamp | atan_clamp (soft-clamped exp)",
    "model.permutation": "channel mixing between couplings: lu (LU-decomposed 1x1 conv / linear) | conv1x1 "
                         "(plain 1x1 conv) | reverse | shuffle (fixed random) | none",
    "model.mask": "coupling mask: channel (split channels in half) | checkerboard (alternating pixels)",
    "model.logit_alpha": "logit pre-transform y = logit(alpha + (1 - 2 alpha) v) of the dequantised data v in [0, 1); "
                         "its log-det counts in bits/dim; 0 disables it; not given: the model's own, "
                         "0.003 for flows and hybrid, 0 for classifier (its FD penalty leaves the logit's domain)",
    "model.split_prior": "use Glow's learned conditional Gaussian prior for the channels factored out at each split",
    "model.base": "base distribution p_Z of flows: normal (N(0, I)) | diag_normal (Gaussian with learned mean and "
                  "scale per latent entry) | mixture (--base-components Gaussians, learned weights, means and scales)",
    "model.base_components": "number of Gaussians of --base mixture",
    "model.context_features": "cinn: size of the context vector of the conditional couplings (not given: "
                              "--n-classes, the one-hot class labels of the data)",
    "model.actnorm": "put an ActNorm layer (data-dependent initialisation) at the start of every flow step; "
                     "not given: on, except residual flows on 2-D toys (their blocks then see the data's own scale)",
    "model.split_condition": "glow: which half of the last coupling before each split is its conditioner input: "
                             "kept (the half that continues, Glow's code) | factored (the factored-out half, "
                             "Daniels 2019 Fig. 2: the noise feeds the next coupling's conditioner when sampling)",
    "model.split_shuffle": "glow: a fixed random channel permutation between each level's last coupling and its "
                           "split (Daniels' randomized splits)",
    "model.scale_floor": "glow / realnvp: lower bound of the scale: eps of biased_sigmoid (default 0.5), a of bounded "
                         "(default 0.5); not given: the default",
    "model.coeff": "residual flows: Lipschitz coefficient c < 1 enforced on each residual branch by spectral "
                   "normalisation; not given: 0.98 (resflow, hybrid), 0.9 (iresnet)",
    "model.activation": "residual flows: Lipschitz-1 activation lipswish | elu | softplus; not given: lipswish "
                        "(resflow, hybrid), elu (iresnet)",
    "model.estimator": "residual flows: log-det estimator exact (brute force, small D) | series (truncated "
                       "power series, i-ResNet) | roulette (unbiased Russian roulette, Residual Flows); "
                       "not given: roulette (resflow, hybrid), series (iresnet)",
    "model.n_exact_terms": "residual flows: power-series terms always computed before the Russian roulette",
    "model.n_series_terms": "residual flows: terms of the truncated log-det power series (i-ResNet)",
    "model.n_power_iter": "residual flows: minimum power iterations per spectral-norm update (continued adaptively); "
                          "not given: 1 (resflow, iresnet), 5 (hybrid)",
    "model.neumann_grad": "residual flows: estimate the log-det gradient with the Neumann series (saves memory)",
    "model.grad_in_forward": "residual flows: compute the log-det gradient during the forward pass (saves memory)",
    "model.fc_blocks": "residual flows: fully connected residual blocks appended after the convolutional ones",
    "model.factor_out": "residual flows: factor out half the channels at each level (multi-scale)",
    "model.squeeze_first": "residual flows on images: squeeze before the first scale (002's ImageNet architecture; "
                           "every block at half the height and width, a quarter of the convolution cost)",
    "model.norm": "residual flows: normalisation of weights: spectral (2-norm) | inf (induced infinity-norm) | "
                  "one (induced 1-norm) | mixed (induced mixed p->q norms with learned orders in (1.5, 2.5), vectors)",
    "model.n_classes": "classifier / hybrid: number of classes of the head",
    "model.head": "classifier / hybrid: head on the latent: linear | mlp | bn_relu (flatten, BatchNorm, ReLU, "
                  "linear) | conv (3x3 conv, ReLU, global average pool, linear)",
    "model.head_hidden": "classifier / hybrid: hidden width of the mlp and conv heads",
    "model.block": "hybrid: blocks of the flow: residual (i-ResNet) | coupling | coupling_1x1 (1x1 conv + coupling)",
    "model.lam": "hybrid: weight lambda of -log p(x) (nats) next to the cross-entropy, "
                 "loss = lambda (-log p(x)) - log p(y|x); 1/D weighs the density per dimension, 0 is a classifier",
    "model.memory_saving": "classifier / hybrid: memory-saving gradients: keep only the flow's output and "
                           "recompute the activations by inversion in the backward pass (memory flat in depth)",
    "model.n_samples": "residual flows: Hutchinson probe vectors per block and example for the stochastic log-det",
    "model.dist": "residual flows: distribution of the Russian-roulette number of terms: geometric | poisson",
    "model.p": "residual flows: parameter of the Russian-roulette distribution (geometric: probability, poisson: mean); 0 = default",
    "model.probe": "residual flows: Hutchinson probe distribution: gaussian | rademacher",
    "model.eval_exact_terms": "residual flows: exact power-series terms of the roulette estimator in evaluation mode (paper: 20)",
    "model.mlp_layers": "residual flows: normalised linear layers per residual branch of vector models",
    "model.fc_hidden": "residual flows: width of the fully connected blocks after the last scale (0: same as --hidden)",
    "model.power_atol": "residual flows: adaptive power iteration, stop when sigma changes by less than atol + rtol * sigma "
                        "(one device read per iteration); none: exactly --n-power-iter iterations per step",
    "model.power_rtol": "residual flows: relative tolerance of the adaptive power iteration (see --power-atol)",
    "model.max_power_iter": "residual flows: cap on power iterations per training step (at least --n-power-iter run)",
    "model.inverse_atol": "residual flows: absolute tolerance of the fixed-point inverse of every block",
    "model.inverse_rtol": "residual flows: relative tolerance of the fixed-point inverse of every block",
    "model.inverse_max_iter": "residual flows: iteration cap of the fixed-point inverse (unconverged inverses are recorded)",
    "model.strict": "residual flows: raise InverseNotConverged when a fixed-point inverse misses its tolerance",
    # data
    "data.name": "dataset: digits (embedded 8x8, 17 levels) | moons | circles | 8gaussians | checkerboard | "
                 "pinwheel | rings (2-D toys) | mnist | fashion-mnist | cifar10 | svhn (local files under --data-dir)",
    "data.data_dir": "directory holding the local files of mnist / fashion-mnist / cifar10 / svhn (nothing is downloaded)",
    "data.flatten": "give images to the model as vectors (B, D) instead of (B, C, H, W)",
    "data.val_size": "fraction of the training split held out for validation and model selection (never the test split)",
    "data.n_toy": "number of samples drawn from a 2-D toy density",
    # train
    "train.steps": "maximum number of optimizer steps (training stops at --steps or --time-budget, whichever first)",
    "train.time_budget": "maximum seconds of training time (evaluation time not counted); none = no limit",
    "train.batch_size": "examples per training batch",
    "train.lr": "peak learning rate of AdamW",
    "train.weight_decay": "decoupled weight decay of AdamW",
    "train.warmup": "steps of linear learning-rate warm-up from lr/warmup to lr (0 disables)",
    "train.grad_clip": "clip the global gradient norm to this value (0 disables; the norm is logged either way)",
    "train.ema_decay": "decay of the exponential moving average of the weights used for evaluation (0 disables)",
    "train.eval_every": "steps between validation evaluations (and checkpoints); also evaluated at the end",
    "train.seed": "random seed of initialisation, batch order, dequantisation noise and the validation split",
    "train.out_dir": "run directory for config.yaml, metrics.jsonl, metrics.json, best.pt, last.pt, samples.png and "
                     "curve.png; none = a new runs/<model>-<data>-<UTC time>; one holding a run is refused "
                     "without --resume or --overwrite",
    "train.device": "auto (CUDA when available) | cpu | cuda | cuda:N",
    "train.threads": "CPU threads of PyTorch (torch.set_num_threads); none = PyTorch's default",
    "train.progress": "a progress bar when stderr is a terminal (its total is the step at which --steps or "
                      "--time-budget stops the run), one line every --log-every seconds when stdout is not",
    "train.log_every": "seconds between progress lines (step, loss, bits/dim, steps/s, ETA) when stdout is not a "
                       "terminal",
    "train.compile": "torch.compile the model (log_prob, forward, inverse) after its initialisation; the first "
                     "steps compile (minutes on a CPU), later ones run the compiled code",
    "train.objective": "likelihood (bits/dim of a flow) | classification (cross-entropy of a classifier, "
                       "optionally with FD / NF regularisers) | hybrid (lambda (-log p(x)) - log p(y|x)); "
                       "classification and hybrid need labels and --model classifier or hybrid",
    "train.label_smoothing": "classification / hybrid: label smoothing of the cross-entropy, in [0, 1)",
    "train.fd_forward": "classification / hybrid: weight of the forward finite-difference penalty "
                        "||F(x + eps d) - F(x)||^2 / eps^2 (one random unit direction d per example); 0 disables",
    "train.fd_inverse": "classification / hybrid: weight of the inverse finite-difference penalty "
                        "||F^-1(z + eps d) - F^-1(z)||^2 / eps^2 at z = F(x); 0 disables",
    "train.fd_eps": "finite-difference step eps of --fd-forward / --fd-inverse",
    "train.fd_every": "apply the finite-difference penalties every k-th step",
    "train.fd_mode": "fd (finite differences; a row that explodes at the moved point enters through log1p of its "
                     "penalty at a halved step) | jvp (the exact ||J d||^2 by double backward, stored activations)",
    "train.nf_weight": "classification: weight of the normalizing-flow objective (bits/dim, nats/dim on "
                       "continuous data) as a regulariser; 0 disables",
    "train.angle_every": "memory saving: every k steps also compute the stored-activation gradient and log the "
                         "angle between the two (grad_check records in metrics.jsonl); 0 never",
    "train.fallback": "memory saving: use the stored-activation gradient for a step whose memory-saving gradient "
                      "is non-finite or, on a checked step, off by more than --max-angle / --max-rel-error (logged)",
    "train.max_angle": "memory saving: gradient angle in degrees above which --fallback uses stored activations",
    "train.max_rel_error": "memory saving: relative gradient error ||g_ms - g|| / ||g|| above which --fallback "
                           "uses stored activations",
}


def flag_for(section: str, name: str) -> str:
    return FLAG_OVERRIDES.get((section, name), name.replace("_", "-"))


def _dest(section: str, name: str) -> str:
    return f"cfg.{section}.{name}"


def _base_type(cls, name: str) -> tuple[type, bool]:
    """``(scalar type, optional)`` of a dataclass field from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    if args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"config field {cls.__name__}.{name} has an unsupported type {hint}")
        return rest[0], True
    return hint, False


def _parser_for(kind: type, optional: bool, flag: str):
    def parse(text: str):
        if optional and text.lower() in NONE_WORDS:
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f"{' or none' if optional else ''}, got {text!r}") from None

    parse.__name__ = {int: "integer", float: "number", str: "string"}.get(kind, kind.__name__)
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, in one argument group per section; plus ``--config``."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML (.toml) or YAML (.yaml/.yml) file with sections [model], [data], [train]; "
                             "flags given on the command line override it")
    seen: dict[str, str] = {name: "" for name in RESERVED_FLAGS}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options ([{section}] in a config file)")
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = flag_for(section, f.name)
            if flag in seen:  # a future field named like one of another section
                flag = f"{section}-{flag}"
            seen[flag] = f"{section}.{f.name}"
            kind, optional = _base_type(cls, f.name)
            default = getattr(defaults, f.name)
            text = HELP.get(f"{section}.{f.name}", f"{section}.{f.name}")
            text = f"{text} (default: {default!r})".replace("%", "%%")
            if kind is bool:
                group.add_argument(f"--{flag}", dest=_dest(section, f.name), action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(f"--{flag}", dest=_dest(section, f.name), default=argparse.SUPPRESS,
                                   type=_parser_for(kind, optional, flag), help=text,
                                   metavar=METAVARS.get(f"{section}.{f.name}", {int: "N", float: "X"}.get(kind, "STR")))


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of the config flags given on the command line."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in vars(args).items():
        if key.startswith("cfg."):
            _, section, name = key.split(".", 2)
            out[section][name] = value
    return out


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """``base`` (default: defaults) <- ``--config`` file <- command-line flags."""
    cfg = base if base is not None else RunConfig()
    if getattr(args, "config", None):
        cfg = load_config(Path(args.config))
    for section, changes in overrides(args).items():
        if changes:
            cfg = cfg.replace(section, **changes)
    return cfg


def stored_config(out_dir: str | Path) -> RunConfig:
    """The config stored in ``out_dir/last.pt`` (for ``train --resume`` without ``--config``)."""
    import warnings

    from ..train.checkpoint import CheckpointError, load_checkpoint
    from ..train.loop import RunNote, no_checkpoint_message
    from ..train.rundir import recover

    path = Path(out_dir) / "last.pt"
    for note in recover(out_dir):
        warnings.warn(note, RunNote, stacklevel=2)
    if not path.exists():
        raise CheckpointError(no_checkpoint_message(Path(out_dir)), path)
    stored = load_checkpoint(path).get("config")
    if not isinstance(stored, dict):
        raise CheckpointError("checkpoint stores no config", path)
    try:
        return RunConfig.from_dict(stored)
    except ConfigError as e:
        raise CheckpointError(f"the stored config is unreadable: {e}", path) from e
