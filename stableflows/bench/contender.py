"""One benchmarked model: :class:`Contender`, the uniform view the harness trains and measures.

Every contender maps *model-space* images ``v`` of the task's shape (:data:`TASKS`: digits
``(B, 1, 8, 8)`` dequantised ``(x + u) / 17``, or Fashion-MNIST ``(B, 1, 28, 28)`` dequantised
``(x + u) / 256``, in ``[0, 1)``) to a latent ``z`` and back, and gives ``log p(v)`` including every
pre-transform (a logit counts through its log-det), so bits/dim are comparable across libraries:
``bpd = -(log p(v) - D ln L) / (D ln 2)`` (docs/METRICS.md). The functions take the module as their first
argument, so the harness can apply them to averaged (EMA) or selected copies of the weights.

Parameter matching: a contender is built from a width ``hidden``; :func:`match_hidden` picks the
width whose trainable-parameter count is closest to a target (counts grow with the width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..transforms.base import Transform
from ..transforms.elementwise import Logit

__all__ = ["Contender", "Builder", "count_params", "match_hidden", "Preprocess", "EVENT_SHAPE", "LEVELS",
           "PREPROCESS", "LOGIT_ALPHA", "Task", "TASKS", "get_task"]


@dataclass(frozen=True)
class Task:
    """A benchmark data set: its :func:`~stableflows.data.load_dataset` name, event shape and levels.

    ``val_n`` / ``recon_n`` cap the validation examples scored at every evaluation and the test
    examples round-tripped (None: all); test bits/dim always use the whole test split.
    ``eval_batch``: examples per scoring pass (the result does not depend on it). At 28x28 a width-128
    Glow scored 64 images per pass at ~2.6 ms/image and 512 at ~7.5 ms/image (1 thread; the
    activations of a large batch leave the cache).
    """

    data: str
    shape: tuple[int, ...]
    levels: int
    val_n: int | None = None
    recon_n: int | None = None
    eval_batch: int = 512


TASKS = {
    "digits": Task("digits", (1, 8, 8), 17),  # docs/METRICS.md: 1293 train, 144 val, 360 test
    "fashion-mnist": Task("fashion-mnist", (1, 28, 28), 256, val_n=2000, recon_n=1000, eval_batch=64),  # 54k/6k/10k
}
EVENT_SHAPE = TASKS["digits"].shape  # the default task
LEVELS = TASKS["digits"].levels
LOGIT_ALPHA = 0.01  # logit pre-transform of every contender (digits: 0.01 beats 0.05 by ~0.06 bpd for Glow and Residual Flow)
PREPROCESS = ("logit", "none")
MATCH_MIN_HIDDEN, MATCH_MAX_HIDDEN = 2, 4096  # search range of match_hidden


def get_task(name: str) -> Task:
    """The task named ``name`` (``fmnist`` / ``fashion_mnist`` are accepted for ``fashion-mnist``)."""
    key = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown benchmark data {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class Contender:
    """A model of one library, ready to train on model-space images of its task (digits ``(B, 1, 8, 8)``).

    log_prob(module, v) -> (B,)         log-density of v, pre-transforms included
    forward(module, v) -> z             data -> latent (any latent shape)
    inverse(module, z) -> v             latent -> data
    after_step(module) -> None          run after every optimizer step (e.g. a Lipschitz projection)
    """

    name: str
    library: str
    family: str  # glow-like | realnvp-like | residual | autoregressive | spline
    module: nn.Module
    log_prob: Callable[[nn.Module, Tensor], Tensor]
    forward: Callable[[nn.Module, Tensor], Tensor]
    inverse: Callable[[nn.Module, Tensor], Tensor]
    hidden: int = 0
    after_step: Callable[[nn.Module], None] | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return count_params(self.module)


Builder = Callable[..., Contender]  # builder(hidden=..., preprocess=..., shape=EVENT_SHAPE) -> Contender


def count_params(module: nn.Module) -> int:
    """Trainable parameters (shared tensors once)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad}
    return sum(p.numel() for p in seen.values())


def match_hidden(build: Callable[[int], nn.Module | Contender], target: int, *,
                 lo: int = MATCH_MIN_HIDDEN, hi: int = MATCH_MAX_HIDDEN) -> int:
    """The width in ``[lo, hi]`` whose parameter count is closest to ``target`` (doubling, then binary
    search, so no model much larger than the target is built; assumes the count does not decrease
    with the width)."""
    seen: dict[int, int] = {}

    def n(h: int) -> int:
        if h not in seen:
            m = build(h)
            seen[h] = m.n_params if isinstance(m, Contender) else count_params(m)
        return seen[h]

    if n(lo) >= target:
        return lo
    up = lo
    while up < hi and n(up) < target:  # invariant: n(lo) < target
        lo, up = up, min(2 * up, hi)
    if n(up) < target:  # up == hi
        return hi
    hi = up  # n(lo) < target <= n(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if abs(n(lo) - target) <= abs(n(hi) - target) else hi


class Preprocess(nn.Module):
    """The pre-transform shared by every peer model: ``Logit(alpha)`` of stableflows (inputs outside
    ``[0, 1]`` raise :class:`~stableflows.transforms.base.InputOutsideDomain`, like stableflows'
    own models) or the identity (``kind="none"``)."""

    def __init__(self, kind: str = "logit", alpha: float = LOGIT_ALPHA):
        super().__init__()
        if kind not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {kind!r}")
        self.kind = kind
        self.logit: Transform | None = Logit(alpha) if kind == "logit" else None

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.logit is None:
            return v, torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        return self.logit(v)

    def inverse(self, y: Tensor) -> Tensor:
        return y if self.logit is None else self.logit.inverse(y)[0]


def standard_normal_logp(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per example ``(B,)``."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * flat.pow(2).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
