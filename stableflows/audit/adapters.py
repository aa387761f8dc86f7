"""One view of every invertible model the audit accepts: :class:`Invertible`.

The audit only needs ``forward(x) -> z`` (data -> latent), ``inverse(z) -> x``, optionally the
analytic ``log|det dz/dx|``, a float64 copy (the *shadow*) and, for per-layer localisation, the
stableflows module tree. :func:`as_invertible` builds that view from

* a stableflows :class:`~stableflows.models.Flow` or :class:`~stableflows.transforms.base.Transform`
  (traceable: per-layer localisation and clipped sampling work);
* a pair of callables ``(forward, inverse)`` on tensors, each returning a tensor or a tuple whose
  first entry is the output (a float64 shadow exists when both are bound methods of ``nn.Module``\\ s);
* a flow of ``normflows`` (generative direction: ``x = flow(z)``; the adapter walks ``flow.flows``
  itself, because ``NormalizingFlow.*_and_log_det`` accumulate in a float32 buffer), ``zuko``
  (``flow().transform`` is data -> latent), ``FrEIA`` (``inn(x)`` / ``inn(z, rev=True)``) or
  ``nflows`` (``flow._transform`` / ``flow._transform.inverse``).

Every function is assumed to act on each example of a batch independently (true of flows in eval
mode); batched Jacobians rely on it.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..transforms.base import Transform

__all__ = ["Invertible", "as_invertible", "AdapterError", "PEER_LIBRARIES"]

PEER_LIBRARIES = ("normflows", "zuko", "FrEIA", "nflows")


class AdapterError(TypeError):
    """The object given as a model is none of the kinds the audit understands."""


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_dtype(m: nn.Module | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if m is None:
        return default
    for t in list(m.parameters()) + list(m.buffers()):
        if torch.is_floating_point(t):
            return t.dtype
    return default


class Invertible:
    """``forward(x) -> z`` and ``inverse(z) -> x`` on batches, plus what the audit may use.

    Args:
        forward, inverse: callables on tensors ``(B, *event) -> (B, *latent)`` and back.
        logdet: ``x -> log|det dz/dx|`` of shape ``(B,)``, or None when unknown.
        module: the ``nn.Module`` owning the computation (eval mode, float64 copy), or None.
        traceable: the stableflows Transform tree whose layers :func:`~stableflows.transforms.base.trace`
            records, or None (no per-layer localisation).
        make_shadow: ``dtype -> Invertible`` building the same model in another dtype, or None.
        sample_latent: ``(n, temperature, generator) -> z`` or None (then ``temperature * N(0, I)``
            in the latent shape seen on the data is used, i.e. a standard-normal base).
        kind: a short name of the model's origin ("stableflows", "callables", "zuko", ...).
    """

    def __init__(self, forward: Callable, inverse: Callable, *, logdet: Callable | None = None,
                 module: nn.Module | None = None, traceable: nn.Module | None = None,
                 make_shadow: Callable[[torch.dtype], "Invertible"] | None = None,
                 sample_latent: Callable | None = None, kind: str = "callables", dtype: torch.dtype | None = None):
        self._forward, self._inverse, self._logdet = forward, inverse, logdet
        self.module, self.traceable, self.kind = module, traceable, kind
        self._make_shadow, self._sample_latent = make_shadow, sample_latent
        self.dtype = dtype or _module_dtype(module)
        self.latent_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ maps
    def forward(self, x: Tensor) -> Tensor:
        return _first(self._forward(x))

    def inverse(self, z: Tensor) -> Tensor:
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
        return sh

    def sample_latent(self, n: int, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """``n`` latent codes at ``temperature`` (``temperature = 0`` gives the base mode, z = 0)."""
        if self._sample_latent is not None:
            return self._sample_latent(n, temperature, generator)
        if self.latent_shape is None:
            raise AdapterError("latent shape unknown: run forward on data first")
        eps = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float64)
        return (temperature * eps).to(self.dtype)

    def eval_mode(self) -> "_EvalMode":
        """Context manager: every owned module in eval mode, restored afterwards."""
        return _EvalMode(self.module)

    def __repr__(self) -> str:
        name = type(self.module).__name__ if self.module is not None else "functions"
        return f"Invertible(kind={self.kind!r}, model={name}, dtype={self.dtype})"


class _EvalMode:
    def __init__(self, module: nn.Module | None):
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        if self.module is not None:
            self.modes = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
        return self

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        return False


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
    return Invertible(forward, inverse, logdet=logdet, module=root, make_shadow=make, kind="callables")


# ----------------------------------------------------------------------------- peers
def _gaussian_sampler(loc_scale: Callable[[], tuple[Tensor, Tensor]], dtype_of: Callable[[], torch.dtype]):
    """``z = loc + temperature * scale * eps`` for a diagonal-Gaussian base."""
    def sample(n, temperature, generator=None):
        loc, scale = loc_scale()
        eps = torch.randn((n, *loc.shape), generator=generator, dtype=torch.float64).to(loc.device)
        return (loc.double() + temperature * scale.double() * eps).to(dtype_of())
    return sample


def _normflows(nfm: nn.Module) -> Invertible:
    """normflows writes flows generatively (``x = flows[-1](...flows[0](z))``)."""
    def fwd(x):
        ld = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for f in reversed(nfm.flows):
            x, d = f.inverse(x)
            ld = ld + d
        return x, ld

    def inv(z):
        for f in nfm.flows:
            z, _ = f(z)
        return z

    sample = None
    q0 = getattr(nfm, "q0", None)
    if q0 is not None and hasattr(q0, "loc") and hasattr(q0, "log_scale"):
        sample = _gaussian_sampler(lambda: (q0.loc[0], q0.log_scale[0].exp()), lambda: q0.loc.dtype)
    return Invertible(fwd, inv, logdet=lambda x: fwd(x)[1], module=nfm,
                      make_shadow=lambda dt: _normflows(copy.deepcopy(nfm).to(dt)), sample_latent=sample,
                      kind="normflows")


def _zuko(flow: nn.Module) -> Invertible:
    """zuko flows are lazy: ``flow()`` is the distribution, ``.transform`` maps data -> latent."""
    def fwd(x):
        return flow().transform(x)

    def inv(z):
        return flow().transform.inv(z)

    def logdet(x):
        return flow().transform.call_and_ladj(x)[1]

    def loc_scale():
        base = flow().base
        d = getattr(base, "base_dist", base)
        return d.loc, d.scale

    base = flow().base
    d = getattr(base, "base_dist", base)
    sample = _gaussian_sampler(loc_scale, lambda: d.loc.dtype) if hasattr(d, "loc") and hasattr(d, "scale") else None
    return Invertible(fwd, inv, logdet=logdet, module=flow,
                      make_shadow=lambda dt: _zuko(copy.deepcopy(flow).to(dt)), sample_latent=sample, kind="zuko")


def _freia(inn: nn.Module) -> Invertible:
    """FrEIA: ``inn(x) -> (z, log_jac_det)``, ``inn(z, rev=True) -> (x, log_jac_det)``; no base."""
    return Invertible(lambda x: inn(x)[0], lambda z: inn(z, rev=True)[0], logdet=lambda x: inn(x)[1], module=inn,
                      make_shadow=lambda dt: _freia(copy.deepcopy(inn).to(dt)), kind="FrEIA")


def _nflows(flow: nn.Module) -> Invertible:
    """nflows: a ``Flow`` holds ``_transform`` (data -> latent) and ``_distribution``; a bare nflows
    ``Transform`` is accepted too."""
    t = getattr(flow, "_transform", flow)
    return Invertible(lambda x: t(x)[0], lambda z: t.inverse(z)[0], logdet=lambda x: t(x)[1], module=flow,
                      make_shadow=lambda dt: _nflows(copy.deepcopy(flow).to(dt)), kind="nflows")


def _peer(model) -> str | None:
    root = type(model).__module__.split(".")[0]
    return root if root in PEER_LIBRARIES else None


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
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(callable(f) for f in model):
        return _callables(*model)
    if _is_stableflows(model):
        return _stableflows(model)
    peer = _peer(model)
    if peer == "normflows":
        return _normflows(model)
    if peer == "zuko":
        return _zuko(model)
    if peer == "FrEIA":
        return _freia(model)
    if peer == "nflows":
        return _nflows(model)
    if isinstance(model, nn.Module) and callable(getattr(model, "inverse", None)):
        # any module following the (z, logdet) = m(x), (x, logdet) = m.inverse(z) convention
        return _callables(model.forward, model.inverse)
    raise AdapterError(
        f"cannot audit a {type(model).__name__}: give a stableflows Flow/Transform, a pair of callables "
        f"(forward, inverse), or a flow of {', '.join(PEER_LIBRARIES)}"
    )


def event_dim(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
