"""Supervised objectives for invertible classifiers and hybrid models (the :class:`Objective`
protocol of :mod:`.objectives`: ``loss(model, batch) -> (loss, logs)``).

* :class:`ClassificationObjective`: cross-entropy of ``head(F(x))``, optionally plus the
  bi-directional finite-difference penalty and the normalizing-flow objective as regularizers
  (Behrmann et al. 2020, poster: "Supervised Learning w/ Memory-Efficient Gradients").
* :class:`HybridObjective`: ``-(lam log p(x) + log p(y|x))`` per example, in nats (Chen et al. 2019,
  eq. 11; Nalisnick et al. 2019), ``lam`` from the objective or the model.

Both need ``batch.y`` and a model with ``features(x) -> (z, logdet)`` and ``head``
(:class:`stableflows.models.classifier.InvertibleClassifier`); one pass through the flow serves the
cross-entropy, the density and the forward FD reference ``F(x)``. Regularizers applied "every k
steps" count steps through :meth:`set_step` (the loop, or :class:`stableflows.memory.GradientGuard`,
sets it); without it the objective counts its own training-mode calls.

:meth:`evaluate` gives accuracy, cross-entropy and bits/dim of a split with the fixed test-time
dequantisation noise (docs/METRICS.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..regularizers import FD_EPS, FD_EVERY, FiniteDifferenceRegularizer, FlowObjectiveRegularizer, nll_per_dim
from ..transforms.base import ShapeError
from .evaluate import EVAL_BATCH, EVAL_SEED, eval_batch, fixed_noise, frozen_rng
from .objectives import Batch

__all__ = ["ClassificationObjective", "HybridObjective", "evaluate_classifier", "make_objective", "OBJECTIVES"]


class _Supervised:
    """Step counting and the shared forward pass."""

    name = "supervised"
    metric = "error"  # validation metric to minimise: 1 - accuracy

    def __init__(self, *, fd: FiniteDifferenceRegularizer | None = None, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.fd = fd
        self.label_smoothing = float(label_smoothing)
        self.step = 0
        self._external_step = False

    def set_step(self, step: int) -> None:
        """The training step the next :meth:`loss` belongs to (drives "every k steps")."""
        self.step = int(step)
        self._external_step = True

    def _advance(self, model: nn.Module) -> None:
        if model.training and not self._external_step:
            self.step += 1

    @staticmethod
    def _labels(model: nn.Module, batch: Batch) -> Tensor:
        if batch.y is None:
            raise ShapeError("a supervised objective needs labels (batch.y is None): use a labelled data set")
        y = batch.y
        if y.dim() != 1 or y.shape[0] != batch.x.shape[0]:
            raise ShapeError(f"labels must have shape ({batch.x.shape[0]},), got {tuple(y.shape)}")
        return y

    def _ce(self, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(dim=1) == y).double().mean()
        return ce, {"ce": float(ce.detach()), "acc": float(acc)}

    def _fd(self, model, x, z) -> tuple[Tensor, dict[str, float]]:
        if self.fd is None:
            return x.new_zeros(()), {}
        return self.fd(model.flow, x, z=z, step=self.step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, levels: int | None, *,
                 batch_size: int = EVAL_BATCH, seed: int = EVAL_SEED) -> dict[str, float]:
        """``{"acc", "error", "ce", "bpd" or "nll"}`` of a split (see :func:`evaluate_classifier`)."""
        return evaluate_classifier(model, x, y, levels, batch_size=batch_size, seed=seed)


class ClassificationObjective(_Supervised):
    """``CE(head(F(x)), y) [+ FD penalty] [+ nf.weight * bits/dim]``.

    Args:
        fd: a :class:`~stableflows.regularizers.FiniteDifferenceRegularizer` (forward and/or inverse).
        nf: a :class:`~stableflows.regularizers.FlowObjectiveRegularizer` (NF objective, small weight).
        label_smoothing: of the cross-entropy.
    """

    name = "classification"

    def __init__(self, *, fd: FiniteDifferenceRegularizer | None = None, nf: FlowObjectiveRegularizer | None = None,
                 label_smoothing: float = 0.0):
        super().__init__(fd=fd, label_smoothing=label_smoothing)
        self.nf = nf

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        y = self._labels(model, batch)
        z, logdet = model.features(batch.x)  # (B, *latent), (B,)
        loss, logs = self._ce(model.head(z), y)
        if self.nf is not None:
            pen, l_nf = self.nf(z, logdet, levels=batch.levels, step=self.step)
            loss, logs = loss + pen, {**logs, **l_nf}
        pen, l_fd = self._fd(model, batch.x, z)
        loss, logs = loss + pen, {**logs, **l_fd}
        self._advance(model)
        return loss, logs


class HybridObjective(_Supervised):
    """``mean_B[ lam * (-log p(x)) + CE(head(F(x)), y) ]`` in nats [+ FD penalty].

    ``-log p(x)`` is that of the dequantised data ``v`` including the discrete correction
    ``D ln L`` (so it equals ``D ln 2 * bpd``; the constant does not change gradients). ``lam``
    defaults to ``model.lam``; ``lam = 1 / D`` weighs the density per dimension, ``lam = 0`` is a pure
    classifier.
    """

    name = "hybrid"

    def __init__(self, *, lam: float | None = None, fd: FiniteDifferenceRegularizer | None = None,
                 label_smoothing: float = 0.0):
        super().__init__(fd=fd, label_smoothing=label_smoothing)
        if lam is not None and not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        y = self._labels(model, batch)
        lam = float(model.lam if self.lam is None else self.lam)
        z, logdet = model.features(batch.x)
        ce, logs = self._ce(model.head(z), y)
        per_dim = nll_per_dim(z, logdet, batch.levels)  # (B,) bits/dim or nats/dim
        dim = z[0].numel()
        nll_nats = per_dim * dim * (math.log(2.0) if batch.levels is not None else 1.0)  # (B,)
        loss = ce + lam * nll_nats.mean() if lam > 0 else ce
        logs[("bpd" if batch.levels is not None else "nats_per_dim")] = float(per_dim.detach().mean())
        pen, l_fd = self._fd(model, batch.x, z)
        loss, logs = loss + pen, {**logs, **l_fd}
        self._advance(model)
        return loss, logs


OBJECTIVES = ("classification", "hybrid")


def make_objective(kind: str, *, fd_forward: float = 0.0, fd_inverse: float = 0.0, fd_eps: float = FD_EPS,
                   fd_every: int = FD_EVERY, fd_mode: str = "fd", nf_weight: float = 0.0, lam: float | None = None,
                   label_smoothing: float = 0.0) -> _Supervised:
    """The supervised objective ``kind`` from flat options (what config fields / CLI flags map onto):
    FD weights of the forward and inverse terms (0 disables a term), step ``fd_eps``, every
    ``fd_every`` steps, ``fd_mode`` (``"fd"`` finite differences | ``"jvp"`` exact ``||J d||^2``);
    ``nf_weight`` of the NF regularizer (classification only; 0 disables); ``lam`` of the hybrid
    objective (None: the model's)."""
    fd = None
    if fd_forward > 0 or fd_inverse > 0:
        fd = FiniteDifferenceRegularizer(weight_forward=fd_forward, weight_inverse=fd_inverse, eps=fd_eps,
                                         every=fd_every, mode=fd_mode)
    if kind == "classification":
        nf = FlowObjectiveRegularizer(weight=nf_weight) if nf_weight > 0 else None
        return ClassificationObjective(fd=fd, nf=nf, label_smoothing=label_smoothing)
    if kind == "hybrid":
        if nf_weight > 0:
            raise ValueError("the hybrid objective already contains log p(x): use lam, not nf_weight")
        return HybridObjective(lam=lam, fd=fd, label_smoothing=label_smoothing)
    raise ValueError(f"unknown supervised objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: Tensor, y: Tensor, levels: int | None, *,
                        batch_size: int = EVAL_BATCH, seed: int = EVAL_SEED) -> dict[str, float]:
    """Accuracy, error, mean cross-entropy and mean bits/dim (nats/dim on continuous data) of a split.

    ``x`` holds integer levels for discrete data, dequantised with the fixed noise of ``seed``
    (docs/METRICS.md). Non-finite densities are reported as computed; the random streams do not move.
    """
    device = next((p.device for p in model.parameters()), x.device)
    was = model.training
    model.eval()
    u = fixed_noise(tuple(x.shape), seed, x.dtype) if levels is not None else None
    correct, ce_sum, dens_sum, n = 0, 0.0, 0.0, x.shape[0]
    batch_size = eval_batch(x, device, batch_size)
    try:
        with frozen_rng(device):
            for i in range(0, n, batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                if levels is not None:
                    xb = (xb + u[i:i + batch_size].to(device)) / levels
                z, logdet = model.features(xb)
                logits = model.head(z)
                correct += int((logits.argmax(dim=1) == yb).sum())
                ce_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                dens_sum += float(nll_per_dim(z, logdet, levels).double().sum())
    finally:
        model.train(was)
    acc = correct / n
    density = "bpd" if levels is not None else "nats_per_dim"
    return {"acc": acc, "error": 1.0 - acc, "ce": ce_sum / n, density: dens_sum / n}
