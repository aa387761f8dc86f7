"""The layer contract shared by every transform, composite and model in stableflows.

A :class:`Transform` is a bijection ``F`` between data space and latent space::

    z, logdet = t.forward(x)    # z = F(x),      logdet = log|det dF/dx|    shape (B,)
    x, logdet = t.inverse(z)    # x = F^-1(z),   logdet = log|det dF^-1/dz| = -log|det dF/dx| at x

``forward`` maps data to latent (the convention of nflows and zuko). Log-dets are per example,
shape ``(B,)``, summed over every non-batch dimension. Composition adds log-dets
(:class:`Compose`); :class:`Inverse` swaps the two directions.

Subclasses implement ``_forward`` and ``_inverse``; the public ``forward``/``inverse`` wrap them so
that a :class:`Tracer` can record every layer call (the audit localises failures with it and the
memory-saving backward pass walks it). A layer may put diagnostics of its last call in
``self.stats`` (a flat ``dict[str, float]``: smallest affine scale, fixed-point iterations, ...); the
tracer copies them.

Iterative inverses never fail silently: they record iterations and final residual in ``stats`` and
raise :class:`InverseNotConverged` when ``strict`` is set.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "StableflowsError",
    "ShapeError",
    "NonFiniteInputError",
    "InputOutsideDomain",
    "InverseNotConverged",
    "Transform",
    "Compose",
    "Inverse",
    "Identity",
    "Tracer",
    "TraceRecord",
    "trace",
    "sum_except_batch",
    "check_finite",
    "check_shape",
]


# ----------------------------------------------------------------------------- errors
class StableflowsError(Exception):
    """Base class of every error stableflows raises on purpose."""


class ShapeError(StableflowsError, ValueError):
    """An input has the wrong shape, number of dimensions or dtype."""


class NonFiniteInputError(StableflowsError, ValueError):
    """An input contains NaN or inf."""


class InputOutsideDomain(StableflowsError, ValueError):
    """An input lies outside the domain of a transform (e.g. logit of a value outside [0, 1])."""


class InverseNotConverged(StableflowsError, RuntimeError):
    """An iterative inverse stopped before reaching its tolerance (raised in strict mode)."""

    def __init__(self, message: str, *, iterations: int, residual: float):
        super().__init__(message)
        self.iterations = iterations
        self.residual = residual


# ----------------------------------------------------------------------------- helpers
def sum_except_batch(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise :class:`NonFiniteInputError` naming how many entries of ``x`` are NaN or inf."""
    if not torch.is_tensor(x):
        raise ShapeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ShapeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NonFiniteInputError(f"{what} contains {n_nan} NaN and {n_inf} inf entries")


def check_shape(x: Tensor, event_shape: Sequence[int], what: str = "input") -> None:
    """Raise :class:`ShapeError` unless ``x`` has shape ``(B, *event_shape)`` with B >= 1."""
    expected = tuple(int(s) for s in event_shape)
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise ShapeError(
            f"{what} must have shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ShapeError(f"{what} has an empty batch")


# ----------------------------------------------------------------------------- tracing
@dataclass
class TraceRecord:
    """One layer call seen by a :class:`Tracer` (in call order)."""

    name: str  # dotted module path inside the traced root ("" for the root)
    direction: str  # "forward" or "inverse"
    depth: int  # nesting depth of the call (root = 0)
    in_norm: Tensor  # (B,) L2 norm of the input per example
    out_norm: Tensor  # (B,) L2 norm of the output per example
    out_absmax: Tensor  # (B,) largest |output| per example
    out_finite: Tensor  # (B,) bool, every output entry finite
    logdet: Tensor  # (B,)
    stats: dict = field(default_factory=dict)
    input: Tensor | None = None  # kept only when the tracer keeps tensors
    output: Tensor | None = None


class Tracer:
    """Records every :class:`Transform` call made under it; see :func:`trace`."""

    def __init__(self, root: nn.Module | None = None, keep_tensors: bool = False):
        self.records: list[TraceRecord] = []
        self.keep_tensors = keep_tensors
        self._names = {id(m): n for n, m in root.named_modules()} if root is not None else {}
        self._depth = 0

    def _record(self, module: "Transform", direction: str, inp: Tensor, out: Tensor, logdet: Tensor,
                depth: int) -> None:
        with torch.no_grad():
            b = inp.shape[0]
            i2 = inp.detach().reshape(b, -1)
            o2 = out.detach().reshape(b, -1)
            rec = TraceRecord(
                name=self._names.get(id(module), type(module).__name__),
                direction=direction,
                depth=depth,
                in_norm=i2.norm(dim=1),
                out_norm=o2.norm(dim=1),
                out_absmax=o2.abs().amax(dim=1),
                out_finite=torch.isfinite(o2).all(dim=1),
                logdet=logdet.detach().clone(),
                stats=dict(getattr(module, "stats", {}) or {}),
                input=inp.detach().clone() if self.keep_tensors else None,
                output=out.detach().clone() if self.keep_tensors else None,
            )
        self.records.append(rec)

    def leaves(self) -> list[TraceRecord]:
        """Records of layers that have no traced children (the elementary layers), in call order."""
        out = []
        for i, r in enumerate(self.records):
            # children are recorded before their parent (post-order); a leaf has no deeper record
            # directly preceding it at depth + 1 within its own span.
            j = i - 1
            has_child = j >= 0 and self.records[j].depth > r.depth
            if not has_child:
                out.append(r)
        return out


_ACTIVE_TRACERS: list[Tracer] = []


@contextlib.contextmanager
def trace(root: nn.Module | None = None, keep_tensors: bool = False) -> Iterator[Tracer]:
    """Record every transform call inside the block::

        with trace(flow) as t:
            flow.inverse(z)
        for r in t.leaves(): print(r.name, r.out_absmax.max())
    """
    tracer = Tracer(root, keep_tensors)
    _ACTIVE_TRACERS.append(tracer)
    try:
        yield tracer
    finally:
        _ACTIVE_TRACERS.remove(tracer)


# ----------------------------------------------------------------------------- contract
class Transform(nn.Module):
    """Base class of every bijection.

    Contract (see module docstring): ``forward(x) -> (z, log|det dz/dx|)`` and
    ``inverse(z) -> (x, log|det dx/dz|)``, log-dets of shape ``(B,)``, and
    ``inverse(forward(x)[0])[1] == -forward(x)[1]``. Subclasses implement ``_forward`` and
    ``_inverse``. ``stats`` holds diagnostics of the last call.
    """

    stats: dict

    def __init__(self) -> None:
        super().__init__()
        self.stats = {}

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _call(self, fn, x: Tensor, direction: str) -> tuple[Tensor, Tensor]:
        if not _ACTIVE_TRACERS:
            return fn(x)
        depths = [t._depth for t in _ACTIVE_TRACERS]
        for t in _ACTIVE_TRACERS:
            t._depth += 1
        try:
            y, ld = fn(x)
        finally:
            for t in _ACTIVE_TRACERS:
                t._depth -= 1
        for t, d in zip(_ACTIVE_TRACERS, depths):
            t._record(self, direction, x, y, ld, d)
        return y, ld

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(self._forward, x, "forward")

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(self._inverse, z, "inverse")


class Identity(Transform):
    """``z = x``, log-det 0."""

    def _forward(self, x):
        return x, x.new_zeros(x.shape[0])

    def _inverse(self, z):
        return z, z.new_zeros(z.shape[0])


class Compose(Transform):
    """``F = F_n o ... o F_1``: forward applies the layers in order and adds their log-dets."""

    def __init__(self, *layers: Transform):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Transform):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not a Transform")
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def _forward(self, x):
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            total = total + ld
        return x, total

    def _inverse(self, z):
        total = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            total = total + ld
        return z, total


class Inverse(Transform):
    """The inverse of a transform: ``Inverse(t).forward == t.inverse`` and vice versa."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def _forward(self, x):
        return self.transform.inverse(x)

    def _inverse(self, z):
        return self.transform(z)


LOG_2PI = math.log(2 * math.pi)
