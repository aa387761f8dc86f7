"""Per-layer access to a flow: its elementary layers on the forward and the inverse path.

The localisation (:mod:`.localize`) needs, for every elementary layer ``l``, its input and output
on the forward pass ``x -> z`` and on the inverse pass ``z -> x_hat``, and its inverse ``l^-1`` as a
function (for its gain). A :class:`LayerPath` gives exactly that, whatever built the flow:

* :class:`StableflowsPath`: a stableflows Flow / Transform, recorded by the
  :class:`~stableflows.transforms.base.Tracer` (the leaves of the module tree);
* :class:`ChainPath`: a :class:`Chain` of :class:`Step` s, each with a forward (data -> latent) and an
  inverse -- the sequence of transforms a peer library composes (normflows' ``flows``, zuko's
  transform list, FrEIA's ``SequenceINN``, nflows' ``CompositeTransform``; :mod:`.peers`), or the
  ``layers`` of a user's module following the documented protocol (:func:`protocol_chain`);
* :class:`HookPath`: a FrEIA ``GraphINN``, recorded with forward hooks on its nodes while the
  library runs its own graph.

Values passed between layers are tensors or lists / tuples of tensors (the several outputs of a
split). Errors and norms are measured on their flat concatenation ``(B, D)`` (:func:`flat`).

A chain that is walked here (not the model's own map) is only trusted once it reproduces the
model's map: :meth:`LayerPath.verify` compares both on the examples being localised, and the
report says "not localised" with the difference when they disagree.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Step", "Chain", "Call", "Traced", "LayerPath", "StableflowsPath", "ChainPath", "HookPath", "flat",
           "unflat", "spec_of", "tensors", "first_output", "VERIFY_RTOL", "VERIFY_ATOL"]

VERIFY_RTOL, VERIFY_ATOL = 1e-4, 1e-5  # a walked chain must reproduce the model's map to this (model dtype)


# ----------------------------------------------------------------------------- values
def tensors(v) -> list[Tensor]:
    """The tensors of a value (a tensor or nested lists / tuples of tensors), in order."""
    if torch.is_tensor(v):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for item in v for t in tensors(item)]
    raise TypeError(f"a layer passed a {type(v).__name__}, not a tensor or a list of tensors")


def spec_of(v):
    """The structure of a value: a shape (without the batch) for a tensor, a list of specs for a list."""
    if torch.is_tensor(v):
        return tuple(v.shape[1:])
    return [spec_of(item) for item in v] if isinstance(v, list) else tuple_spec([spec_of(i) for i in v])


class tuple_spec(list):
    """Spec of a tuple (rebuilt as a tuple)."""


def flat(v) -> Tensor:
    """``(B, D)``: the value's tensors flattened per example and concatenated."""
    ts = tensors(v)
    b = ts[0].shape[0]
    return torch.cat([t.reshape(b, -1) for t in ts], 1) if len(ts) > 1 else ts[0].reshape(b, -1)


def _size(spec) -> int:
    if isinstance(spec, tuple) and not isinstance(spec, tuple_spec):
        n = 1
        for s in spec:
            n *= int(s)
        return n
    return sum(_size(s) for s in spec)


def unflat(f: Tensor, spec):
    """Inverse of :func:`flat` for a value of structure ``spec``."""
    out, _ = _unflat(f, spec, 0)
    return out


def _unflat(f: Tensor, spec, start: int):
    if isinstance(spec, tuple) and not isinstance(spec, tuple_spec):
        n = _size(spec)
        return f[:, start:start + n].reshape(f.shape[0], *spec), start + n
    items = []
    for s in spec:
        item, start = _unflat(f, s, start)
        items.append(item)
    return (tuple(items) if isinstance(spec, tuple_spec) else items), start


def first_output(out):
    """The output of a call returning a tensor, a list (several tensors) or a tuple ``(output, extras...)``."""
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- records
@dataclass
class Call:
    """One call of one elementary layer on one pass (tensors flattened to ``(B, D)``)."""

    name: str
    kind: str
    input: Tensor  # (B, D_in)
    output: Tensor  # (B, D_out)
    in_spec: Any  # structure of the input (to call the layer's inverse on a flat input)
    out_spec: Any = None  # structure of the output
    stats: dict = field(default_factory=dict)

    @property
    def out_finite(self) -> Tensor:
        return torch.isfinite(self.output).all(dim=1)


@dataclass
class Traced:
    """The recorded passes of one group of examples: forward calls (may be empty) and inverse calls."""

    fwd: list
    inv: list
    n: int
    mode: str  # "roundtrip" or "inverse"
    note: str = ""  # why the records cannot be trusted ("" when they can)
    gains_skipped: int = 0  # layers whose gain was not computed (time budget)


class LayerPath:
    """Interface of the per-layer access (see the module docstring)."""

    description = ""  # what the layers are, for the report ("normflows flows", ...)

    def trace(self, *, x: Tensor | None = None, z: Tensor | None = None) -> Traced:  # pragma: no cover
        raise NotImplementedError

    def inverse_fn(self, call: Call) -> Callable[[Tensor], Tensor]:  # pragma: no cover
        """The layer's inverse as a map of flat tensors ``(B, D_in) -> (B, D_out)``."""
        raise NotImplementedError

    def clip(self, c: float):
        """A context manager clamping every layer's inverse output to ``[-c, c]`` that yields
        ``{layer: clamped entries}``, or None when this path cannot clip."""
        return None

    def names(self) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def verify(self, x: Tensor, z_model: Tensor) -> str:
        """"" when the recorded layers are the model's own computation on ``x``, else why not."""
        return ""


def _annotate(e: BaseException, name: str) -> None:
    """Name the innermost layer an exception came from (read by the reconstruction's messages)."""
    if getattr(e, "audit_layer", None) is None:
        try:
            e.audit_layer = name
        except Exception:  # noqa: BLE001 - some builtin exceptions take no attributes
            pass


# ----------------------------------------------------------------------------- stableflows
class StableflowsPath(LayerPath):
    """The leaves of a stableflows module tree, recorded by the Tracer."""

    description = "stableflows layers"

    def __init__(self, root: nn.Module):
        from .localize import leaf_transforms

        self.root = root
        self.leaves = dict(leaf_transforms(root))

    def names(self) -> list[str]:
        return list(self.leaves)

    def _calls(self, tracer) -> list[Call]:
        out = []
        for r in tracer.records:
            if r.name in self.leaves:
                out.append(Call(r.name, type(self.leaves[r.name]).__name__, flat(r.input), flat(r.output),
                                spec_of(r.input), spec_of(r.output), _plain_stats(r.stats)))
        return out

    def trace(self, *, x=None, z=None) -> Traced:
        from ..transforms.base import trace

        if (x is None) == (z is None):
            raise ValueError("give exactly one of x (data, round trip) or z (latent codes, inverse only)")
        fwd = []
        with torch.no_grad():
            if x is not None:
                with trace(self.root, keep_tensors=True) as tf:
                    z = first_output(self.root(x))
                fwd = self._calls(tf)
            with trace(self.root, keep_tensors=True) as ti:
                try:
                    first_output(self.root.inverse(z))
                except Exception:  # noqa: BLE001 - the records up to the failing layer are what we need
                    pass
        return Traced(fwd, self._calls(ti), (x if x is not None else z).shape[0],
                      "roundtrip" if x is not None else "inverse")

    def inverse_fn(self, call: Call):
        layer = self.leaves[call.name]

        def f(t: Tensor) -> Tensor:
            return flat(first_output(layer.inverse(unflat(t, call.in_spec))))
        return f

    def clip(self, c: float):
        from .localize import clip_activations

        return clip_activations(self.root, c)


def _plain_stats(stats: dict | None) -> dict:
    """Layer stats as plain numbers (tensors are read here, once: diagnostics only)."""
    out = {}
    for k, v in (stats or {}).items():
        if torch.is_tensor(v):
            v = v.detach()
            v = (bool(v.all()) if v.dtype == torch.bool else float(v.double().min() if k.startswith("min")
                                                                   else v.double().max())) if v.numel() else None
        out[k] = v
    return out


# ----------------------------------------------------------------------------- chains
@dataclass
class Step:
    """One elementary layer of a :class:`Chain`.

    ``forward(value) -> value`` maps towards the latent, ``inverse`` back. A ``split`` step's
    forward returns ``[head, z_out]``: ``z_out`` leaves the chain there (a multi-scale split) and
    its inverse takes ``[head, z_out]`` back.
    """

    name: str
    kind: str
    forward: Callable[[Any], Any]
    inverse: Callable[[Any], Any]
    split: bool = False
    module: nn.Module | None = None


class Chain:
    """A sequence of :class:`Step` s in data -> latent order. The latent is the final head, or
    ``[head, z_k, ..., z_1]`` (the latest split first) when steps split."""

    def __init__(self, steps: Sequence[Step], description: str = ""):
        self.steps = list(steps)
        self.description = description
        self.has_split = any(s.split for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def forward(self, x, record: Callable | None = None):
        head, rest = x, []
        for s in self.steps:
            try:
                out = s.forward(head)
            except Exception as e:
                _annotate(e, s.name)
                raise
            if record is not None:
                record(s, head, out)
            if s.split:
                head, z_out = out[0], out[1]
                rest.insert(0, z_out)
            else:
                head = out
        return [head, *rest] if self.has_split else head

    def inverse(self, z, record: Callable | None = None, clip: float | None = None, counts: dict | None = None):
        if self.has_split:
            head, rest = z[0], list(z[1:])
        else:
            head, rest = z, []
        for s in reversed(self.steps):
            inp = [head, rest.pop(0)] if s.split else head
            try:
                out = s.inverse(inp)
            except Exception as e:
                _annotate(e, s.name)
                raise
            if clip is not None:
                out, k = _clamp(out, clip)
                if counts is not None:
                    counts[s.name] = counts.get(s.name, 0) + k
            if record is not None:
                record(s, inp, out)
            head = out
        return head


def _clamp(v, c: float):
    if torch.is_tensor(v):
        return v.clamp(-c, c), int((v.abs() > c).sum())
    items, total = [], 0
    for item in v:
        out, k = _clamp(item, c)
        items.append(out)
        total += k
    return (tuple(items) if isinstance(v, tuple) else items), total


class ChainPath(LayerPath):
    """Layers of a :class:`Chain` (or of a function building one, for flows such as zuko's that
    build their transforms on every call). ``pack`` turns the chain's latent value into the flat
    latent the audit sees (several tensors concatenated), ``unpack`` back."""

    def __init__(self, chain: "Chain | Callable[[], Chain]", *, pack: Callable | None = None,
                 unpack: Callable | None = None):
        self._chain = chain
        self.pack = pack or (lambda v: v if torch.is_tensor(v) else flat(v))
        self.unpack = unpack or (lambda z: z)
        self.clipping: tuple[float, dict] | None = None
        self._last: Chain | None = None

    @property
    def chain(self) -> Chain:
        c = self._chain if isinstance(self._chain, Chain) else self._chain()
        self._last = c
        return c

    @property
    def description(self) -> str:
        return (self._last or self.chain).description

    def steps(self) -> list[Step]:
        return (self._last or self.chain).steps

    def names(self) -> list[str]:
        return [s.name for s in self.steps()]

    def _recorder(self, calls: list):
        def rec(step: Step, inp, out):
            calls.append(Call(step.name, step.kind, flat(inp).detach(), flat(out).detach(), spec_of(inp),
                              spec_of(out), _plain_stats(getattr(step.module, "stats", None))))
        return rec

    def trace(self, *, x=None, z=None) -> Traced:
        if (x is None) == (z is None):
            raise ValueError("give exactly one of x (data, round trip) or z (latent codes, inverse only)")
        fwd: list[Call] = []
        inv: list[Call] = []
        n = (x if x is not None else z).shape[0]
        chain = self.chain
        with torch.no_grad():
            if x is not None:
                try:
                    zz = chain.forward(x, self._recorder(fwd))
                except Exception:  # noqa: BLE001 - the forward records up to the failing layer remain
                    return Traced(fwd, inv, n, "roundtrip")
            else:
                zz = self.unpack(z)
            try:
                chain.inverse(zz, self._recorder(inv))
            except Exception:  # noqa: BLE001 - the records up to the failing layer are what we need
                pass
        return Traced(fwd, inv, n, "roundtrip" if x is not None else "inverse")

    def inverse_fn(self, call: Call):
        step = {s.name: s for s in self.steps()}[call.name]

        def f(t: Tensor) -> Tensor:
            return flat(step.inverse(unflat(t, call.in_spec)))
        return f

    def clip(self, c: float):
        return _chain_clip(self, c)

    def walk_forward(self, x: Tensor) -> Tensor:
        return self.pack(self.chain.forward(x))

    def walk_inverse(self, z: Tensor):
        clip, counts = self.clipping if self.clipping is not None else (None, None)
        return self.chain.inverse(self.unpack(z), clip=clip, counts=counts)

    def verify(self, x: Tensor, z_model: Tensor) -> str:
        """"" when walking the chain reproduces the model's forward on ``x``, else why not."""
        try:
            with torch.no_grad():
                z = self.walk_forward(x)
        except Exception as e:  # noqa: BLE001 - reported
            return f"walking the layers raised {type(e).__name__}: {e}"
        a, b = flat(z).double(), flat(z_model).double()
        if a.shape != b.shape:
            return f"walking the layers gives a latent of {tuple(a.shape[1:])} entries, the model {tuple(b.shape[1:])}"
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return "walking the layers gives non-finite values where the model does not (or the reverse)"
        d = (a - b).abs()[fa]
        lim = (VERIFY_ATOL + VERIFY_RTOL * b.abs())[fa]
        if d.numel() and bool((d > lim).any()):
            return f"walking the layers does not reproduce the model's forward (max difference {float(d.max()):.3g})"
        return ""


@contextlib.contextmanager
def _chain_clip(path: ChainPath, c: float) -> Iterator[dict]:
    counts: dict = {}
    path.clipping = (c, counts)
    try:
        yield counts
    finally:
        path.clipping = None


# ----------------------------------------------------------------------------- hooks (FrEIA GraphINN)
class HookPath(LayerPath):
    """Nodes of a FrEIA ``GraphINN``, recorded with forward hooks while ``run(value, rev)`` (the
    library's own graph) executes. ``nodes``: ``[(name, module)]``; each module is called as
    ``module(inputs, rev=..., jac=...) -> (outputs, log_jac)``."""

    def __init__(self, nodes: Sequence[tuple[str, nn.Module]], run: Callable[[Tensor, bool], Any],
                 description: str = "FrEIA GraphINN nodes"):
        self.nodes = list(nodes)
        self.run = run
        self.description = description
        self._mods = {n: m for n, m in self.nodes}
        self.clipping: tuple[float, dict] | None = None

    def names(self) -> list[str]:
        return [n for n, _ in self.nodes]

    @contextlib.contextmanager
    def _hooks(self, calls: list | None, rev: bool):
        handles = []
        for name, mod in self.nodes:
            def hook(module, args, kwargs, output, _name=name):
                inp = args[0] if args else kwargs.get("x_or_z", kwargs.get("x"))
                out = output[0]
                if rev and self.clipping is not None:
                    c, counts = self.clipping
                    out, k = _clamp(list(out), c)
                    counts[_name] = counts.get(_name, 0) + k
                    output = (tuple(out), output[1])
                if calls is not None and bool(kwargs.get("rev", False)) == rev:
                    calls.append(Call(_name, type(module).__name__, flat(list(inp)).detach(), flat(list(out)).detach(),
                                      spec_of(list(inp)), spec_of(list(out))))
                return output
            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def trace(self, *, x=None, z=None) -> Traced:
        if (x is None) == (z is None):
            raise ValueError("give exactly one of x (data, round trip) or z (latent codes, inverse only)")
        fwd: list[Call] = []
        inv: list[Call] = []
        n = (x if x is not None else z).shape[0]
        with torch.no_grad():
            if x is not None:
                try:
                    with self._hooks(fwd, False):
                        z = self.run(x, False)
                except Exception:  # noqa: BLE001 - the forward records up to the failing node remain
                    return Traced(fwd, inv, n, "roundtrip")
            try:
                with self._hooks(inv, True):
                    self.run(z, True)
            except Exception:  # noqa: BLE001 - the records up to the failing node are what we need
                pass
        return Traced(fwd, inv, n, "roundtrip" if x is not None else "inverse")

    def inverse_fn(self, call: Call):
        mod = self._mods[call.name]

        def f(t: Tensor) -> Tensor:
            return flat(list(mod(unflat(t, call.in_spec), rev=True, jac=False)[0]))
        return f

    @contextlib.contextmanager
    def clip(self, c: float):
        counts: dict = {}
        self.clipping = (c, counts)
        try:
            with self._hooks(None, True):
                yield counts
        finally:
            self.clipping = None
