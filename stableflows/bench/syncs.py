"""Host synchronisations of a training step, counted with ``torch.profiler``.

Every ``float(t)``, ``int(t)``, ``bool(t)`` or ``t.item()`` of a tensor runs the op
``aten::_local_scalar_dense``; on a GPU each one stops the host until the device has drained its
queue (and ``torch.compile`` breaks its graph there). Its count in a profiled step does not depend
on the machine's load, so it is measured on any CPU. Not counted: ``tensor.tolist()`` and ``.cpu()``
copies, which never go through that op (on a CPU tensor they read nothing from a device; for a GPU
use ``torch.cuda.set_sync_debug_mode("warn")``, as ``benchmarks/gpu.py`` does).

A *training step* here is what the training loop does with the model: zero the gradients,
``loss = -mean log p(x)``, ``backward``, clip the gradient norm (a tensor, not read), fused AdamW
(not counted, see :func:`training_step_syncs`), any ``after_step`` projection of the model, and the
loop's own finiteness check of the loss (one read). The loop validates its data once before the first step, so the step runs with
:func:`~stableflows.transforms.base.validation` off unless ``validate=True``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from ..transforms.base import validation

__all__ = ["SYNC_OP", "count_syncs", "training_step_syncs", "eval_syncs"]

SYNC_OP = "aten::_local_scalar_dense"  # the op behind float(t) / int(t) / bool(t) / t.item()


def count_syncs(fn: Callable[[], object]) -> int:
    """Number of ``aten::_local_scalar_dense`` calls while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == SYNC_OP)


def _optimizer(module: nn.Module) -> torch.optim.Optimizer:
    from ..train.optim import adamw

    return adamw([p for p in module.parameters() if p.requires_grad], lr=1e-4)


def training_step_syncs(module: nn.Module, log_prob: Callable[[Tensor], Tensor], x: Tensor, *,
                        after_step: Callable[[], None] | None = None, validate: bool = False,
                        warmup: int = 1) -> int:
    """Host syncs of one training step of ``module`` on the batch ``x`` (module docstring), after
    ``warmup`` unprofiled steps (data-dependent initialisation, lazy optimizer state).

    The optimizer's update runs outside the count: AdamW reads its per-parameter step counters, on
    a CPU as host tensors (counted by the op, but no device is involved), on a GPU inside the fused
    kernel (no read at all); the GPU script measures whole steps with the CUDA sync debug mode."""
    opt = _optimizer(module)
    module.train()

    def model_part():
        with validation(validate):
            opt.zero_grad(set_to_none=True)
            loss = -log_prob(x).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), math.inf)
            return loss

    def rest(loss):
        if after_step is not None:
            after_step()
        return bool(torch.isfinite(loss.detach()))  # the training loop's own check: one read

    for _ in range(warmup):
        loss = model_part()
        opt.step()
        rest(loss)
    box = {}
    n = count_syncs(lambda: box.setdefault("loss", model_part()))
    opt.step()
    return n + count_syncs(lambda: rest(box["loss"]))


def eval_syncs(module: nn.Module, log_prob: Callable[[Tensor], Tensor], x: Tensor, *, validate: bool = False) -> int:
    """Host syncs of one evaluation-mode ``log_prob`` without gradients."""
    module.eval()

    def run():
        with torch.no_grad(), validation(validate):
            log_prob(x)

    run()
    return count_syncs(run)
