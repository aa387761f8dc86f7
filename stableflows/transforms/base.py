"""The layer contract shared by every transform, composite and model in stableflows.

A :class:`Transform` is a bijection ``F`` between data space and latent space::

    z, logdet = t.forward(x)    # z = F(x),      logdet = log|det dF/dx|    shape (B,)
    x, logdet = t.inverse(z)    # x = F^-1(z),   logdet = log|det dF^-1/dz| = -log|det dF/dx| at x

``forward`` maps data to latent (the convention of nflows and zuko). Log-dets are per example,
shape ``(B,)``, summed over every non-batch dimension. Composition adds log-dets
(:class:`Compose`); :class:`Inverse` swaps the two directions.

Subclasses implement ``_forward`` and ``_inverse``; the public ``forward``/``inverse`` wrap them so
that a :class:`Tracer` can record every layer call (the audit localises failures with it and the
memory-saving backward pass walks it).

The hot path reads no device value (no ``float(t)``, ``bool(t)``, ``.item()`` of a tensor: each one
stops the host until a GPU drains its queue, and ``torch.compile`` cannot trace through it):

* **Validation at the entry.** Only the outermost public call (the model's ``log_prob`` /
  ``forward`` / ``inverse``, or a layer called on its own) checks its input: a tensor of floating
  dtype (the model's, a float64 input to a float32 model is refused), a non-empty batch, the event
  shape, and the domain of the first layer on the path (``Logit``: data in [0, 1]); a density
  (``Flow.log_prob``) also refuses NaN / inf inputs, while ``forward`` / ``inverse`` propagate them
  (what the audit measures). Nested layers trust their input. :func:`validation` switches the checks off (the training loop
  validates its data once before the first step; compiled code skips them, ``torch.compile`` cannot
  raise on data).
* **Diagnostics only when asked.** A layer puts diagnostics of its last call in ``self.stats`` (a
  flat dict: smallest affine scale, fixed-point iterations, ...) only while a :class:`Tracer` or
  :func:`collect_stats` asks for them (:func:`stats_wanted`), as 0-d tensors that nobody reads on the
  hot path; a tracer copies them and reads all of them at once when its records' ``stats`` are
  first looked at (one transfer for the whole trace). :func:`read_stats` gives a layer's as floats.

Conditional layers (cINNs: Ardizzone et al. 2019, "Analyzing inverse problems with invertible neural
networks"; "Guided image generation with conditional invertible neural networks") take a context
``c`` (a tensor ``(B, *context_shape)`` of the batch's size) and are bijections in ``x`` for every
fixed ``c``::

    z, logdet = t.forward(x, context=c)    # z = F(x; c),  logdet = log|det dF/dx (x; c)|
    x, logdet = t.inverse(z, context=c)

Composites (:class:`Compose`, :class:`Inverse`, multi-scale structures, flows) pass the context down
to every layer; unconditional layers keep their ``_forward(x)`` / ``_inverse(z)`` and never see it
(only classes with ``takes_context = True`` get ``_forward(x, context)``). A conditional layer sets
``context_shape``; :func:`context_shape_of` finds the one of a model. The entry check names a missing
context, one given to an unconditional model, and one of the wrong shape, batch size or dtype
(:class:`ContextError`); :func:`bind_context` fixes a context for a block (every conditional layer
then uses that one row for any batch: the audit audits a conditional flow one context at a time).

Iterative inverses never fail silently: they raise :class:`InverseNotConverged` when ``strict`` is
set, warn otherwise, and record iterations and final residual in ``stats`` when asked.
"""
from __future__ import annotations

import contextlib
import functools
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
    "ContextError",
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
    "check_tensor",
    "validation",
    "validation_enabled",
    "run_checked",
    "collect_stats",
    "stats_wanted",
    "read_stats",
    "context_shape_of",
    "requires_context",
    "check_context",
    "bind_context",
    "check_model_context",
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


class ContextError(ShapeError):
    """A conditional model got no context, or an unconditional one got one, or the context has the
    wrong shape, batch size or dtype."""


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


def check_tensor(x, what: str = "input", dtype: torch.dtype | None = None) -> None:
    """Raise :class:`ShapeError` unless ``x`` is a floating-point tensor with a batch dimension of
    at least one example, of ``dtype`` when given (autocast regions may mix dtypes and are not checked)."""
    if not torch.is_tensor(x):
        raise ShapeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ShapeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ShapeError(f"{what} has dtype {x.dtype} but the model computes in {dtype}: convert one of them "
                         f"(x.to({dtype}) or model.to({x.dtype}))")
    if x.dim() == 0:
        raise ShapeError(f"{what} must have a batch dimension, got a 0-d tensor")
    if x.shape[0] == 0:
        raise ShapeError(f"{what} has an empty batch (shape {tuple(x.shape)})")


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise :class:`NonFiniteInputError` naming how many entries of ``x`` are NaN or inf (one device
    read when ``x`` is finite)."""
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


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    """dtype holding most floating-point parameter entries of ``module`` (None without one): a single
    parameter of another dtype (a float64 constant in a float32 model) does not decide it."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if torch.is_floating_point(p):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


# ----------------------------------------------------------------------------- contexts
def context_shape_of(module: nn.Module) -> tuple[int, ...] | None:
    """The context event shape of the conditional layers inside ``module`` (None: unconditional).
    Raises ``ValueError`` when two of them expect different shapes (one context feeds them all)."""
    found: tuple[int, ...] | None = None
    for m in module.modules():
        shape = getattr(m, "context_shape", None)
        if isinstance(m, Transform) and shape is not None:
            if found is not None and tuple(shape) != found:
                raise ValueError(f"conditional layers expect contexts of shapes {found} and {tuple(shape)}: "
                                 "one context is passed to every layer")
            found = tuple(shape)
    return found


def requires_context(module: nn.Module) -> bool:
    """True when ``module`` holds a conditional layer without a context fixed by :func:`bind_context`."""
    return any(isinstance(m, Transform) and getattr(m, "context_shape", None) is not None
               and m._buffers.get("bound_context") is None for m in module.modules())


def check_context(context, context_shape: Sequence[int], batch: int, dtype: torch.dtype | None = None,
                  what: str = "context") -> None:
    """Raise :class:`ContextError` unless ``context`` is a floating tensor ``(batch, *context_shape)``
    (of ``dtype`` when given)."""
    cs = tuple(int(s) for s in context_shape)
    want = f"(batch, {', '.join(map(str, cs))})" if cs else "(batch,)"
    if not torch.is_tensor(context):
        raise ContextError(f"{what} must be a torch.Tensor {want}, got {type(context).__name__}")
    if not torch.is_floating_point(context):
        raise ContextError(f"{what} must be a floating-point tensor, got dtype {context.dtype} (one-hot encode "
                           "class labels: stableflows.models.conditional.one_hot(y, classes))")
    if dtype is not None and context.dtype != dtype and not torch.is_autocast_enabled(context.device.type):
        raise ContextError(f"{what} has dtype {context.dtype} but the model computes in {dtype}: convert it "
                           f"(context.to({dtype}))")
    if context.dim() != len(cs) + 1 or tuple(context.shape[1:]) != cs:
        raise ContextError(f"{what} must have shape {want}, got {tuple(context.shape)}")
    if context.shape[0] != batch:
        raise ContextError(f"{what} has {context.shape[0]} rows but the input has {batch} examples: "
                           "give one context row per example")


@contextlib.contextmanager
def bind_context(module: nn.Module, context: Tensor) -> Iterator[nn.Module]:
    """Inside the block every conditional layer of ``module`` called without a context uses
    ``context`` (shape ``context_shape`` or ``(1, *context_shape)``) for every example of any batch,
    so ``module`` acts as the unconditional map ``x -> F(x; context)``; calls that pass a context
    still use theirs. The fixed context is a non-persistent buffer of each layer (copies and
    ``.to(dtype)`` carry it; no ``state_dict`` entry) and is removed at the end of the block."""
    shape = context_shape_of(module)
    if shape is None:
        raise ContextError(f"{type(module).__name__} has no conditional layer: there is no context to bind")
    row = context.reshape(1, *context.shape) if tuple(context.shape) == shape else context
    check_context(row, shape, 1, what="bound context")
    layers = [m for m in module.modules() if isinstance(m, Transform) and getattr(m, "context_shape", None) is not None]
    before = [m._buffers.get("bound_context") for m in layers]
    for m in layers:
        dt = _module_dtype(m) or row.dtype
        dev = next((t.device for t in m.parameters()), row.device)
        m.register_buffer("bound_context", row.detach().to(device=dev, dtype=dt), persistent=False)
    try:
        yield module
    finally:
        for m, old in zip(layers, before):
            if old is None:
                m._buffers.pop("bound_context", None)
                m._non_persistent_buffers_set.discard("bound_context")
            else:
                m._buffers["bound_context"] = old


# ----------------------------------------------------------------------------- validation and stats switches
class _Switches:
    """Process-wide state of the two switches (plain attributes: ``torch.compile`` guards on them)."""

    validate = True  # input checks at the outermost public call
    inside = False  # within a call whose input was checked: nested layers trust their input
    stats = 0  # open collect_stats() blocks


_SWITCHES = _Switches()


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Switch the input checks of every public entry on or off inside the block::

        with validation(False):    # data validated once beforehand, or compiled training
            loss = -flow.log_prob(x).mean()

    Off, a bad input is not named: NaN propagates to the loss (the training loop's finiteness
    check catches it), an input outside a layer's domain gives NaN (e.g. the logit of a negative
    number). Backward-in-forward residual blocks then also skip the device read that checks the
    batch weights of their stored gradient (:mod:`stableflows.estimators.neumann`)."""
    before = _SWITCHES.validate
    _SWITCHES.validate = bool(enabled)
    try:
        yield
    finally:
        _SWITCHES.validate = before


def validation_enabled() -> bool:
    """True when input checks run (switched on, and not inside ``torch.compile``d code)."""
    return _SWITCHES.validate and not torch.compiler.is_compiling()


def _checking() -> bool:
    return _SWITCHES.validate and not _SWITCHES.inside and not torch.compiler.is_compiling()


def run_checked(check, fn, x: Tensor):
    """``fn(x)`` after ``check(x)`` when this is the outermost checked call (see :func:`validation`);
    calls made by ``fn`` skip their own checks."""
    if not _checking():
        return fn(x)
    check(x)
    _SWITCHES.inside = True
    try:
        return fn(x)
    finally:
        _SWITCHES.inside = False


@contextlib.contextmanager
def collect_stats() -> Iterator[None]:
    """Layers record their diagnostics (``module.stats``) inside the block, as tracing does::

        with collect_stats():
            flow.inverse(z)
        read_stats(block)    # {"inverse_iterations": 12.0, "inverse_residual": 3e-9, ...}
    """
    _SWITCHES.stats += 1
    try:
        yield
    finally:
        _SWITCHES.stats -= 1


def stats_wanted() -> bool:
    """True while a :class:`Tracer` or :func:`collect_stats` asks layers for their diagnostics."""
    return bool(_ACTIVE_TRACERS) or _SWITCHES.stats > 0


def _as_floats(stats: dict) -> dict:
    """``stats`` with every tensor value read (one transfer per device and dtype) as a float."""
    return _materialize([stats])[0]


def _materialize(dicts: list[dict]) -> list[dict]:
    groups: dict = {}
    for i, d in enumerate(dicts):
        for k, v in d.items():
            if torch.is_tensor(v):
                groups.setdefault((v.device, v.dtype), []).append((i, k, v))
    out = [dict(d) for d in dicts]
    for items in groups.values():
        values = torch.stack([v.detach().reshape(()) for _, _, v in items]).tolist()  # 0-d stats
        for (i, k, _), val in zip(items, values):
            out[i][k] = float(val)
    return out


def read_stats(module) -> dict:
    """``module.stats`` with tensor values read as floats (empty unless recorded while asked)."""
    return _as_floats(dict(getattr(module, "stats", {}) or {}))


# ----------------------------------------------------------------------------- tracing
@dataclass
class TraceRecord:
    """One layer call seen by a :class:`Tracer` (in call order). ``stats`` is the layer's
    diagnostics of that call as floats (read from the device, for all records of the tracer at
    once, when first looked at)."""

    name: str  # dotted module path inside the traced root ("" for the root)
    direction: str  # "forward" or "inverse"
    depth: int  # nesting depth of the call (root = 0)
    in_norm: Tensor  # (B,) L2 norm of the input per example
    out_norm: Tensor  # (B,) L2 norm of the output per example
    out_absmax: Tensor  # (B,) largest |output| per example
    out_finite: Tensor  # (B,) bool, every output entry finite
    logdet: Tensor  # (B,)
    raw_stats: dict = field(default_factory=dict)  # as recorded: floats and 0-d tensors
    input: Tensor | None = None  # kept only when the tracer keeps tensors
    output: Tensor | None = None
    tracer: "Tracer | None" = field(default=None, repr=False, compare=False)

    @property
    def stats(self) -> dict:
        if any(torch.is_tensor(v) for v in self.raw_stats.values()):
            if self.tracer is not None:
                self.tracer.read_stats()
            else:
                self.raw_stats = _as_floats(self.raw_stats)
        return self.raw_stats


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
                raw_stats=dict(getattr(module, "stats", {}) or {}),
                input=inp.detach().clone() if self.keep_tensors else None,
                output=out.detach().clone() if self.keep_tensors else None,
                tracer=self,
            )
        self.records.append(rec)

    def read_stats(self) -> None:
        """Read the tensor stats of every record at once (one device transfer)."""
        pending = [r for r in self.records if any(torch.is_tensor(v) for v in r.raw_stats.values())]
        for r, d in zip(pending, _materialize([r.raw_stats for r in pending])):
            r.raw_stats = d

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
    ``_inverse``, and may refine the entry checks with ``_check_event`` (event shape) and
    ``_check_domain`` (values). ``stats`` holds diagnostics of the last call when asked for.

    Contexts: ``forward(x, context)`` / ``inverse(z, context)`` hand a given context to
    ``_forward(x, context)`` / ``_inverse(z, context)`` of classes with ``takes_context = True``
    (composites and conditional layers); other layers are called as ``_forward(x)``. A conditional
    layer sets ``context_shape`` (the event shape of its context) and resolves a missing one with
    :meth:`_context` (the bound context of :func:`bind_context`, else :class:`ContextError`).
    """

    stats: dict
    takes_context = False  # _forward / _inverse accept a context argument (composites, conditional layers)
    context_shape: tuple[int, ...] | None = None  # set by conditional layers: the event shape of the context

    def __init__(self) -> None:
        super().__init__()
        self.stats = {}

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _context(self, x: Tensor, context: Tensor | None) -> Tensor:
        """The context of a conditional layer's call on ``x``: the one given, else the bound one
        expanded to the batch (:func:`bind_context`); none of them: :class:`ContextError`."""
        if context is not None:
            return context
        bound = self._buffers.get("bound_context")
        if bound is None:
            shape = ", ".join(map(str, self.context_shape or ()))
            raise ContextError(f"{type(self).__name__} is conditional: give context= of shape (batch, {shape})")
        return bound.expand(x.shape[0], *bound.shape[1:])

    # -------------------------------------------------------------- entry checks
    def check_input(self, x: Tensor, direction: str = "forward", what: str | None = None, *,
                    context: Tensor | None = None) -> None:
        """Named errors for an input of a public call in ``direction``: not a floating tensor of
        the layer's dtype, an empty batch, a wrong event shape, or values outside the domain of the
        first layer on the path. NaN / inf entries pass (the map propagates them: the audit counts
        non-finite outputs) unless that layer's domain excludes them (Logit, a residual inverse).
        A missing, unexpected or ill-shaped ``context`` is a :class:`ContextError`."""
        what = what or f"{type(self).__name__} {'input' if direction == 'forward' else 'inverse input'}"
        check_tensor(x, what, _module_dtype(self))
        self._check_event(x, direction, what)
        self._check_domain(x, direction)
        check_model_context(self, context, x.shape[0], type(self).__name__)

    def _check_event(self, x: Tensor, direction: str, what: str) -> None:
        """Raise :class:`ShapeError` for a wrong event shape (layers that know theirs)."""

    def _check_domain(self, x: Tensor, direction: str) -> None:
        """Raise :class:`InputOutsideDomain` for finite values the map is not defined on."""

    # -------------------------------------------------------------- calls
    def _traced(self, fn, x: Tensor, direction: str) -> tuple[Tensor, Tensor]:
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

    def _call(self, fn, x: Tensor, direction: str, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if context is not None and self.takes_context:
            fn = functools.partial(fn, context=context)
        if not _checking():
            return self._traced(fn, x, direction)
        return run_checked(lambda v: self.check_input(v, direction, context=context),
                           lambda v: self._traced(fn, v, direction), x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._call(self._forward, x, "forward", context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._call(self._inverse, z, "inverse", context)


def check_model_context(module: nn.Module, context, batch: int, name: str | None = None) -> None:
    """The entry check of a context: :class:`ContextError` for one given to a model without
    conditional layers, none given to one with unbound conditional layers, or a tensor that is not
    ``(batch, *context_shape)`` of the model's dtype."""
    name = name or type(module).__name__
    shape = context_shape_of(module)
    if shape is None:
        if context is not None:
            raise ContextError(f"{name} is not conditional: it takes no context")
        return
    if context is None:
        if requires_context(module):
            cs = ", ".join(map(str, shape))
            raise ContextError(f"{name} is conditional: give context= of shape (batch, {cs})")
        return
    check_context(context, shape, batch, _module_dtype(module))


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

    def _check_event(self, x, direction, what):
        if len(self.layers):
            self.layers[0 if direction == "forward" else -1]._check_event(x, direction, what)

    def _check_domain(self, x, direction):
        if len(self.layers):
            self.layers[0 if direction == "forward" else -1]._check_domain(x, direction)

    takes_context = True

    def _forward(self, x, context=None):
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, context)
            total = total + ld
        return x, total

    def _inverse(self, z, context=None):
        total = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z, context)
            total = total + ld
        return z, total


class Inverse(Transform):
    """The inverse of a transform: ``Inverse(t).forward == t.inverse`` and vice versa."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def _check_event(self, x, direction, what):
        self.transform._check_event(x, "inverse" if direction == "forward" else "forward", what)

    def _check_domain(self, x, direction):
        self.transform._check_domain(x, "inverse" if direction == "forward" else "forward")

    takes_context = True

    def _forward(self, x, context=None):
        return self.transform.inverse(x, context)

    def _inverse(self, z, context=None):
        return self.transform(z, context)


LOG_2PI = math.log(2 * math.pi)
