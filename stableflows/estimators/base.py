"""Common interface of the log-det estimators of a residual block ``F(x) = x + g(x)``.

An estimator is called as ``gx, logdet = estimator(g, x, training=...)``: it evaluates ``g`` *once*
on ``x`` (B, *S) and returns ``g(x)`` (B, *S) and an estimate of ``log|det(I + J_g(x))|`` (B,),
both carrying the gradients the estimator defines. ``estimator.stats`` holds diagnostics of the
last call (number of series terms). ``g`` must treat the examples of a batch independently.

Hutchinson probes (Skilling 1989; Hutchinson 1990): ``tr(A) = E_v[v^T A v]`` for ``E[v v^T] = I``,
with ``v`` Gaussian or Rademacher (+-1, lower variance).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["LogDetEstimator", "PROBES", "sample_probe", "batch_dot", "local_graph", "graph_leaf"]

PROBES = ("gaussian", "rademacher")


def sample_probe(like: Tensor, kind: str) -> Tensor:
    """A probe ``v`` of the shape of ``like`` from torch's global RNG."""
    if kind == "gaussian":
        return torch.randn_like(like)
    if kind == "rademacher":
        return torch.randint_like(like, 0, 2).mul_(2).sub_(1)
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product ``(B, *S), (B, *S) -> (B,)``."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


@contextlib.contextmanager
def local_graph() -> Iterator[None]:
    """Autograd on inside the block, also under ``torch.no_grad`` and ``torch.inference_mode``: the
    series needs vector-Jacobian products even when the caller only wants values."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def graph_leaf(x: Tensor) -> Tensor:
    """A leaf copy of ``x`` that requires grad (a real copy for inference-mode tensors)."""
    return (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)


class LogDetEstimator:
    """Base class: ``(gx, logdet) = estimator(g, x, training=...)``."""

    name = "base"

    def __init__(self) -> None:
        self.stats: dict = {}

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor, *, training: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "stats" and not k.startswith("_"))
        return f"{type(self).__name__}({opts})"
