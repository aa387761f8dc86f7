"""Training objectives. The loop hands each one a :class:`Batch`; an objective returns
``(loss, logs)``: a scalar to minimise and a flat dict of floats to average and log.

Maximum likelihood on discrete data with ``L`` levels uses uniform dequantisation (Theis et al.
2016; docs/METRICS.md): ``v = (x + u) / L`` with fresh ``u ~ U[0,1)^D`` every batch (the loop draws
``u``), and the loss is the mean bits/dim

    bpd = -(log p(v) - D ln L) / (D ln 2),

an upper bound on the discrete model's code length. On continuous data (2-D toys) it is the
mean negative log-likelihood in nats. Classification and hybrid objectives implement the same
:class:`Objective` protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from ..metrics import nats_to_bpd

__all__ = ["Batch", "Objective", "MaximumLikelihood"]


@dataclass
class Batch:
    """One training batch.

    x: model-space input ``(B, *shape)``: dequantised ``(raw + u) / L`` for discrete data, ``raw``
       for continuous data.
    raw: the batch as stored (integer levels for discrete data).
    y: labels ``(B,)`` or None.
    levels: number of discrete levels ``L``, or None for continuous data.
    """

    x: Tensor
    raw: Tensor
    y: Tensor | None
    levels: int | None


@runtime_checkable
class Objective(Protocol):
    """``loss(model, batch) -> (scalar loss, {name: float})``."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]: ...


class MaximumLikelihood:
    """Mean bits/dim (discrete data) or mean NLL in nats (continuous data) of a flow."""

    name = "ml"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        log_p = model.log_prob(batch.x)  # (B,)
        if batch.levels is not None:
            loss = nats_to_bpd(log_p, batch.x[0].numel(), batch.levels).mean()
            return loss, {"bpd": float(loss.detach())}
        loss = -log_p.mean()
        return loss, {"nll": float(loss.detach())}
