"""The training loop: maximum likelihood (or any :class:`Objective`) with AdamW, warm-up,
gradient clipping, an EMA of the weights, validation-based selection and exact resumption.

Per step: a batch from an epoch permutation (``sample`` generator), fresh dequantisation noise
(``noise`` generator), ``loss.backward()``, clip the gradient norm, AdamW step (fused kernel,
:mod:`.optim`) with learning rate
``lr * min(1, (t + 1) / warmup)``, EMA update. Every ``eval_every`` steps and at the end the EMA
weights are evaluated on the validation split with fixed noise (seed 0); the best by validation
metric are written to ``best.pt``, the whole state to ``last.pt``. The test split is evaluated
once, with the selected weights, at the end (never used for selection).

Objective: ``train.objective`` = ``likelihood`` (bits/dim), or ``classification`` / ``hybrid``
(:func:`stableflows.train.supervised.make_objective` with the FD / NF / label-smoothing options; the
model must be a ``classifier`` / ``hybrid`` and the data labelled; weights selected on the validation
error). With ``model.memory_saving`` and ``train.angle_every = k > 0`` (or ``train.fallback``) the
backward pass runs through :class:`stableflows.memory.GradientGuard`: every k-th step the
memory-saving gradient is compared with the stored-activation gradient of the same batch and a
``{"kind": "grad_check", "step", "angle", "rel_error", "nonfinite", "fallback"}`` record is written
to metrics.jsonl; with ``fallback`` a step whose memory-saving gradient is non-finite or off by more
than ``max_angle`` degrees / ``max_rel_error`` uses the stored-activation gradient (also recorded).

Reproducibility: model initialisation uses ``torch.manual_seed(seed)``; batch order and noise come
from two dedicated generators; the global RNG state, both generator states and the current epoch
permutation are stored in ``last.pt``, and evaluation never touches the training random streams,
so ``train(resume=True)`` follows exactly the trajectory of an uninterrupted run.

Several processes (``torchrun --nproc_per_node=N -m stableflows train ...``): data-parallel training
with DistributedDataParallel, ``train.batch_size`` being the global batch; every rank draws the
global batch and noise and keeps its shard, gradients are averaged, evaluation is sharded and
all-reduced, only rank 0 writes, and resuming restores every rank's random state. The parameters
follow the one-process trajectory up to floating-point summation order (:mod:`.distributed`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..metrics import check_levels
from ..transforms.base import InputOutsideDomain, ShapeError, StableflowsError, check_finite, check_shape, validation
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from .distributed import DistEnv, evaluate_sharded, rank_seed
from .distributed import setup as setup_distributed
from .distributed import wrap as wrap_distributed
from .ema import EMA
from .evaluate import EVAL_SEED, evaluate, finite_or_none, frozen_rng, metric_name
from .objectives import Batch, MaximumLikelihood, Objective
from .optim import adamw, load_optimizer_state
from .plots import write_figures

__all__ = ["train", "TrainResult", "TrainingDiverged", "validate_config", "resolve_device", "build_objective",
           "build_guard", "OBJECTIVE_CHOICES", "MAX_CONSECUTIVE_NONFINITE", "INIT_BATCH"]

MAX_CONSECUTIVE_NONFINITE = 20  # abort after this many non-finite steps in a row
INIT_BATCH = 512  # examples of the data-dependent (ActNorm) initialisation forward pass
PROGRESS_EVERY = 10  # steps between progress-bar refreshes
SEED_OFFSETS = {"sample": 1, "noise": 2, "init": 3}  # dedicated generators: seed + offset
# train fields that change the trajectory: a resumed run must keep them
TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "warmup", "grad_clip", "ema_decay", "seed", "objective",
                     "label_smoothing", "fd_forward", "fd_inverse", "fd_eps", "fd_every", "nf_weight",
                     "fallback", "max_angle", "max_rel_error")
INTERMITTENT = ("fd_", "nf_")  # logs of regularizers applied every k steps (averaged over the steps they ran)
OBJECTIVE_CHOICES = ("likelihood", "classification", "hybrid")  # train.objective
SUPERVISED = ("classification", "hybrid")
# options of the supervised objectives (with their "off" values): set with objective = likelihood -> error
SUPERVISED_ONLY = {"fd_forward": 0.0, "fd_inverse": 0.0, "nf_weight": 0.0, "label_smoothing": 0.0}
Callback = Callable[[str, dict], None]


class TrainingDiverged(StableflowsError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """Summary of a run. ``metric`` is the validation metric that selects the weights: ``"bpd"``
    (discrete data) or ``"nll"`` (nats, continuous) for maximum likelihood, ``objective.metric``
    (e.g. ``"error"``) for an objective with its own ``evaluate``."""

    metric: str
    best_val: float  # validation metric of the selected (EMA) weights; nan if never finite
    best_step: int | None
    test: float  # test metric of the selected weights, fixed noise (seed 0)
    steps: int
    train_time: float  # seconds spent in training steps (all sessions of a resumed run)
    eval_time: float  # seconds spent evaluating and checkpointing
    steps_per_s: float  # training steps per second of this session
    peak_rss_mb: float
    nonfinite_steps: int
    out_dir: str
    n_params: int = 0
    test_metrics: dict = dataclasses.field(default_factory=dict)  # every test metric of the objective
    history: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def test_bpd(self) -> float | None:
        return self.test if self.metric == "bpd" else self.test_metrics.get("bpd")

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("history")
        d["test_metrics"] = {k: finite_or_none(v) for k, v in self.test_metrics.items()}
        return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- checks
def validate_config(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range training/data option."""
    t, d = cfg.train, cfg.data
    problems = []
    rules = [
        (t.steps >= 0, f"train.steps must be >= 0, got {t.steps}"),
        (t.time_budget is None or t.time_budget > 0, f"train.time_budget must be > 0 seconds, got {t.time_budget}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (math.isfinite(t.lr) and t.lr > 0, f"train.lr must be a positive number, got {t.lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (t.warmup >= 0, f"train.warmup must be >= 0, got {t.warmup}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must lie in [0, 1), got {t.ema_decay}"),
        (t.eval_every >= 1, f"train.eval_every must be >= 1, got {t.eval_every}"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
         f"train.device must be auto, cpu or cuda[:i], got {t.device!r}"),
        (t.threads is None or t.threads >= 1, f"train.threads must be >= 1, got {t.threads}"),
        (bool(t.out_dir), "train.out_dir must not be empty"),
        (0 < d.val_size < 1, f"data.val_size must lie in (0, 1), got {d.val_size}"),
        (t.objective in OBJECTIVE_CHOICES,
         f"train.objective must be one of {', '.join(OBJECTIVE_CHOICES)}, got {t.objective!r}"),
        (t.fd_forward >= 0, f"train.fd_forward must be >= 0 (0 disables), got {t.fd_forward}"),
        (t.fd_inverse >= 0, f"train.fd_inverse must be >= 0 (0 disables), got {t.fd_inverse}"),
        (math.isfinite(t.fd_eps) and t.fd_eps > 0, f"train.fd_eps must be > 0, got {t.fd_eps}"),
        (t.fd_every >= 1, f"train.fd_every must be >= 1, got {t.fd_every}"),
        (t.nf_weight >= 0, f"train.nf_weight must be >= 0 (0 disables), got {t.nf_weight}"),
        (0 <= t.label_smoothing < 1, f"train.label_smoothing must lie in [0, 1), got {t.label_smoothing}"),
        (t.angle_every >= 0, f"train.angle_every must be >= 0 (0: never), got {t.angle_every}"),
        (t.max_angle > 0, f"train.max_angle must be > 0 degrees, got {t.max_angle}"),
        (t.max_rel_error > 0, f"train.max_rel_error must be > 0, got {t.max_rel_error}"),
        (cfg.model.lam >= 0, f"model.lam must be >= 0, got {cfg.model.lam}"),
        (not (t.objective == "hybrid" and t.nf_weight > 0),
         "train.nf_weight applies to the classification objective; the hybrid objective already contains "
         "log p(x): weigh it with model.lam"),
    ]
    if t.objective == "likelihood":
        rules += [(getattr(t, k) == off, f"train.{k} applies to the classification and hybrid objectives only "
                                         f"(train.objective is likelihood)") for k, off in SUPERVISED_ONLY.items()]
    if t.objective in SUPERVISED and t.fd_forward > 0 and cfg.model.logit_alpha > 0:
        rules.append((False, f"train.fd_forward perturbs the input by eps = {t.fd_eps} in a random direction, "
                             f"which can leave the domain of the logit pre-transform (model.logit_alpha = "
                             f"{cfg.model.logit_alpha}, inputs near [0, 1]): set model.logit_alpha = 0 "
                             "(--logit-alpha 0)"))
    if (t.angle_every > 0 or t.fallback) and not cfg.model.memory_saving:
        rules.append((False, "train.angle_every / train.fallback check memory-saving gradients: set "
                             "model.memory_saving = true"))
    problems = [msg for ok, msg in rules if not ok]
    if problems:
        raise ConfigError("invalid options: " + "; ".join(problems))


def build_objective(cfg: RunConfig) -> Objective:
    """The objective ``cfg.train.objective`` names: :class:`MaximumLikelihood`, or
    :func:`stableflows.train.supervised.make_objective` with the FD / NF / label-smoothing options
    (the hybrid weight ``lam`` is the model's, ``model.lam``)."""
    t = cfg.train
    if t.objective not in OBJECTIVE_CHOICES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVE_CHOICES)}, got {t.objective!r}")
    if t.objective == "likelihood":
        return MaximumLikelihood()
    from .supervised import make_objective

    try:
        return make_objective(t.objective, fd_forward=t.fd_forward, fd_inverse=t.fd_inverse, fd_eps=t.fd_eps,
                              fd_every=t.fd_every, nf_weight=t.nf_weight, lam=None,
                              label_smoothing=t.label_smoothing)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_guard(cfg: RunConfig):
    """A :class:`stableflows.memory.GradientGuard` when ``train.angle_every > 0`` or ``train.fallback``,
    else None."""
    t = cfg.train
    if t.angle_every <= 0 and not t.fallback:
        return None
    from ..memory import GradientGuard

    return GradientGuard(every=t.angle_every, max_angle=t.max_angle, max_rel_error=t.max_rel_error,
                         fallback=t.fallback)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return torch.device(name)


def _check_splits(splits, cfg: RunConfig) -> None:
    """Bad data gets a named error before any training."""
    for part in ("train", "val", "test"):
        x = getattr(splits, part)
        what = f"{splits.name} {part} split"
        check_finite(x, what)
        check_shape(x, splits.shape, what)
        if splits.levels is not None:
            check_levels(x, splits.levels, what)
    if splits.train.shape[0] < cfg.train.batch_size:
        raise ConfigError(f"batch size {cfg.train.batch_size} exceeds the {splits.train.shape[0]} "
                          f"training examples of {splits.name}")


def _check_resumable(saved: dict, cfg: RunConfig, path: Path) -> None:
    try:
        old = RunConfig.from_dict(saved)
    except ConfigError as e:
        raise CheckpointError(f"stored config is unreadable: {e}", path) from e
    diffs = []
    for section in ("model", "data"):
        a, b = dataclasses.asdict(getattr(old, section)), dataclasses.asdict(getattr(cfg, section))
        diffs += [f"{section}.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k != "data_dir"]
    a, b = dataclasses.asdict(old.train), dataclasses.asdict(cfg.train)
    diffs += [f"train.{k}: {a[k]!r} -> {b[k]!r}" for k in TRAJECTORY_FIELDS if a[k] != b[k]]
    if diffs:
        raise ConfigError(f"cannot resume {path}: options that change the run differ from the checkpoint "
                          f"({'; '.join(diffs)}); only steps, time_budget, eval_every, device, threads, "
                          "progress and data_dir may change")


def _check_objective(cfg: RunConfig, model: nn.Module, splits, objective: Objective, env: DistEnv) -> None:
    """Objective, model and data fit together (before any training)."""
    from ..memory import has_memory_saving

    kind = getattr(objective, "name", None)
    if kind in SUPERVISED:
        if getattr(splits, "y_train", None) is None or getattr(splits, "y_val", None) is None:
            raise ConfigError(f"train.objective {kind} needs labels, but data set {splits.name} has none "
                              "(use a labelled data set: digits, mnist, fashion-mnist, cifar10, svhn)")
        if not (callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Module)):
            raise ConfigError(f"train.objective {kind} needs a model with a classification head "
                              f"(model classifier or hybrid), got {type(model).__name__}")
        n_classes = getattr(model, "n_classes", None)
        n_labels = int(splits.y_train.max()) + 1
        if n_classes is not None and n_labels > n_classes:
            raise ConfigError(f"data set {splits.name} has labels up to {n_labels - 1}, but the model has "
                              f"model.n_classes = {n_classes}")
    if (cfg.model.memory_saving or cfg.train.angle_every > 0 or cfg.train.fallback) and not has_memory_saving(model):
        raise ConfigError(f"model.memory_saving (and angle_every / fallback) need a model with a memory-saving "
                          f"chain (model classifier or hybrid); {type(model).__name__} has none")
    if env.enabled and (cfg.train.angle_every > 0 or cfg.train.fallback):
        raise ConfigError("train.angle_every / train.fallback are not supported with several processes")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _progress_enabled(cfg: RunConfig) -> bool:
    return cfg.train.progress and sys.stderr.isatty() and not os.environ.get("CI")


def _json_line(record: dict) -> str:
    return json.dumps({k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()})


# ----------------------------------------------------------------------------- trainer
class _Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, splits, objective: Objective,
                 callbacks: Sequence[Callback], device: torch.device, env: DistEnv | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.model, self.splits, self.objective = model, splits, objective
        self.env = env or DistEnv(device=device)
        self.ddp = model  # what the objective sees: the model, or its DDP view (start_distributed)
        self.callbacks = list(callbacks)
        self.device = device
        self.out = Path(cfg.train.out_dir)
        self.levels = splits.levels
        # an objective may bring its own evaluation (e.g. classification error); else bpd / nll
        self.custom_eval = callable(getattr(objective, "evaluate", None)) and bool(getattr(objective, "metric", None))
        self.metric = objective.metric if self.custom_eval else metric_name(splits.levels)
        self.train_x = splits.train.to(device)
        self.train_y = splits.y_train.to(device) if getattr(splits, "y_train", None) is not None else None
        seed = cfg.train.seed
        self.gens = {k: torch.Generator().manual_seed(seed + off) for k, off in SEED_OFFSETS.items()}
        self.perm: Tensor | None = None
        self.pos = 0
        self.step = 0
        self.train_time = self.eval_time = 0.0
        self.best_val, self.best_step = math.inf, None
        self.history: list[dict] = []
        self.accum: dict[str, float] = {}
        self.nonfinite_total = self.nonfinite_run = 0
        self.last_eval_step = -1
        self.last_lr = self.lr()
        self.guard = build_guard(cfg)
        self.grad_checks = self.grad_fallbacks = 0

        self._data_dependent_init()
        self.ema = EMA(model, self.t.ema_decay) if self.t.ema_decay > 0 else None
        self.optimizer = adamw(model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)

    # -------------------------------------------------------------- state
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _data_dependent_init(self) -> None:
        """One forward pass in train mode on up to INIT_BATCH examples (ActNorm initialisation)."""
        g = self.gens["init"]
        n = self.train_x.shape[0]
        idx = torch.randperm(n, generator=g)[:INIT_BATCH].to(self.device)
        x = self.env.shard(self._model_space(self.train_x[idx], g))  # ActNorm pools over ranks
        self.model.train()
        try:
            with torch.no_grad(), frozen_rng(self.device):
                self.model.log_prob(x)
        except InputOutsideDomain as e:
            hint = (" Continuous data (e.g. 2-D toys) are not in [0, 1]: set --logit-alpha 0."
                    if self.levels is None else "")
            raise InputOutsideDomain(f"the model rejects the training data of {self.splits.name}: {e}.{hint}") from e

    def _model_space(self, raw: Tensor, gen: torch.Generator) -> Tensor:
        if self.levels is None:
            return raw
        u = torch.rand(raw.shape, generator=gen, dtype=raw.dtype).to(raw.device)
        return (raw + u) / self.levels  # v = (x + u) / L

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in self.gens.items()}}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.env.enabled:  # collective: every rank's global RNG, for an exact distributed resume
            rng["ranks"] = self.env.gather_objects(torch.get_rng_state())
        return {
            "kind": "last", "config": self.cfg.to_dict(), "shape": list(self.splits.shape),
            "levels": self.levels, "data": self.splits.name, "metric": self.metric,
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "step": self.step,
            "best_val": self.best_val, "best_step": self.best_step,
            "train_time": self.train_time, "eval_time": self.eval_time, "rng": rng,
            "sampler": {"perm": self.perm, "pos": self.pos}, "history": self.history,
            "accum": dict(self.accum), "nonfinite": [self.nonfinite_total, self.nonfinite_run],
            "last_eval_step": self.last_eval_step, "last_lr": self.last_lr,
            "grad_checks": [self.grad_checks, self.grad_fallbacks],
        }

    def load_state(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        if self.ema is not None:
            if not s.get("ema"):
                raise CheckpointError("checkpoint has no EMA state but ema_decay > 0", self.out / "last.pt")
            self.ema.load_state_dict(s["ema"])
        load_optimizer_state(self.optimizer, s["optimizer"])
        self.step = int(s["step"])
        self.best_val, self.best_step = float(s["best_val"]), s["best_step"]
        self.train_time, self.eval_time = float(s["train_time"]), float(s["eval_time"])
        torch.set_rng_state(s["rng"]["torch"])
        ranks = s["rng"].get("ranks")
        if self.env.enabled and ranks is not None and len(ranks) == self.env.world_size:
            torch.set_rng_state(ranks[self.env.rank])
        elif self.env.rank > 0:  # another world size: fresh independent streams
            torch.manual_seed(rank_seed(self.t.seed + self.step, self.env.rank))
        if "cuda" in s["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng"]["cuda"], self.device)
        for k, g in self.gens.items():
            g.set_state(s["rng"][k])
        self.perm, self.pos = s["sampler"]["perm"], int(s["sampler"]["pos"])
        self.history = list(s["history"])
        self.accum = dict(s["accum"])
        self.nonfinite_total, self.nonfinite_run = (int(v) for v in s["nonfinite"])
        self.last_eval_step = int(s["last_eval_step"])
        self.last_lr = float(s["last_lr"])
        self.grad_checks, self.grad_fallbacks = (int(v) for v in s.get("grad_checks", (0, 0)))

    def start_distributed(self) -> None:
        """Wrap the model in DDP (after initialisation and loading; a no-op on one process)."""
        self.ddp = wrap_distributed(self.model, self.env)

    # -------------------------------------------------------------- steps
    def _next_indices(self) -> Tensor:
        b, n = self.t.batch_size, self.train_x.shape[0]
        if self.perm is None or self.pos + b > n:  # new epoch (the incomplete tail is dropped)
            self.perm, self.pos = torch.randperm(n, generator=self.gens["sample"]), 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        return idx.to(self.device)

    def lr(self) -> float:
        """Learning rate of the next step: ``lr * min(1, (t + 1) / warmup)``, ``t`` = steps done."""
        w = self.t.warmup
        return self.t.lr * min(1.0, (self.step + 1) / w) if w > 0 else self.t.lr

    def train_step(self) -> None:
        idx = self._next_indices()
        raw = self.train_x[idx]  # (B, *shape): the global batch, noise drawn for all of it
        x = self._model_space(raw, self.gens["noise"])
        y = self.train_y[idx] if self.train_y is not None else None
        shard = self.env.shard
        batch = Batch(x=shard(x), raw=shard(raw), y=shard(y), levels=self.levels)  # this rank's part
        lr = self.last_lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if callable(getattr(self.objective, "set_step", None)):
            self.objective.set_step(self.step)  # 0-based index of this step
        if self.guard is not None:  # backward inside; every angle_every-th step compared with stored activations
            every = self.guard.every
            loss, logs = self.guard.backward(self.model, self.objective, batch, self.step,
                                             check=every > 0 and (self.step + 1) % every == 0)
            self._grad_check(logs)
            if not bool(torch.isfinite(loss)):
                self.optimizer.zero_grad(set_to_none=True)
                return self._nonfinite("loss", float(loss))
        else:
            loss, logs = self.objective.loss(self.ddp, batch)
            if self.env.any(not bool(torch.isfinite(loss.detach()))):  # decided together: all ranks skip
                return self._nonfinite("loss", float(loss.detach()))
            loss.backward()  # under DDP: gradients averaged over ranks
        max_norm = self.t.grad_clip if self.t.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite("grad_norm", grad_norm)
        if not self.env.same(grad_norm):
            raise StableflowsError("gradients differ across ranks: the objective computed its loss without "
                                   "going through the model's methods (e.g. by calling a submodule directly), "
                                   "so DistributedDataParallel did not average them")
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.nonfinite_run = 0
        for k, v in {"loss": float(loss.detach()), **logs, "grad_norm": grad_norm}.items():
            self.accum[k] = self.accum.get(k, 0.0) + float(v)
            if k.startswith(INTERMITTENT):  # logged on some steps only: averaged over those
                self.accum[f"#{k}"] = self.accum.get(f"#{k}", 0.0) + 1
        self.accum["n"] = self.accum.get("n", 0.0) + 1
        self.accum["grad_norm_max"] = max(self.accum.get("grad_norm_max", 0.0), grad_norm)

    def _grad_check(self, logs: dict) -> None:
        """Move the guard's per-step flags out of the running means; a comparison with stored
        activations (and any fallback) becomes a ``grad_check`` record of metrics.jsonl."""
        angle, rel = logs.pop("grad_angle", None), logs.pop("grad_rel_error", None)
        fell_back = bool(logs.pop("grad_fallback", 0.0))
        nonfinite = bool(logs.pop("grad_nonfinite", 0.0))
        if angle is None:
            return
        self.grad_checks += 1
        self.grad_fallbacks += int(fell_back)
        record = {"kind": "grad_check", "step": self.step + 1, "angle": float(angle), "rel_error": float(rel),
                  "nonfinite": nonfinite, "fallback": fell_back}
        self.history.append(record)
        if self.env.is_main:
            self._append_jsonl(record)

    def _nonfinite(self, what: str, value: float) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        record = {"kind": "nonfinite", "step": self.step + 1, "what": what, "value": str(value),
                  "consecutive": self.nonfinite_run}
        self.history.append(record)
        if self.env.is_main:
            self._append_jsonl(record)
        if self.nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDiverged(
                f"{self.nonfinite_run} consecutive steps had a non-finite {what} (last at step {self.step + 1}, "
                f"value {value}); lower --lr, raise --warmup, set --grad-clip, or use a bounded --scale. "
                f"The last good checkpoint is {self.out / 'last.pt'}")

    def running_metric(self) -> tuple[str, float] | None:
        """Running mean of the training metric (else bpd, else the loss) since the last evaluation."""
        n = self.accum.get("n", 0.0)
        key = next((k for k in (self.metric, "bpd", "loss") if k in self.accum), None)
        return (key, self.accum[key] / n) if n and key else None

    # -------------------------------------------------------------- evaluation
    def evaluate_split(self, model: nn.Module, part: str) -> dict[str, float]:
        """Metrics of one split with the fixed noise (seed 0); ``self.metric`` is among them."""
        x = getattr(self.splits, part)
        if self.custom_eval:  # whole split on every rank; rank 0's numbers keep the ranks in step
            y = getattr(self.splits, f"y_{part}", None)
            out = {k: float(v) for k, v in self.objective.evaluate(model, x, y, self.levels).items()}
            return self.env.broadcast_object(out)
        return {self.metric: evaluate_sharded(model, x, self.levels, self.env)}  # evaluate() on one process

    def evaluate_and_checkpoint(self, session_rate: float) -> dict:
        t0 = time.perf_counter()
        vals = self.evaluate_split(self.eval_model, "val")
        val = vals[self.metric]
        self.accum = self.env.average(self.accum)  # training logs: mean over ranks
        n = self.accum.pop("n", 0.0)
        gmax = self.accum.pop("grad_norm_max", None)
        record: dict[str, Any] = {"kind": "eval", "step": self.step}
        counts = {k[1:]: self.accum.pop(k) for k in [k for k in self.accum if k.startswith("#")]}
        for k, v in self.accum.items():
            m = counts.get(k, n)
            record[k if k in ("loss", "grad_norm") else f"train_{k}"] = v / m if m else None
        record.update({f"val_{k}": v for k, v in vals.items()})
        record.update({"grad_norm_max": gmax, "lr": self.last_lr,
                       "nonfinite_steps": self.nonfinite_total, "time": self.train_time,
                       **({"grad_checks": self.grad_checks, "grad_fallbacks": self.grad_fallbacks}
                          if self.guard is not None else {}),
                       "steps_per_s": session_rate})
        self.accum = {}
        if math.isfinite(val) and val < self.best_val:
            self.best_val, self.best_step = val, self.step
            if self.env.is_main:
                save_checkpoint(self.out / "best.pt", {
                    "kind": "best", "config": self.cfg.to_dict(), "shape": list(self.splits.shape),
                    "levels": self.levels, "data": self.splits.name, "metric": self.metric,
                    "model": self.eval_model.state_dict(), "step": self.step, "val": val})
        self.last_eval_step = self.step
        self.eval_time += time.perf_counter() - t0
        record["eval_time"] = self.eval_time
        self.history.append(record)
        state = self.state()  # collective under torch.distributed (gathers every rank's RNG)
        if self.env.is_main:
            self._append_jsonl(record)
            save_checkpoint(self.out / "last.pt", state)
        self.env.barrier()  # the other ranks may read best.pt / last.pt from here on
        for cb in self.callbacks:
            cb("eval", record)
        return record

    def _append_jsonl(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(_json_line(record) + "\n")

    def rewrite_jsonl(self) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(_json_line(r) + "\n" for r in self.history))


# ----------------------------------------------------------------------------- entry point
def train(cfg: RunConfig, *, resume: bool = False, model: nn.Module | None = None, splits=None,
          objective: Objective | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; outputs go to ``cfg.train.out_dir``.

    Args:
        cfg: the run configuration.
        resume: continue from ``out_dir/last.pt`` (same trajectory as an uninterrupted run).
        model: a flow to train instead of ``build_model(cfg.model, shape)`` (its shape must match).
        splits: data splits instead of ``load_dataset(cfg.data, seed)``.
        objective: defaults to :class:`MaximumLikelihood`. An objective with a ``metric`` name and
            ``evaluate(model, x, y, levels) -> {name: value}`` is evaluated (and selected on ``metric``,
            lower is better) by that method; one with ``set_step(t)`` is told the step index.
        callbacks: ``cb(event, record)`` called once set-up is done and training starts (``"start"``),
            after every evaluation (``"eval"``) and at the end (``"end"``, the summary).

    Writes ``metrics.jsonl`` (one record per evaluation, non-finite step and the final test),
    ``metrics.json`` (summary), ``best.pt``, ``last.pt``, ``samples.png`` and ``curve.png``.
    Raises :class:`ConfigError` / data errors before any training, :class:`TrainingDiverged` after
    ``MAX_CONSECUTIVE_NONFINITE`` non-finite steps in a row.

    Under ``torchrun`` (or inside a process group the caller initialised) every rank calls this;
    see the module docstring. Only rank 0 writes; every rank returns the same result.
    """
    validate_config(cfg)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    env = setup_distributed(cfg.train.device)  # the group (if any) stays for later calls in this process
    return _train(cfg, env, resume, model, splits, objective, callbacks)


def _train(cfg: RunConfig, env: DistEnv, resume: bool, model: nn.Module | None, splits,
           objective: Objective | None, callbacks: Sequence[Callback]) -> TrainResult:
    device = env.device
    env.local_batch(cfg.train.batch_size)  # the global batch must split evenly over the ranks
    out = Path(cfg.train.out_dir)
    saved = None
    if resume:
        saved = load_checkpoint(out / "last.pt")
        _check_resumable(saved.get("config"), cfg, out / "last.pt")
    if splits is None:
        from ..data import load_dataset

        splits = load_dataset(cfg.data, seed=cfg.train.seed)
    _check_splits(splits, cfg)
    torch.manual_seed(cfg.train.seed)
    if model is None:
        from ..models.registry import build_model

        model = build_model(cfg.model, tuple(splits.shape))
    if tuple(getattr(model, "shape", splits.shape)) != tuple(splits.shape):
        raise ShapeError(f"model event shape {tuple(model.shape)} does not match data shape {tuple(splits.shape)}")
    model.to(device)
    objective = objective if objective is not None else build_objective(cfg)
    _check_objective(cfg, model, splits, objective, env)
    tr = _Trainer(cfg, model, splits, objective, callbacks, device, env)
    if env.rank > 0:  # independent noise of stochastic estimators on each rank (rank 0 keeps the seed)
        torch.manual_seed(rank_seed(cfg.train.seed, env.rank))
    out.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        tr.load_state(saved)
        if env.is_main:
            tr.rewrite_jsonl()  # drop records written after the checkpoint
    elif env.is_main:
        for stale in ("metrics.jsonl", "best.pt", "last.pt"):
            (out / stale).unlink(missing_ok=True)
    if cfg.train.compile:  # after the data-dependent initialisation and the EMA copy (not compiled)
        model.compile()
    tr.start_distributed()
    return _run(tr)


def _run(tr: _Trainer) -> TrainResult:
    t = tr.t
    session_steps, session_time = 0, 0.0

    def rate() -> float:
        return session_steps / session_time if session_time > 0 else 0.0

    def done() -> bool:  # the slowest rank's training time decides, so all ranks stop together
        return tr.step >= t.steps or (t.time_budget is not None and tr.env.max(tr.train_time) >= t.time_budget)

    from tqdm.auto import tqdm

    for cb in tr.callbacks:
        cb("start", {"step": tr.step, "out_dir": str(tr.out)})
    bar = tqdm(total=t.steps, initial=tr.step, disable=not (_progress_enabled(tr.cfg) and tr.env.is_main), desc="train",
               dynamic_ncols=True, leave=True)
    try:
        while not done():
            t0 = time.perf_counter()
            with validation(False):  # every split was validated before the first step: no device reads
                tr.train_step()
            if tr.device.type == "cuda":
                torch.cuda.synchronize(tr.device)
            dt = time.perf_counter() - t0
            tr.train_time += dt
            session_time += dt
            tr.step += 1
            session_steps += 1
            bar.update(1)
            if tr.step % PROGRESS_EVERY == 0 and (m := tr.running_metric()) is not None:
                bar.set_postfix_str(f"train {m[0]} {m[1]:.3f}")
            if tr.step % t.eval_every == 0:
                rec = tr.evaluate_and_checkpoint(rate())
                bar.set_postfix_str(f"val {tr.metric} {rec[f'val_{tr.metric}']:.3f}")
        if tr.last_eval_step != tr.step:
            tr.evaluate_and_checkpoint(rate())
    finally:
        bar.close()
    return _finish(tr, rate())


def _finish(tr: _Trainer, rate: float) -> TrainResult:
    t0 = time.perf_counter()
    best = tr.eval_model
    if (tr.out / "best.pt").is_file() and tr.best_step is not None:
        best = copy.deepcopy(tr.eval_model)
        best.load_state_dict(load_checkpoint(tr.out / "best.pt")["model"])
    tests = tr.evaluate_split(best, "test")
    test = tests[tr.metric]
    tr.eval_time += time.perf_counter() - t0
    record = {"kind": "test", "step": tr.best_step, **{f"test_{k}": v for k, v in tests.items()},
              "selected": "best" if tr.best_step is not None else "last"}
    n_params = sum(p.numel() for p in tr.model.parameters())
    result = TrainResult(
        metric=tr.metric, best_val=tr.best_val if tr.best_step is not None else math.nan,
        best_step=tr.best_step, test=test, steps=tr.step, train_time=tr.train_time, eval_time=tr.eval_time,
        steps_per_s=rate, peak_rss_mb=peak_rss_mb(), nonfinite_steps=tr.nonfinite_total, out_dir=str(tr.out),
        n_params=n_params, test_metrics=tests, history=tr.history + [record])
    summary = {**result.summary(), "data": tr.splits.name, "shape": list(tr.splits.shape), "levels": tr.levels,
               "device": str(tr.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "eval_seed": EVAL_SEED, "processes": tr.env.world_size, "config": tr.cfg.to_dict()}
    if tr.env.is_main:
        tr._append_jsonl(record)
        summary["figures"] = write_figures(tr.out, best, tr.splits, tr.history, tr.metric, test=test,
                                           best_step=tr.best_step)
        atomic_write_text(tr.out / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tr.env.barrier()
    for cb in tr.callbacks:
        cb("end", summary)
    return result
