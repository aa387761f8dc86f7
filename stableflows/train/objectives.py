"""Training objectives. The loop hands each one a :class:`Batch`; an objective returns
``(loss, logs)``: a scalar to minimise and a flat dict of floats to average and log.

Maximum likelihood on discrete data with ``L`` levels uses uniform dequantisation (Theis et al.
2016; docs/METRICS.md): ``v = (x + u) / L`` with fresh ``u ~ U[0,1)^D`` every batch (the loop draws
``u``), and the loss is the mean bits/dim

    bpd = -(log p(v) - D ln L) / (D ln 2),

an upper bound on the discrete model's code length. On continuous data (2-D toys) it is the
mean negative log-likelihood in nats. Classification and hybrid objectives implement the same
:class:`Objective` protocol.

:class:`ConditionalMaximumLikelihood` is the objective of a conditional flow (cINN) trained on
labelled data: the same loss of ``log p(v | y)``, the labels one-hot encoded as the context
(``stableflows.models.conditional.one_hot``); it evaluates the conditional bits/dim (nats) of a
split with the fixed test-time noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..metrics import nats_to_bpd

__all__ = ["Batch", "Objective", "MaximumLikelihood", "ConditionalMaximumLikelihood", "conditional_objective"]


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

    def log_prob(self, model: nn.Module, batch: Batch) -> Tensor:
        """``log p`` of the batch, ``(B,)``."""
        return model.log_prob(batch.x)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        log_p = self.log_prob(model, batch)  # (B,)
        if batch.levels is not None:
            loss = nats_to_bpd(log_p, batch.x[0].numel(), batch.levels).mean()
            return loss, {"bpd": float(loss.detach())}
        loss = -log_p.mean()
        return loss, {"nll": float(loss.detach())}


class ConditionalMaximumLikelihood(MaximumLikelihood):
    """Mean bits/dim (nats) of ``log p(v | y)`` with the labels one-hot as the context of a
    conditional flow with ``classes`` context features; selects on the conditional validation
    ``metric`` (``"bpd"`` with ``levels``, else ``"nll"``)."""

    name = "conditional_ml"

    def __init__(self, classes: int, levels: int | None):
        self.classes = int(classes)
        self.metric = "bpd" if levels is not None else "nll"

    def context(self, y: Tensor | None, dtype: torch.dtype) -> Tensor:
        from ..models.conditional import one_hot

        if y is None:
            raise ValueError("a conditional objective needs labels (batch.y is None): use a labelled data set")
        return one_hot(y, self.classes, dtype=dtype)

    def log_prob(self, model: nn.Module, batch: Batch) -> Tensor:
        return model.log_prob(batch.x, context=self.context(batch.y, batch.x.dtype))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, levels: int | None, *, batch_size: int = 512,
                 seed: int = 0) -> dict[str, float]:
        """``{metric: mean conditional bpd (fixed noise of seed) or NLL in nats}`` of a split."""
        from .evaluate import fixed_noise, frozen_rng

        device = next((p.device for p in model.parameters()), x.device)
        was = model.training
        model.eval()
        u = fixed_noise(tuple(x.shape), seed, x.dtype) if levels is not None else None
        total, n = 0.0, x.shape[0]
        try:
            with frozen_rng(device):
                for i in range(0, n, batch_size):
                    v = x[i:i + batch_size].to(device)
                    if levels is not None:
                        v = (v + u[i:i + batch_size].to(device)) / levels
                    c = self.context(y[i:i + batch_size].to(device), v.dtype)
                    lp = model.log_prob(v, context=c)
                    per = nats_to_bpd(lp, v[0].numel(), levels) if levels is not None else -lp  # (b,)
                    total += float(per.double().sum())
        finally:
            model.train(was)
        return {self.metric: total / n if n else math.nan}


def conditional_objective(objective: Objective, model: nn.Module, splits) -> Objective:
    """``objective``, or for plain maximum likelihood of a conditional flow the
    :class:`ConditionalMaximumLikelihood` of its labels; a :class:`~stableflows.config.ConfigError`
    when the data have no labels or more classes than the flow's context has features."""
    from ..config import ConfigError

    cs = getattr(model, "context_shape", None)
    if cs is None or type(objective) is not MaximumLikelihood:
        return objective
    if len(cs) != 1:
        raise ConfigError(f"a conditional flow with context shape {cs} cannot be trained on class labels: the "
                          "labels become one-hot contexts of shape (n_classes,)")
    if getattr(splits, "y_train", None) is None or getattr(splits, "y_val", None) is None \
            or getattr(splits, "y_test", None) is None:
        raise ConfigError(f"model {type(model).__name__} is conditional (a cinn): it needs labels, but data set "
                          f"{splits.name} has none (use a labelled data set: digits, mnist, fashion-mnist, cifar10, "
                          "svhn)")
    labels = torch.cat([splits.y_train, splits.y_val, splits.y_test])
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= cs[0]:
        raise ConfigError(f"data set {splits.name} has labels {lo}..{hi}, but the conditional flow takes contexts "
                          f"of {cs[0]} features (model.context_features / model.n_classes)")
    return ConditionalMaximumLikelihood(cs[0], splits.levels)
