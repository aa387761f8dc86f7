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

Run directory (:mod:`.rundir`): a fresh run refuses a directory holding anything unless
``overwrite`` is given (and then keeps the earlier run until its own first checkpoint), holds an
exclusive lock on it, and writes ``config.yaml`` first. No checkpoint is written with non-finite
weights: a model whose weights became non-finite ends the run (:class:`TrainingDiverged`) naming the
last good checkpoint. SIGINT / SIGTERM finish the current step, write ``last.pt`` and raise
:class:`TrainingInterrupted` (a second signal aborts at once); ``resume`` then continues exactly.
A failed write (disk full ...) raises :class:`~.rundir.RunWriteError`; the previous checkpoint stays.

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
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..metrics import check_levels
from ..transforms.base import InputOutsideDomain, ShapeError, StableflowsError, check_finite, check_shape, validation
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, require, save_checkpoint
from .distributed import DistEnv, evaluate_sharded, rank_seed
from .distributed import setup as setup_distributed
from .distributed import wrap as wrap_distributed
from .ema import EMA
from .evaluate import EVAL_SEED, evaluate, finite_or_none, frozen_rng, metric_name
from .objectives import Batch, MaximumLikelihood, Objective, conditional_objective
from .optim import adamw, load_optimizer_state
from .plots import write_figures
from .progress import Progress
from .rundir import RunDir, RunDirError, RunWriteError, check_reusable, default_out_dir, open_run_dir, recover
from .validation import OBJECTIVE_CHOICES, SUPERVISED, SUPERVISED_ONLY, validate_config  # noqa: F401 (re-exported)

__all__ = ["train", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "RunNote", "validate_config", "resolve_device", "build_objective",
           "build_guard", "OBJECTIVE_CHOICES", "MAX_CONSECUTIVE_NONFINITE", "INIT_BATCH"]

MAX_CONSECUTIVE_NONFINITE = 20  # abort after this many non-finite steps in a row
INIT_BATCH = 512  # examples of the data-dependent (ActNorm) initialisation forward pass
SEED_OFFSETS = {"sample": 1, "noise": 2, "init": 3}  # dedicated generators: seed + offset
# train fields that change the trajectory: a resumed run must keep them
TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "warmup", "grad_clip", "ema_decay", "seed", "objective",
                     "label_smoothing", "fd_forward", "fd_inverse", "fd_eps", "fd_every", "fd_mode", "nf_weight",
                     "fallback", "max_angle", "max_rel_error")
INTERMITTENT = ("fd_", "nf_")  # logs of regularizers applied every k steps (averaged over the steps they ran)
Callback = Callable[[str, dict], None]


class TrainingDiverged(StableflowsError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or the weights became non-finite."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the training after a finished step; ``last.pt`` holds that step."""

    def __init__(self, message: str, *, step: int, path: Path, signal_name: str):
        super().__init__(message)
        self.step, self.path, self.signal_name = step, path, signal_name


class RunNote(UserWarning):
    """Something the run did to its directory that the user should know (a restored run, a removed
    temporary file, a stale best.pt): shown once, training goes on."""


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
    session_steps: int = 0  # steps trained by this call (0: a resumed run that had already finished)
    outputs: list = dataclasses.field(default_factory=list)  # files written in out_dir, by name
    notes: dict = dataclasses.field(default_factory=dict)  # e.g. {"samples": why samples.png is missing}
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
                              fd_every=t.fd_every, fd_mode=t.fd_mode, nf_weight=t.nf_weight, lam=None,
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


def _nonfinite_entries(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict with a non-finite entry (one host sync)."""
    floats = [(k, t) for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not floats:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()
    if bool(ok.all()):
        return []
    return [k for (k, _), good in zip(floats, ok.tolist()) if not good]


def state_dict_error(e: BaseException) -> str:
    """The informative line of a ``load_state_dict`` error (missing / unexpected keys, size mismatch)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith("Error(s) in loading state_dict")]
    text = (detail or lines or [type(e).__name__])[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"entry {name} must be a non-negative integer, got {v!r}")
    return v


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Adam moments that exist have the shape of their parameter (torch only checks the groups)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                t = st.get(key)
                if not torch.is_tensor(t) or t.shape != p.shape:
                    raise ValueError(f"optimizer state {key} of a parameter of shape {tuple(p.shape)} is "
                                     f"{'missing' if t is None else tuple(getattr(t, 'shape', ()))}")
            if "step" not in st:
                raise ValueError("optimizer state without its step count")


def _note(message: str) -> None:
    warnings.warn(message, RunNote, stacklevel=3)


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
        self.saved_step: int | None = None  # step of the last.pt on disk (written or resumed from)
        self.rundir: RunDir | None = None  # rank 0: the locked run directory

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
                if callable(getattr(self.objective, "context", None)):  # conditional: the labels as context
                    self.objective.log_prob(self.model, Batch(x, x, self.env.shard(self.train_y[idx]), self.levels))
                else:
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

    def load_state(self, s: dict[str, Any], path: Path | None = None) -> None:
        """Restore the state of a ``last.pt``; any entry that is missing or does not fit is a
        :class:`CheckpointError` naming ``path``."""
        path = path or self.out / "last.pt"
        if s.get("kind", "last") != "last":
            raise CheckpointError(f"this is a '{s.get('kind')}' checkpoint (weights only), not the training state "
                                  "of a last.pt: it cannot be resumed", path)
        weights = require(s, "model", dict, path)
        bad = _nonfinite_entries(weights)
        if bad:
            raise CheckpointError(f"the checkpoint holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                                  "it cannot be resumed", path)
        try:
            self.model.load_state_dict(weights)
            if self.ema is not None:
                if not s.get("ema"):
                    raise CheckpointError("checkpoint has no EMA state but ema_decay > 0", path)
                self.ema.load_state_dict(s["ema"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"weights do not fit the model built from the config (another model type or "
                                  f"other options): {state_dict_error(e)}", path) from e
        try:
            self._load_rest(s)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            what = f"no entry {e}" if isinstance(e, KeyError) else state_dict_error(e)
            raise CheckpointError(f"the training state does not fit this run ({type(e).__name__}: {what})",
                                  path) from e
        self.saved_step = self.step

    def _load_rest(self, s: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, s["optimizer"])
        _check_optimizer_state(self.optimizer)
        self.step = _count(s["step"], "step")
        self.best_val, self.best_step = float(s["best_val"]), s["best_step"]
        if self.best_step is not None:
            self.best_step = int(self.best_step)
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
        n = self.train_x.shape[0]
        perm, pos = s["sampler"]["perm"], _count(s["sampler"]["pos"], "sampler.pos")
        if perm is not None and (not torch.is_tensor(perm) or perm.shape != (n,) or pos > n):
            raise ValueError(f"the stored batch order does not fit the {n} training examples")
        self.perm, self.pos = perm, pos
        self.history = list(s["history"])
        if not all(isinstance(r, dict) and isinstance(r.get("kind"), str) for r in self.history):
            raise ValueError("the stored history holds entries that are not records")
        self.accum = {str(k): float(v) for k, v in dict(s["accum"]).items()}
        self.nonfinite_total, self.nonfinite_run = (_count(v, "nonfinite") for v in s["nonfinite"])
        self.last_eval_step = int(s["last_eval_step"])
        self.last_lr = float(s["last_lr"])
        self.grad_checks, self.grad_fallbacks = (int(v) for v in s.get("grad_checks", (0, 0)))

    # -------------------------------------------------------------- writing
    def _write(self, name: str, write: Callable[[Path], Any]) -> None:
        """Run ``write(path)``; a failed write becomes one :class:`RunWriteError` line saying what is kept."""
        path = self.out / name
        try:
            write(path)
        except OSError as e:
            raise RunWriteError(f"cannot write {path}: {e.strerror or e}; {self.kept()}") from e

    def kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written yet"
        return (f"the previous checkpoint {self.out / 'last.pt'} (step {self.saved_step}) is kept: make room and "
                f"continue with: stableflows train --resume --out-dir {self.out}")

    def last_good(self) -> str:
        if self.saved_step is None:
            return "No checkpoint of this run was written."
        return f"The last good checkpoint is {self.out / 'last.pt'} (step {self.saved_step})."

    def check_weights(self) -> None:
        """Never checkpoint non-finite weights: a model that has them has diverged."""
        bad = _nonfinite_entries(self.model.state_dict())
        if self.ema is not None:
            bad += [f"ema.{k}" for k in _nonfinite_entries(self.ema.module.state_dict())]
        if bad:
            raise TrainingDiverged(
                f"the weights became non-finite by step {self.step} ({len(bad)} tensors, e.g. {bad[0]}) and are not "
                f"saved; lower --lr, raise --warmup, set --grad-clip or --weight-decay lower. {self.last_good()}")

    def save_last(self) -> None:
        """``last.pt`` (collective under torch.distributed: gathers every rank's RNG); rank 0 writes."""
        state = self.state()
        if self.env.is_main:
            self._write("last.pt", lambda p: save_checkpoint(p, state))
            if self.rundir is not None:
                self.rundir.committed()  # an earlier run replaced with --overwrite may go now
        self.saved_step = self.step

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
                + self.last_good())

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
        self.check_weights()
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
                best = {"kind": "best", "config": self.cfg.to_dict(), "shape": list(self.splits.shape),
                        "levels": self.levels, "data": self.splits.name, "metric": self.metric,
                        "model": self.eval_model.state_dict(), "step": self.step, "val": val}
                self._write("best.pt", lambda p: save_checkpoint(p, best))
        self.last_eval_step = self.step
        self.eval_time += time.perf_counter() - t0
        record["eval_time"] = self.eval_time
        self.history.append(record)
        if self.env.is_main:
            self._append_jsonl(record)
        self.save_last()
        self.env.barrier()  # the other ranks may read best.pt / last.pt from here on
        for cb in self.callbacks:
            cb("eval", record)
        return record

    def _append_jsonl(self, record: dict) -> None:
        def append(path: Path) -> None:
            with open(path, "a") as f:
                f.write(_json_line(record) + "\n")

        self._write("metrics.jsonl", append)

    def rewrite_jsonl(self) -> None:
        text = "".join(_json_line(r) + "\n" for r in self.history)
        self._write("metrics.jsonl", lambda p: atomic_write_text(p, text))


# ----------------------------------------------------------------------------- entry point
def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, model: nn.Module | None = None,
          splits=None, objective: Objective | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; outputs go to ``cfg.train.out_dir``.

    Args:
        cfg: the run configuration. ``train.out_dir = None`` picks a new ``runs/<model>-<data>-<UTC time>``.
        resume: continue from ``out_dir/last.pt`` (same trajectory as an uninterrupted run).
        overwrite: replace the run already in ``out_dir`` (without it a non-empty directory is refused);
            the earlier run is kept until this one has written its first checkpoint.
        model: a flow to train instead of ``build_model(cfg.model, shape)`` (its shape must match).
        splits: data splits instead of ``load_dataset(cfg.data, seed)``.
        objective: defaults to :class:`MaximumLikelihood`. An objective with a ``metric`` name and
            ``evaluate(model, x, y, levels) -> {name: value}`` is evaluated (and selected on ``metric``,
            lower is better) by that method; one with ``set_step(t)`` is told the step index.
        callbacks: ``cb(event, record)`` called once set-up is done and training starts (``"start"``),
            after every evaluation (``"eval"``) and at the end (``"end"``, the summary).

    Writes ``config.yaml``, ``metrics.jsonl`` (one record per evaluation, non-finite step and the
    final test), ``metrics.json`` (summary), ``best.pt``, ``last.pt``, ``samples.png`` and ``curve.png``.
    Raises :class:`ConfigError` / data errors / :class:`~.rundir.RunDirError` before any training,
    :class:`TrainingDiverged` after ``MAX_CONSECUTIVE_NONFINITE`` non-finite steps in a row or on
    non-finite weights, :class:`~.rundir.RunWriteError` when a write fails, and
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) after SIGINT / SIGTERM, ``last.pt`` saved.

    Under ``torchrun`` (or inside a process group the caller initialised) every rank calls this;
    see the module docstring. Only rank 0 writes; every rank returns the same result.
    """
    validate_config(cfg)
    if resume and cfg.train.out_dir is None:
        raise ConfigError("resuming needs the run directory: set train.out_dir (--out-dir DIR)")
    if resume and overwrite:
        raise ConfigError("resume continues the run in out_dir and overwrite replaces it: choose one")
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    env = setup_distributed(cfg.train.device)  # the group (if any) stays for later calls in this process
    if cfg.train.out_dir is None:  # one name for every rank: rank 0's
        cfg = cfg.replace("train", out_dir=env.broadcast_object(str(default_out_dir(cfg)) if env.is_main else None))
    return _train(cfg, env, resume, overwrite, model, splits, objective, callbacks)


def _load_for_resume(out: Path, cfg: RunConfig) -> tuple[dict, tuple]:
    """The state of ``out/last.pt`` (checked against ``cfg``) and the file's identity at reading."""
    path = out / "last.pt"
    for note in recover(out):
        _note(note)
    if not path.exists():
        raise CheckpointError(no_checkpoint_message(out), path)
    saved = load_checkpoint(path)
    _check_resumable(saved.get("config"), cfg, path)
    st = path.stat()
    return saved, (st.st_ino, st.st_size, st.st_mtime_ns)


def no_checkpoint_message(out: Path) -> str:
    """Why ``out`` cannot be resumed, and how to start it again."""
    if not out.is_dir():
        return f"there is no run directory {out} to resume; start a run with --out-dir {out}"
    left = [p.name for p in out.iterdir() if p.name not in (".lock",)]
    if not left:
        return f"run directory {out} is empty: there is nothing to resume; start a run with --out-dir {out}"
    config = out / "config.yaml"
    how = (f"stableflows train --config {config} --out-dir {out} --overwrite" if config.is_file()
           else f"stableflows train ... --out-dir {out} --overwrite")
    return (f"run directory {out} has no checkpoint yet (the run stopped before its first one, written at "
            f"its first evaluation or on Ctrl-C); start it again with: {how}")


def _open_collective(env: DistEnv, out: Path, resume: bool, overwrite: bool) -> RunDir | None:
    """Rank 0 opens (locks) the run directory; every rank raises the same error if that fails."""
    rundir, err = None, None
    if env.is_main:
        try:
            rundir = open_run_dir(out, resume=resume, overwrite=overwrite)
        except RunDirError as e:
            err = str(e)
    err = env.broadcast_object(err)
    if err is not None:
        raise RunDirError(err)
    for note in rundir.notes if rundir is not None else ():
        _note(note)
    return rundir


def _check_best_on_resume(tr: _Trainer) -> None:
    """A resumed run trusts its best.pt only after it verifies; a missing one restarts the selection."""
    path = tr.out / "best.pt"
    if tr.best_step is None:
        return
    if not path.is_file():
        _note(f"{path} is missing: the weights are selected again from the next evaluation on")
        tr.best_val, tr.best_step = math.inf, None
        return
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e.reason}; move it away to resume without it (the weights are then selected "
                              "again from the next evaluation on)", path) from e


def _train(cfg: RunConfig, env: DistEnv, resume: bool, overwrite: bool, model: nn.Module | None, splits,
           objective: Objective | None, callbacks: Sequence[Callback]) -> TrainResult:
    device = env.device
    env.local_batch(cfg.train.batch_size)  # the global batch must split evenly over the ranks
    out = Path(cfg.train.out_dir)
    saved = stamp = None
    if resume:
        saved, stamp = _load_for_resume(out, cfg)
    else:  # quick refusal before the data are loaded (checked again under the lock)
        check_reusable(out, overwrite=overwrite)
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
    objective = conditional_objective(objective, model, splits)  # a cinn learns log p(x | y)
    _check_objective(cfg, model, splits, objective, env)
    tr = _Trainer(cfg, model, splits, objective, callbacks, device, env)
    if env.rank > 0:  # independent noise of stochastic estimators on each rank (rank 0 keeps the seed)
        torch.manual_seed(rank_seed(cfg.train.seed, env.rank))
    tr.rundir = _open_collective(env, out, resume, overwrite)
    try:
        if saved is not None:
            changed = False
            if env.is_main:
                st = (out / "last.pt").stat()
                changed = (st.st_ino, st.st_size, st.st_mtime_ns) != stamp
            if env.broadcast_object(changed):
                raise RunDirError(f"{out / 'last.pt'} changed while this run was starting (another training "
                                  "wrote it); start the resume again")
            tr.load_state(saved, out / "last.pt")
            _check_best_on_resume(tr)
            if env.is_main:
                tr.rewrite_jsonl()  # drop records written after the checkpoint
        if env.is_main:
            import yaml

            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            tr._write("config.yaml", lambda p: atomic_write_text(p, text))
        if cfg.train.compile:  # after the data-dependent initialisation and the EMA copy (not compiled)
            model.compile()
        tr.start_distributed()
        return _run(tr, resumed=saved is not None)
    finally:
        if tr.rundir is not None:
            tr.rundir.close()


class _StopOnSignal:
    """SIGINT / SIGTERM set a flag (the loop stops after the step); a second one raises at once."""

    NAMES = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.name: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    try:
                        self._old[sig] = signal.signal(sig, self._handle)
                    except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter
                        pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {name}: stopped at once (the previous checkpoint is kept)")
        self.name = name
        try:
            print(f"stableflows: {name}: finishing this step and saving last.pt (send it again to stop at once)",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):  # pragma: no cover - stderr closed
            pass

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def _interrupted(tr: _Trainer, name: str) -> TrainingInterrupted:
    if tr.saved_step != tr.step:
        tr.check_weights()
        tr.save_last()
    return TrainingInterrupted(f"{name}: stopped after step {tr.step}; the state is saved in {tr.out / 'last.pt'}; "
                               f"continue with: stableflows train --resume --out-dir {tr.out}",
                               step=tr.step, path=tr.out / "last.pt", signal_name=name)


def _run(tr: _Trainer, resumed: bool = False) -> TrainResult:
    t = tr.t
    session_steps, session_time = 0, 0.0

    def rate() -> float:
        return session_steps / session_time if session_time > 0 else 0.0

    def done() -> bool:  # the slowest rank's training time decides, so all ranks stop together
        return tr.step >= t.steps or (t.time_budget is not None and tr.env.max(tr.train_time) >= t.time_budget)

    def mean_loss() -> float | None:
        n = tr.accum.get("n", 0.0)
        return tr.accum["loss"] / n if n and "loss" in tr.accum else None

    for cb in tr.callbacks:
        cb("start", {"step": tr.step, "out_dir": str(tr.out), "resumed": resumed})
    progress = Progress(steps=t.steps, time_budget=t.time_budget, start_step=tr.step,
                        enabled=t.progress and tr.env.is_main, log_every=t.log_every, metric=tr.metric)
    last_eval = next((r for r in reversed(tr.history) if r.get("kind") == "eval"), None)
    if last_eval is not None and last_eval.get(f"val_{tr.metric}") is not None:  # a resumed run
        progress.val = (int(last_eval["step"]), float(last_eval[f"val_{tr.metric}"]))
    finished = False
    with _StopOnSignal() as stop:
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
                progress.step(tr.step, tr.train_time, rate(), tr.running_metric(), mean_loss())
                if tr.step % t.eval_every == 0:
                    rec = tr.evaluate_and_checkpoint(rate())
                    progress.evaluated(tr.step, rec[f"val_{tr.metric}"])
                if tr.env.any(stop.name is not None):
                    raise _interrupted(tr, stop.name or "SIGTERM")
            finished = True
            if tr.last_eval_step != tr.step:
                tr.evaluate_and_checkpoint(rate())
        finally:
            progress.close(finished)
    if session_steps == 0:  # nothing trained (a finished run resumed): keep the rate of the last session
        last = next((r for r in reversed(tr.history) if r.get("kind") == "eval"), {})
        return _finish(tr, float(last.get("steps_per_s") or 0.0), 0)
    return _finish(tr, rate(), session_steps)


def _trains_density(tr: _Trainer) -> bool:
    """Whether the objective fits p(x): likelihood, hybrid, or classification with the NF term."""
    kind = getattr(tr.objective, "name", "likelihood")
    return kind != "classification" or tr.t.nf_weight > 0


def _finish(tr: _Trainer, rate: float, session_steps: int) -> TrainResult:
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
        n_params=n_params, test_metrics=tests, session_steps=session_steps, history=tr.history + [record])
    summary = {**result.summary(), "data": tr.splits.name, "shape": list(tr.splits.shape), "levels": tr.levels,
               "device": str(tr.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "eval_seed": EVAL_SEED, "processes": tr.env.world_size, "config": tr.cfg.to_dict()}
    written: tuple[list, dict] = ([], {})
    if tr.env.is_main:
        tr._append_jsonl(record)
        figures = write_figures(tr.out, best, tr.splits, tr.history, tr.metric, test=test, best_step=tr.best_step,
                                density=_trains_density(tr), ema=tr.ema is not None)
        summary["figures"] = figures
        files = ["metrics.jsonl", "config.yaml", "last.pt"] + (["best.pt"] if tr.best_step is not None else [])
        files += [figures[k] for k in ("curve", "samples") if k in figures]
        summary["outputs"] = files = sorted(files + ["metrics.json"])
        notes = {k[:-len("_error")]: v for k, v in figures.items() if k.endswith("_error")}
        notes.update({k[:-len("_skipped")]: v for k, v in figures.items() if k.endswith("_skipped")})
        summary["notes"] = notes
        tr._write("metrics.json", lambda p: atomic_write_text(p, json.dumps(summary, indent=2, sort_keys=True) + "\n"))
        written = (files, notes)
    result.outputs, result.notes = tr.env.broadcast_object(written)
    tr.env.barrier()
    for cb in tr.callbacks:
        cb("end", summary)
    return result
