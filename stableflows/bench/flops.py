"""The physical limit: a training step's achieved floating-point rate against a large matmul's.

    fraction = (FLOPs of one training step / seconds per step) / (2 n^3 / seconds per n x n matmul)

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` over the forward and
backward pass of the loss (the optimizer step and Python overhead are not counted, but they are
in the measured time). The counter knows matrix products and convolutions (``mm``, ``addmm``,
``bmm``, ``convolution`` and their backward); elementwise operations, reductions and
``linalg`` solves are not counted, so the fraction is a lower bound of the arithmetic done, and
the useful reading is "how far is this step from what the hardware's best kernel sustains here".
The reference is the best of several timed ``n x n`` float32 products (``2 n^3`` FLOPs each) in the
same process, with the same thread count, measured right before or after the model's run.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_flops", "matmul_rate", "MATMUL_N", "MATMUL_REPEATS", "flops_by_operator"]

MATMUL_N = 1024  # size of the reference matmul (2 n^3 = 2.1 GFLOP)
MATMUL_REPEATS = 7  # timed repeats; the best one is the rate
MATMUL_WARMUP = 2


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions run by ``fn()`` (forward and backward if
    ``fn`` calls ``backward``)."""
    return sum(flops_by_operator(fn).values())


def flops_by_operator(fn: Callable[[], object]) -> dict[str, int]:
    """``{operator name: FLOPs}`` of ``fn()``, counted by
    :class:`~torch.utils.flop_counter.FlopCounterMode`. Its module tracker fails when ``fn`` calls
    ``torch.autograd.grad`` inside a forward pass (residual flows' backward-in-forward); then the
    same per-operator formulas (``flop_registry``) are applied by :class:`_RegistryCounter`, which
    tracks no modules. ``fn`` may run twice."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError:
        with _RegistryCounter() as plain:
            fn()
        return dict(plain.by_op)
    counts = counter.get_flop_counts().get("Global", {})
    return {str(op): int(v) for op, v in counts.items()}


class _RegistryCounter(TorchDispatchMode):
    """Sum ``flop_registry[op](*args, out_val=out)`` over every dispatched operator."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.by_op[str(packet)] += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int = MATMUL_N, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                repeats: int = MATMUL_REPEATS) -> dict[str, float]:
    """The FLOP rate of a large ``n x n`` matmul here: ``{"n", "seconds", "flops_per_s"}`` (best of
    ``repeats`` after ``MATMUL_WARMUP`` untimed products)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(MATMUL_WARMUP):
        torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": float(n), "seconds": best, "flops_per_s": 2.0 * n ** 3 / best}
