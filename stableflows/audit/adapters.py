"""One view of every invertible model the audit accepts: :class:`Invertible`.

The audit only needs ``forward(x) -> z`` (data -> latent), ``inverse(z) -> x``, optionally the
analytic ``log|det dz/dx|``, a float64 copy (the *shadow*) and, for per-layer localisation, a
:class:`~stableflows.audit.layers.LayerPath`. :func:`as_invertible` builds that view from

* a stableflows :class:`~stableflows.models.Flow` or :class:`~stableflows.transforms.base.Transform`
  (every elementary layer localised; clipped sampling);
* a flow of ``normflows``, ``zuko``, ``FrEIA`` or ``nflows`` (:mod:`.peers`: the library's own maps,
  localised through the library's own sequence of transforms);
* any ``nn.Module`` following the **layer protocol**: an attribute ``layers`` (a list, ``nn.ModuleList``
  or ``nn.Sequential``) holding its layers in data -> latent order. Each layer is a module with
  ``forward(x)`` and ``inverse(z)`` (or ``reverse(z)``, or a forward taking ``reverse=True`` /
  ``rev=True``), each returning a tensor, a list of
  tensors (several outputs) or a tuple whose first entry is the output (``(z, logdet)``); or a flow
  of stableflows or a peer library, or another protocol module (expanded in place). A layer with
  ``audit_split = True`` is a multi-scale split: its forward returns ``[h, z_out]`` and ``z_out``
  leaves the chain (it is part of the latent), its inverse takes ``[h, z_out]``. The model's own
  ``forward`` / ``inverse`` (or ``reverse``) are audited when it has them (the layers must
  reproduce its forward, which is checked), else the composition of its layers is. A layer that is
  a submodule of the model is reported under its dotted name (``blocks.0.flows.1.actnorm``), any
  other as ``layers.i``;
* a pair of callables ``(forward, inverse)`` on tensors, each returning a tensor or a tuple whose
  first entry is the output (a float64 shadow exists when both are bound methods of
  ``nn.Module`` s; localised when their module follows the protocol);
* a bench :class:`~stableflows.bench.contender.Contender` (its module, forward and inverse).

Every function is assumed to act on each example of a batch independently (true of flows in eval
mode); batched Jacobians rely on it.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..transforms.base import Transform
from .layers import Chain, ChainPath, LayerPath, StableflowsPath, Step, first_output
from .peers import PEER_LIBRARIES, peer_invertible, peer_of

__all__ = ["Invertible", "as_invertible", "AdapterError", "PEER_LIBRARIES", "module_dtype", "protocol_chain",
           "gaussian_sampler"]


class AdapterError(TypeError):
    """The object given as a model is none of the kinds the audit understands."""


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def module_dtype(m: nn.Module | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype holding most of a module's parameter and buffer entries (not the first
    parameter's: normflows' residual flows keep a float64 ``geom_p`` in float32 models)."""
    if m is None:
        return default
    count: Counter = Counter()
    seen = set()
    for t in list(m.parameters()) + list(m.buffers()):
        if torch.is_floating_point(t) and id(t) not in seen:
            seen.add(id(t))
            count[t.dtype] += t.numel()
    return count.most_common(1)[0][0] if count else default


_module_dtype = module_dtype


class Invertible:
    """``forward(x) -> z`` and ``inverse(z) -> x`` on batches, plus what the audit may use.

    Args:
        forward, inverse: callables on tensors ``(B, *event) -> (B, *latent)`` and back.
        logdet: ``x -> log|det dz/dx|`` of shape ``(B,)``, or None when unknown.
        module: the ``nn.Module`` owning the computation (eval mode, float64 copy), or None.
        traceable: the stableflows Transform tree (clipping by the tracer, raising layers), or None.
        layers: the :class:`~stableflows.audit.layers.LayerPath` of the localisation, or None
            (``layers_note`` says why).
        make_shadow: ``dtype -> Invertible`` building the same model in another dtype, or None.
        sample_latent: ``(n, temperature, generator) -> z`` or None (then ``temperature * N(0, I)``
            in the latent shape seen on the data is used, i.e. a standard-normal base).
        kind: a short name of the model's origin ("stableflows", "callables", "zuko", ...).
    """

    def __init__(self, forward: Callable, inverse: Callable, *, logdet: Callable | None = None,
                 module: nn.Module | None = None, traceable: nn.Module | None = None,
                 make_shadow: Callable[[torch.dtype], "Invertible"] | None = None,
                 sample_latent: Callable | None = None, kind: str = "callables", dtype: torch.dtype | None = None,
                 layers: LayerPath | None = None, layers_note: str = ""):
        self._forward, self._inverse, self._logdet = forward, inverse, logdet
        self.module, self.traceable, self.kind = module, traceable, kind
        self._make_shadow, self._sample_latent = make_shadow, sample_latent
        self.dtype = dtype or module_dtype(module)
        self.latent_shape: tuple[int, ...] | None = None
        self.layers = layers if layers is not None else (StableflowsPath(traceable) if traceable is not None else None)
        self.layers_note = layers_note or ("" if self.layers is not None else
                                           f"a {kind} model without a layer list (see the layer protocol)")
        self.notes: list[str] = []
        self._inverse_override: Callable | None = None

    # ------------------------------------------------------------------ maps
    def forward(self, x: Tensor) -> Tensor:
        return _first(self._forward(x))

    def inverse(self, z: Tensor) -> Tensor:
        if self._inverse_override is not None:
            return self._inverse_override(z)
        return _first(self._inverse(z))

    @property
    def has_logdet(self) -> bool:
        return self._logdet is not None

    def logdet(self, x: Tensor) -> Tensor:
        if self._logdet is None:
            raise AdapterError(f"a model of kind {self.kind!r} gives no analytic log-determinant")
        return self._logdet(x)

    # ------------------------------------------------------------------ extras
    def shadow(self, dtype: torch.dtype = torch.float64) -> "Invertible | None":
        """The same model in ``dtype`` (a deep copy), or None when it cannot be built."""
        if self._make_shadow is None:
            return None
        sh = self._make_shadow(dtype)
        sh.latent_shape = self.latent_shape
        sh.dtype = dtype
        return sh

    def sample_latent(self, n: int, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """``n`` latent codes at ``temperature`` (``temperature = 0`` gives the base mode, z = 0)."""
        if self._sample_latent is not None:
            return self._sample_latent(n, temperature, generator)
        if self.latent_shape is None:
            raise AdapterError("latent shape unknown: the forward raised on every data example (or no data was "
                               "given), so there is no latent to sample")
        eps = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float64)
        return (temperature * eps).to(self.dtype)

    def clip_context(self, c: float):
        """Context manager under which ``inverse`` clamps every layer's output to ``[-c, c]``
        (yields ``{layer: clamped entries}``), or None when the layers cannot be reached."""
        if self.layers is None:
            return None
        if isinstance(self.layers, ChainPath):
            return self._chain_clip(c)
        return self.layers.clip(c)

    @contextlib.contextmanager
    def _chain_clip(self, c: float):
        path = self.layers
        with path.clip(c) as counts:
            self._inverse_override = lambda z: _first(path.walk_inverse(z))
            try:
                yield counts
            finally:
                self._inverse_override = None

    def eval_mode(self) -> "_EvalMode":
        """Context manager: every owned module in eval mode and memory-saving gradients off (stored
        activations), both restored afterwards. The audit measures the map, so its Jacobian products
        must not recompute activations through the inverse under test; and the memory-saving
        backward is once differentiable, which left Lanczos with finite-difference JVPs."""
        return _EvalMode(self.module)

    def __repr__(self) -> str:
        name = type(self.module).__name__ if self.module is not None else "functions"
        return f"Invertible(kind={self.kind!r}, model={name}, dtype={str(self.dtype).replace('torch.', '')})"


class _EvalMode:
    def __init__(self, module: nn.Module | None):
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        if self.module is not None:
            from ..memory import stored_activations

            self.modes = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
            self.stack.enter_context(stored_activations(self.module))
        return self

    def __exit__(self, *exc):
        self.stack.close()
        for m, mode in self.modes:
            m.training = mode
        return False


def gaussian_sampler(loc_scale: Callable[[], tuple[Tensor, Tensor]], dtype_of: Callable[[], torch.dtype]):
    """``z = loc + temperature * scale * eps`` for a diagonal-Gaussian base."""
    def sample(n, temperature, generator=None):
        loc, scale = loc_scale()
        eps = torch.randn((n, *loc.shape), generator=generator, dtype=torch.float64).to(loc.device)
        return (loc.double() + temperature * scale.double() * eps).to(dtype_of())
    return sample


# ----------------------------------------------------------------------------- stableflows
def _stableflows(model: nn.Module) -> Invertible:
    def make(dtype):
        return _stableflows(copy.deepcopy(model).to(dtype))

    def logdet(x):
        return model(x)[1]

    sample = None
    if hasattr(model, "sample_latent") and hasattr(model, "latent_shape"):
        def sample(n, temperature, generator=None):
            return model.sample_latent(n, temperature, generator)

    inv = Invertible(lambda x: model(x)[0], lambda z: model.inverse(z)[0], logdet=logdet, module=model,
                     traceable=model, make_shadow=make, sample_latent=sample, kind="stableflows")
    if hasattr(model, "latent_shape"):
        inv.latent_shape = tuple(model.latent_shape)
    return inv


def _is_stableflows(model) -> bool:
    from ..models.flow import Flow

    return isinstance(model, (Transform, Flow))


# ----------------------------------------------------------------------------- the layer protocol
def _inverse_method(m) -> Callable | None:
    """``m.inverse``, ``m.reverse``, or ``m(z, reverse=True)`` / ``m(z, rev=True)`` when its forward
    takes such a flag (the convention of many standalone Glow / RealNVP implementations)."""
    for name in ("inverse", "reverse"):
        f = getattr(m, name, None)
        if callable(f):
            return f
    flag = _reverse_flag(m)
    if flag is not None:
        return lambda z, _m=m, _f=flag: _m(z, **{_f: True})
    return None


def _reverse_flag(m) -> str | None:
    import inspect

    fwd = getattr(m, "forward", None)
    if not callable(fwd):
        return None
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return None
    return next((f for f in ("reverse", "rev") if f in params), None)


def _forward_call(m) -> Callable:
    """``m(x)``, with ``reverse=False`` when its forward takes the flag."""
    flag = _reverse_flag(m)
    if flag is None:
        return lambda v, _m=m: _m(v)
    return lambda v, _m=m, _f=flag: _m(v, **{_f: False})


def _item_steps(item, name: str) -> list[Step] | None:
    """Steps of one protocol layer, or None when it follows no supported convention."""
    if isinstance(item, Transform):
        layers = getattr(item, "layers", None)
        if type(item).__name__ == "Compose" and layers is not None:
            out = []
            for i, sub in enumerate(layers):
                out += _item_steps(sub, f"{name}.layers.{i}")
            return out
        return [Step(name, type(item).__name__, lambda v, m=item: m(v)[0], lambda v, m=item: m.inverse(v)[0],
                     module=item)]
    if peer_of(item) is not None:
        inv = peer_invertible(item)
        path = inv.layers
        if isinstance(path, ChainPath):
            return [Step(f"{name}.{s.name}", s.kind, s.forward, s.inverse, s.split, s.module) for s in path.steps()]
        return [Step(name, type(item).__name__, inv.forward, inv.inverse, module=item)]
    if isinstance(item, nn.Module) and getattr(item, "layers", None) is not None and _layer_list(item) is not None:
        sub = protocol_chain(item, prefix=f"{name}.")
        if sub is not None:
            return sub.steps
    inverse = _inverse_method(item)
    if not callable(item) or inverse is None:
        return None
    split = bool(getattr(item, "audit_split", False))
    call = _forward_call(item)
    return [Step(name, type(item).__name__, lambda v, c=call: first_output(c(v)),
                 lambda v, f=inverse: first_output(f(v)), split=split, module=item if isinstance(item, nn.Module)
                 else None)]


def _layer_list(model) -> list | None:
    layers = getattr(model, "layers", None)
    if layers is None or torch.is_tensor(layers) or isinstance(layers, (str, bytes)):
        return None
    try:
        items = list(layers)
    except TypeError:
        return None
    return items or None


def protocol_chain(model, prefix: str = "") -> Chain | None:
    """The :class:`~stableflows.audit.layers.Chain` of a module following the layer protocol
    (module docstring), or None."""
    items = _layer_list(model)
    if items is None:
        return None
    # a layer that is a registered submodule of the model is named by its own dotted path
    owned = {id(m): n for n, m in model.named_modules() if n} if isinstance(model, nn.Module) else {}
    steps: list[Step] = []
    for i, item in enumerate(items):
        sub = _item_steps(item, prefix + owned.get(id(item), f"layers.{i}"))
        if sub is None:
            return None
        steps += sub
    return Chain(steps, f"{type(model).__name__}.layers (layer protocol)")


def _has_own_maps(model: nn.Module) -> bool:
    return type(model).forward is not nn.Module.forward and _inverse_method(model) is not None


def _protocol(model: nn.Module, chain: Chain) -> Invertible:
    path = ChainPath(chain)
    if _has_own_maps(model):
        call, back = _forward_call(model), _inverse_method(model)
        fwd, inv = (lambda x: first_output(call(x))), (lambda z: first_output(back(z)))
    else:
        fwd, inv = path.walk_forward, (lambda z: first_output(path.walk_inverse(z)))
    own = _has_own_maps(model)

    def make(dtype):
        return _protocol_or_fail(copy.deepcopy(model).to(dtype))

    out = Invertible(fwd, inv, module=model, make_shadow=make, kind="protocol", layers=path)
    out.own_maps = own
    return out


def _protocol_or_fail(model):
    chain = protocol_chain(model)
    if chain is None:
        raise AdapterError(f"{type(model).__name__} no longer follows the layer protocol")
    return _protocol(model, chain)


# ----------------------------------------------------------------------------- pair of callables
def _owner(fn) -> nn.Module | None:
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _callables(forward: Callable, inverse: Callable, logdet: Callable | None = None) -> Invertible:
    fns = [f for f in (forward, inverse, logdet) if f is not None]
    owners = [_owner(f) for f in fns]
    make = None
    module = owners[0] if owners and all(o is not None for o in owners) else None
    if module is not None:
        def make(dtype):
            memo: dict = {}
            copies = [copy.deepcopy(o, memo).to(dtype) for o in owners]  # shared memo: shared owners stay shared
            bound = [getattr(c, f.__name__) for c, f in zip(copies, fns)]
            return _callables(bound[0], bound[1], bound[2] if logdet is not None else None)
    mods = {id(o): o for o in owners if o is not None}
    root = module if len(mods) == 1 else (nn.ModuleList(list(mods.values())) if mods else None)
    layers, note = None, "a pair of functions: no layers to localise through"
    if len(mods) == 1:
        owner = next(iter(mods.values()))
        if _is_stableflows(owner):
            layers, note = StableflowsPath(owner), ""
        else:
            chain = protocol_chain(owner)
            if chain is not None:
                layers, note = ChainPath(chain), ""
            else:
                note = f"the functions' module {type(owner).__name__} has no layer list (see the layer protocol)"
    return Invertible(forward, inverse, logdet=logdet, module=root, make_shadow=make, kind="callables",
                      layers=layers, layers_note=note)


# ----------------------------------------------------------------------------- bench contenders
def _contender(c) -> Invertible:
    """A bench Contender: its functions take the module as first argument."""
    def build(module):
        inv = Invertible(lambda x: _first(c.forward(module, x)), lambda z: _first(c.inverse(module, z)), module=module,
                         make_shadow=lambda dt: build(copy.deepcopy(module).to(dt)), kind=f"bench:{c.name}",
                         layers=ChainPath(protocol_chain(module)) if protocol_chain(module) is not None else None,
                         layers_note="" if protocol_chain(module) is not None else
                         f"bench model {c.name} exposes no layer list")
        return inv
    return build(c.module)


# ----------------------------------------------------------------------------- dispatch
def as_invertible(model, inverse: Callable | None = None, *, logdet: Callable | None = None) -> Invertible:
    """The :class:`Invertible` view of ``model`` (see the module docstring for what is accepted).

    ``as_invertible((f, g))`` and ``as_invertible(f, g)`` both take ``f`` as the forward
    (data -> latent) and ``g`` as its inverse.
    """
    if isinstance(model, Invertible):
        return model
    if inverse is not None:
        return _callables(model, inverse, logdet)
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(callable(f) for f in model) \
            and not all(isinstance(f, nn.Module) for f in model):
        return _callables(*model)
    if _is_stableflows(model):
        return _stableflows(model)
    from ..models.classifier import InvertibleClassifier

    if isinstance(model, InvertibleClassifier):  # its invertible part: forward(x) would give the logits
        return _stableflows(model.as_flow())
    if type(model).__name__ == "Contender" and type(model).__module__.startswith("stableflows.bench"):
        return _contender(model)
    if peer_of(model) is not None:
        return peer_invertible(model)
    if isinstance(model, nn.Module):
        chain = protocol_chain(model)
        if chain is not None:
            return _protocol(model, chain)
        if callable(getattr(model, "inverse", None)):
            # any module following the (z, logdet) = m(x), (x, logdet) = m.inverse(z) convention
            return _callables(model.forward, model.inverse)
    raise AdapterError(
        f"cannot audit a {type(model).__name__}: give a stableflows Flow/Transform, a flow of "
        f"{', '.join(PEER_LIBRARIES)}, a module following the layer protocol (a 'layers' list of modules with "
        f"forward and inverse), or a pair of callables (forward, inverse)"
    )


def event_dim(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
