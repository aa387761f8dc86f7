"""Data-parallel training on PyTorch's own engine (``torch.distributed`` + DistributedDataParallel).

Launch one process per device with ``torchrun``::

    torchrun --nproc_per_node=N -m stableflows train --config configs/resflow_cifar10.toml

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and joins the process group (``gloo`` on CPU, ``nccl`` on CUDA, one GPU
per process: ``cuda:LOCAL_RANK``). A group the caller initialised itself (``mp.spawn``) is used
as it is. Without either, everything here is the single-process identity.

**Same trajectory as one process.** ``train.batch_size`` is the *global* batch ``B``; each of the
``W`` ranks takes ``B / W`` examples. Every rank draws the same global index permutation and the
same dequantisation noise for all ``B`` examples (the generators are seeded identically) and keeps
its contiguous shard ``[r B / W, (r + 1) B / W)``. DDP averages the gradients of the per-rank mean
losses, which is the gradient of the mean over the global batch, so the parameters after ``k``
steps equal those of a one-process run with batch ``B`` up to floating-point summation order:

    mean_r ( mean_{i in shard r} l_i )  =  mean_{i in batch} l_i        (equal shard sizes).

ActNorm pools its initialisation statistics over ranks (:mod:`stableflows.transforms.normalization`),
and the initialisation batch is sharded the same way, so it equals the one-process initialisation.
DDP broadcasts rank 0's parameters and buffers when it wraps the model and rank 0's buffers again
before every forward (``forward_sync_buffers``): spectral-normalisation power-iteration vectors
``u, v`` (which every rank then updates identically from identical weights) and ActNorm flags
cannot drift. :func:`module_divergence` measures any drift that remains.

**Evaluation** (:func:`evaluate_sharded`): the fixed test-time noise is drawn for the whole split
and sliced, each rank sums the bits/dim of its shard in float64, and the sums and counts are
all-reduced: the result equals the one-process value (up to summation order).

**Writing**: only rank 0 writes checkpoints, metrics and figures (:attr:`DistEnv.is_main`); the
others wait at :meth:`DistEnv.barrier` where they must read what rank 0 wrote.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ConfigError
from ..metrics import nats_to_bpd
from .evaluate import EVAL_BATCH, EVAL_SEED, eval_batch, evaluate, fixed_noise, frozen_rng

__all__ = [
    "DistEnv",
    "setup",
    "teardown",
    "resolve_device",
    "shard_bounds",
    "DistributedFlow",
    "wrap",
    "evaluate_sharded",
    "broadcast_module_",
    "module_divergence",
    "rank_seed",
    "BACKENDS",
    "SYNCED_METHODS",
]

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # device type -> process-group backend
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 reseeds its global RNG with seed + r * stride after set-up
SYNCED_METHODS = ("forward", "log_prob", "log_prob_parts")  # always routed through DDP's forward
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` (CUDA when available) | ``cpu`` | ``cuda`` | ``cuda:i`` -> a device.

    With several processes, ``auto``/``cuda`` mean ``cuda:LOCAL_RANK`` (one GPU per process).
    """
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:i, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if name == "cuda":
        return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return torch.device(name)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous shard of ``n`` items; the first ``n mod W`` ranks
    get one item more (the split of :func:`torch.tensor_split`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world size {world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, device and backend (world size 1: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # :func:`setup` initialised the group (and :func:`teardown` destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def local_batch(self, global_batch: int) -> int:
        """Examples per rank of a global batch; the batch must divide evenly (equal shards keep the
        averaged gradient equal to the gradient of the global mean)."""
        if global_batch % self.world_size:
            raise ConfigError(f"train.batch_size {global_batch} is the global batch and must be divisible by "
                              f"the {self.world_size} processes")
        return global_batch // self.world_size

    def bounds(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.rank, self.world_size)

    def shard(self, t: Tensor | None) -> Tensor | None:
        """This rank's contiguous shard of ``t`` along dim 0 (``t`` itself on one process)."""
        if t is None or not self.enabled:
            return t
        lo, hi = self.bounds(t.shape[0])
        return t[lo:hi]

    # ------------------------------------------------------------------ collectives
    def _tensor(self, values: Sequence[float] | Tensor) -> Tensor:
        t = torch.as_tensor(values, dtype=torch.float64)
        return t.to(self.device) if self.backend == "nccl" else t

    def all_reduce(self, values: Sequence[float] | Tensor, op: str = "sum") -> Tensor:
        """Element-wise sum / max / min over ranks of a float64 vector (a CPU tensor is returned)."""
        t = self._tensor(values).clone()
        if self.enabled:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return t.cpu()

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of every entry (every rank must hold the same keys)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        mean = self.all_reduce([float(values[k]) for k in keys]) / self.world_size
        return dict(zip(keys, mean.tolist()))

    def same(self, value: float, *, rtol: float = 1e-5) -> bool:
        """Whether ``value`` agrees on every rank within ``rtol`` (True on one process)."""
        if not self.enabled:
            return True
        hi, neg_lo = self.all_reduce([value, -value], "max").tolist()
        lo = -neg_lo
        if not (math.isfinite(hi) and math.isfinite(lo)):
            return hi == lo or (math.isnan(hi) and math.isnan(lo))
        return hi - lo <= rtol * max(abs(hi), abs(lo), 1e-30)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective decision)."""
        return bool(self.all_reduce([1.0 if flag else 0.0], "max")[0] > 0) if self.enabled else bool(flag)

    def max(self, value: float) -> float:
        return float(self.all_reduce([value], "max")[0]) if self.enabled else float(value)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto", *, backend: str | None = None) -> DistEnv:
    """Join (or reuse) the process group and return this process's :class:`DistEnv`.

    * a process group already initialised by the caller: used as it is;
    * ``WORLD_SIZE > 1`` in the environment (``torchrun``): ``init_process_group(backend,
      init_method="env://")`` with ``gloo`` for CPU and ``nccl`` for CUDA (``backend`` overrides);
      the group lives until :func:`teardown` or the end of the process (creating and destroying
      groups repeatedly races between ranks);
    * otherwise: a single process (no group).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local, world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(device=resolve_device(device))
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local, world)
    backend = backend or BACKENDS[dev.type]
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    atexit.register(_destroy_group)  # kept for later calls in this process (train twice, resume)
    return DistEnv(rank, world, local, dev, backend, owns_group=True)


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def teardown(env: DistEnv) -> None:
    """Destroy the process group now if :func:`setup` created it (otherwise it is destroyed when the
    process exits, so that later calls in the same process reuse it)."""
    if env.owns_group:
        _destroy_group()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s global RNG after set-up (rank 0 keeps ``seed``): stochastic estimators
    (Hutchinson probes, Russian roulette) then draw independent noise on each rank."""
    return seed + rank * RANK_SEED_STRIDE


# ----------------------------------------------------------------------------- model wrapping
class _Dispatch(nn.Module):
    """``forward(method, *args)`` = ``flow.method(*args)``: lets DDP hook any method of the flow."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.flow, method)(*args, **kwargs)


class DistributedFlow:
    """The flow seen through DistributedDataParallel: calling it, or any method the flow's class
    defines beyond :class:`torch.nn.Module`'s own (``log_prob``, ``log_prob_parts``, ``classify``
    ...), runs DDP's forward, so the backward pass that follows averages the gradients over ranks.
    ``nn.Module`` methods (``parameters``, ``train``, ``state_dict`` ...) and plain attributes are the
    flow's own; ``.module`` is the flow. Calling a *submodule* directly (``flow.transform(x)``)
    bypasses DDP: the loop checks every step that the gradients agree across ranks."""

    def __init__(self, flow: nn.Module, ddp: nn.Module):
        self.module = flow
        self.ddp = ddp

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("module", "ddp"):
            raise AttributeError(name)
        if name in SYNCED_METHODS or (not hasattr(nn.Module, name)
                                      and callable(getattr(type(self.module), name, None))):
            return functools.partial(self.ddp, name)
        return getattr(self.module, name)


def wrap(model: nn.Module, env: DistEnv, *, find_unused_parameters: bool = False):
    """The model itself on one process; a :class:`DistributedFlow` under a process group.

    Wrapping broadcasts rank 0's parameters and buffers to every rank (DDP's initial sync), so
    the ranks start identical even if their initialisations differed. Call it after any lazy
    initialisation (ActNorm, convolution power-iteration vectors sized on the first input) and
    after loading a checkpoint: DDP keeps references to the buffers it broadcasts.
    """
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = DistributedDataParallel(_Dispatch(model), device_ids=ids, output_device=ids[0] if ids else None,
                                  find_unused_parameters=find_unused_parameters, **_buffer_sync_kwargs())
    return DistributedFlow(model, ddp)


def _buffer_sync_kwargs() -> dict[str, bool]:
    """Broadcast rank 0's buffers before every forward (the flag was renamed in PyTorch 2.13)."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": True} if "forward_sync_buffers" in params else {"broadcast_buffers": True}


def _state_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


@torch.no_grad()
def broadcast_module_(module: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    if not env.enabled:
        return
    for _, t in _state_tensors(module):
        if t.numel():
            dist.broadcast(t.data, src=src)


@torch.no_grad()
def module_divergence(module: nn.Module, env: DistEnv) -> float:
    """``max |t_rank - t_rank0|`` over every parameter and floating buffer and every rank
    (0.0 on one process). Buffers include the power-iteration vectors ``u, v``."""
    if not env.enabled:
        return 0.0
    worst = 0.0
    for _, t in _state_tensors(module):
        if not t.numel() or not (torch.is_floating_point(t) or t.dtype == torch.bool):
            continue
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        if t.dtype == torch.bool:
            worst = max(worst, float((ref != t).any()))
        else:
            worst = max(worst, float((t.detach().double() - ref.double()).abs().max()))
    return env.max(worst)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _bpd_sum(model: nn.Module, x: Tensor, u: Tensor | None, levels: int | None, batch_size: int) -> float:
    """Sum over ``x`` of bits/dim with the given noise ``u`` (or of NLL in nats when ``levels`` is None)."""
    device = next((p.device for p in model.parameters()), x.device)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        if levels is not None:
            v = (xb + u[i:i + batch_size].to(device)) / levels  # v = (x + u) / L
            per = nats_to_bpd(model.log_prob(v), v[0].numel(), levels)  # (b,)
        else:
            per = -model.log_prob(xb)  # (b,)
        total += float(per.double().sum())
    return total


def evaluate_sharded(model: nn.Module, x: Tensor, levels: int | None, env: DistEnv, *,
                     batch_size: int = EVAL_BATCH, seed: int = EVAL_SEED) -> float:
    """:func:`~stableflows.train.evaluate.evaluate` with the split sharded over ranks.

    The fixed noise ``u`` (seed ``seed``) is drawn for the whole split and sliced, so example ``i``
    gets the same ``u_i`` as on one process; the per-rank float64 sums and counts are all-reduced.
    On one process this *is* :func:`evaluate`.
    """
    if not env.enabled:
        return evaluate(model, x, levels, batch_size=batch_size, seed=seed)
    n = x.shape[0]
    lo, hi = env.bounds(n)
    u = fixed_noise(tuple(x.shape), seed, x.dtype)[lo:hi] if levels is not None else None
    device = next((p.device for p in model.parameters()), x.device)
    was_training = model.training
    model.eval()
    try:
        with frozen_rng(device):
            local = _bpd_sum(model, x[lo:hi], u, levels, eval_batch(x, device, batch_size))
    finally:
        model.train(was_training)
    total, count = env.all_reduce([local, float(hi - lo)]).tolist()
    return total / count if count else math.nan


@contextlib.contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creating a directory, writing a file), the others after it."""
    if not env.is_main:
        env.barrier()
    try:
        yield
    finally:
        if env.is_main:
            env.barrier()
