"""Exponential moving average (Polyak averaging) of the weights, used for evaluation.

    theta_ema <- d_t * theta_ema + (1 - d_t) * theta,    d_t = min(decay, (1 + t) / (10 + t))

``t`` counts updates; the warm-up of ``d_t`` keeps the average from being dominated by the
initial weights in short runs (Polyak & Juditsky 1992; the ramp as in TensorFlow's
``ExponentialMovingAverage(num_updates=...)``). Floating-point buffers are averaged the same way;
other buffers (integer permutations, initialisation flags) are copied, and so are the power-iteration
vectors of spectrally normalised layers: an average of unit vectors is shorter than 1, so ``u^T W v``
would underestimate the norm of the averaged weight and leave it under-normalised (Lipschitz
constant above ``c``). Models with such layers re-converge them for the averaged weights on
``eval()`` (:class:`~stableflows.transforms.lipschitz.RefreshOnEval`). ``decay = 0`` disables the
average: the copy then equals the live weights after every update.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..transforms.lipschitz import power_iteration_buffers

__all__ = ["EMA"]

EMA_RAMP_OFFSET = 10.0  # d_t = min(decay, (1 + t) / (EMA_RAMP_OFFSET + t))


class EMA:
    """An averaged copy of ``model`` (``ema.module``) for evaluation.

    Args:
        model: the live model; copied once (deep copy) at construction.
        decay: target decay in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.num_updates = 0
        self._copied = power_iteration_buffers(self.module)  # copied, never averaged

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (EMA_RAMP_OFFSET + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        live = model.state_dict()
        avgs, news = [], []
        for name, avg in self.module.state_dict().items():
            new = live[name]
            if name in self._copied and avg.shape != new.shape:  # lazily sized conv vectors
                self.module.load_state_dict({name: new}, strict=False)
            elif torch.is_floating_point(avg) and d > 0.0 and name not in self._copied:
                avgs.append(avg)
                news.append(new.to(avg.dtype))
            else:
                avg.copy_(new)
        if avgs:  # avg + (1 - d)(new - avg), one multi-tensor kernel
            torch._foreach_lerp_(avgs, news, 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
