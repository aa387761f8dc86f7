"""Per-layer localisation: where on the inverse path does a flow stop being invertible?

Both passes are recorded through the model's :class:`~stableflows.audit.layers.LayerPath` (the
stableflows tracer, a peer library's own sequence of transforms, or the layers of the layer
protocol): the forward ``x -> z`` gives every elementary layer ``l`` its input ``a_l`` and output
``b_l``; the inverse ``z -> x_hat`` gives its inverse-path input ``b'_l`` and output ``a'_l``
(tensors flattened per example; several tensors concatenated). Per layer (inverse order):

* ``err_in = ||b'_l - b_l||``, ``err_out = ||a'_l - a_l||`` -- the accumulated reconstruction error
  entering and leaving the layer (max over examples; relative ``rel_in = err_in / max(||b_l||, 1)``,
  ``rel_out = err_out / max(||a_l||, 1)``);
* ``roundtrip = ||l^-1(l(a_l)) - a_l||`` -- the layer's own round-trip error at exact activations;
* ``gain`` -- the local amplification of the layer inverse, ``sigma_max`` of ``J_{l^-1}(b'_l)`` by
  a few power iterations with JVP/VJP (a perturbation ``d`` of its input grows to ``gain * ||d||``);
* the largest activation magnitude of each pass, the examples whose inverse output is non-finite,
  and the layer's ``stats`` (smallest affine scale, fixed-point iterations / residual / converged).

The layer where the inverse *first explodes* is, walking the inverse path: the first whose
relative error ``rel_out`` exceeds the tolerance while its input was within it, or whose output is
non-finite (whichever comes first); else the first whose ``gain`` exceeds ``gain_threshold``.
For latent inputs (samples) only the inverse pass exists; then only non-finite outputs, gains,
activations and stats are available.

Sampling with clipped activations (Daniels, paper 003 Fig. 1): :func:`clip_activations` clamps the
output of every elementary layer of the inverse pass to ``[-c, c]``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from ..transforms.base import Transform
from . import autodiff as _ad
from .layers import LayerPath, StableflowsPath, Traced

__all__ = ["LayerReport", "Localization", "localize", "localize_many", "trace_passes", "layer_gains", "layer_gain",
           "summarize", "clip_activations", "leaf_transforms",
           "GAIN_THRESHOLD", "GAIN_ITERATIONS"]

GAIN_THRESHOLD = 1e4  # a layer whose inverse amplifies perturbations more than this "explodes"
GAIN_ITERATIONS = 4  # power iterations of the per-layer gain
ACTIVATION_FLOOR = 1.0  # relative errors of intermediate activations divide by max(||a||, this)


def leaf_transforms(root: nn.Module) -> list[tuple[str, Transform]]:
    """Elementary layers: Transforms without Transform submodules, with their dotted names."""
    out = []
    for name, m in root.named_modules():
        if isinstance(m, Transform) and not any(isinstance(c, Transform) for c in m.modules() if c is not m):
            out.append((name, m))
    return out


@contextlib.contextmanager
def clip_activations(root: nn.Module, c: float) -> Iterator[dict[str, int]]:
    """Inside the block, every elementary layer's inverse output is clamped to ``[-c, c]``; yields a
    dict ``name -> number of clamped entries`` filled while it is active."""
    if not c > 0:
        raise ValueError(f"clip threshold must be > 0, got {c}")
    counts: dict[str, int] = {}
    patched = []
    for name, m in leaf_transforms(root):
        orig = m._inverse

        def clipped(z, _orig=orig, _name=name):
            x, ld = _orig(z)
            counts[_name] = counts.get(_name, 0) + int((x.abs() > c).sum())
            return x.clamp(-c, c), ld

        m._inverse = clipped  # instance attribute shadows the class method
        patched.append(m)
    try:
        yield counts
    finally:
        for m in patched:
            del m._inverse


@dataclass
class LayerReport:
    """Diagnostics of one elementary layer on the inverse path (maxima over the traced examples)."""

    index: int  # position on the inverse path (0 = applied first by the inverse)
    name: str
    kind: str
    inv_absmax: float
    inv_nonfinite: int
    gain: float
    fwd_absmax: float = math.nan
    err_in: float = math.nan
    err_out: float = math.nan
    rel_in: float = math.nan
    rel_out: float = math.nan
    roundtrip: float = math.nan
    stats_inverse: dict = field(default_factory=dict)
    stats_forward: dict = field(default_factory=dict)


@dataclass
class Localization:
    layers: list[LayerReport]  # inverse order
    n_examples: int
    mode: str  # "roundtrip" (x given) or "inverse" (latent codes given)
    culprit: str | None  # name of the layer where the inverse first explodes
    reason: str  # why it was named ("" when none)
    max_gain_layer: str | None = None
    tolerance: float = 1e-3
    gain_threshold: float = GAIN_THRESHOLD
    path: str = ""  # what the layers are (stableflows layers, normflows flows, ...)
    note: str = ""  # why the layers could not be localised through ("" when they could)

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)


def _nanmax(t: Tensor) -> float:
    t = t.detach().double().reshape(-1)
    t = t[~torch.isnan(t)]
    return float(t.max()) if t.numel() else math.nan


def _rows(t: Tensor) -> Tensor:
    return t.detach().reshape(t.shape[0], -1)


def _finite_absmax(t: Tensor) -> float:
    r = _rows(t).abs()
    r = r[torch.isfinite(r)]
    return float(r.max()) if r.numel() else math.nan


def layer_gain(f, b: Tensor, iterations: int = GAIN_ITERATIONS,
               generator: torch.Generator | None = None) -> Tensor:
    """Power-iteration estimate of ``sigma_max(J_f(b))`` per example ``(B,)`` for a layer inverse
    ``f`` on flat inputs ``b (B, D)`` (a stableflows Transform is accepted too: its inverse); a
    lower bound that tightens with ``iterations``; NaN where ``b`` is not finite or the layer
    cannot be differentiated."""
    if isinstance(f, Transform):
        m = f
        f = lambda t: m.inverse(t)[0]  # noqa: E731
    n = b.shape[0]
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    ok = torch.isfinite(_rows(b)).all(dim=1).cpu()
    if not bool(ok.any()) or iterations < 1:
        return out
    bb = b[ok.to(b.device)].detach()

    def unit(t):  # norms in float64: a float32 norm of entries ~1e20 overflows
        nrm = _rows(t).double().norm(dim=1).clamp_min(1e-300).view(-1, *([1] * (t.dim() - 1)))
        return (t.double() / nrm).to(t.dtype)

    try:
        _, vjp = _ad.vjp_fn(f, bb)
        jvp = _ad.jvp_fn(f, bb)
        v = unit(torch.randn(bb.shape, generator=generator, dtype=torch.float64).to(bb))
        sigma = torch.zeros(bb.shape[0], dtype=torch.float64)
        for _ in range(iterations):
            jv = jvp(v)  # J v
            sigma = _rows(jv).double().norm(dim=1).cpu()
            v = torch.nan_to_num(unit(vjp(unit(jv))))  # J^T J v, normalised (J v first, against overflow)
        out[ok] = sigma
    except Exception:  # noqa: BLE001 - a layer that cannot be differentiated: gain unknown
        pass
    return out


def _stats(records) -> dict:
    """Numeric stats of the records of one layer, reduced conservatively (min of min_*, max of others)."""
    merged: dict = {}
    for r in records:
        for k, v in (r.stats or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                merged[k] = v if k not in merged else (merged[k] and v if isinstance(v, bool) else v)
                continue
            if k not in merged:
                merged[k] = float(v)
            elif k.startswith("min"):
                merged[k] = min(merged[k], float(v))
            else:
                merged[k] = max(merged[k], float(v))
    return merged


def _path(model) -> LayerPath:
    if isinstance(model, LayerPath):
        return model
    if isinstance(model, Transform) or type(model).__name__ == "Flow":
        return StableflowsPath(model)
    from .adapters import as_invertible

    path = as_invertible(model).layers
    if path is None:
        raise TypeError(f"{type(model).__name__} gives no layers to localise through")
    return path


def trace_passes(model, *, x: Tensor | None = None, z: Tensor | None = None) -> Traced:
    """Record the elementary layers of ``x -> z -> x_hat`` (``x`` given) or of ``z -> x`` (``z`` given)."""
    return _path(model).trace(x=x, z=z)


def layer_gains(model, groups: list[Traced], *, iterations: int = GAIN_ITERATIONS,
                seed: int = 0, deadline: float | None = None) -> list[list[Tensor]]:
    """Per group, per inverse-path layer, the per-example gain; the layers of all groups are
    evaluated together (one batch per layer position) when their inverse paths match. Past
    ``deadline`` (a ``time.perf_counter()`` value) the remaining gains are NaN (not computed)."""
    import time

    path = _path(model)
    g = torch.Generator().manual_seed(seed)
    out: list[list[Tensor]] = [[] for _ in groups]
    depth = max((len(t.inv) for t in groups), default=0)
    for i in range(depth):
        members = [(k, t.inv[i]) for k, t in enumerate(groups) if i < len(t.inv)]
        if deadline is not None and time.perf_counter() > deadline:
            for k, r in members:
                out[k].append(torch.full((r.input.shape[0],), float("nan"), dtype=torch.float64))
                groups[k].gains_skipped += 1
            continue
        by_name: dict[str, list] = {}
        for k, r in members:
            by_name.setdefault(r.name, []).append((k, r))
        for name, rs in by_name.items():
            inputs = [r.input for _, r in rs]
            fn = path.inverse_fn(rs[0][1])
            if len({repr(r.in_spec) for _, r in rs}) != 1:
                gains = [layer_gain(path.inverse_fn(r), r.input, iterations, g) for _, r in rs]
            else:
                cat = layer_gain(fn, torch.cat(inputs, 0), iterations, g)
                gains = list(torch.split(cat, [t.shape[0] for t in inputs]))
            for (k, _), gk in zip(rs, gains):
                out[k].append(gk)
    return out


def summarize(model, traced: Traced, gains: list[Tensor], *, tolerance: float = 1e-3,
              gain_threshold: float = GAIN_THRESHOLD) -> Localization:
    """The :class:`Localization` of one traced group with its per-layer gains."""
    path = _path(model)
    fwd, inv = traced.fwd, traced.inv
    # forward leaf k corresponds to inverse leaf (len - 1 - k) when the passes mirror each other
    mirrored = bool(fwd) and [r.name for r in reversed(fwd)] == [r.name for r in inv]
    layers: list[LayerReport] = []
    for i, r in enumerate(inv):
        rep = LayerReport(index=i, name=r.name, kind=r.kind, inv_absmax=_finite_absmax(r.output),
                          inv_nonfinite=int((~r.out_finite).sum()), gain=_nanmax(gains[i]),
                          stats_inverse=_stats([r]))
        if mirrored:
            f = fwd[len(fwd) - 1 - i]
            a, b = f.input, f.output
            rep.fwd_absmax = _finite_absmax(b)
            rep.stats_forward = _stats([f])
            e_in, e_out = _err(r.input, b), _err(r.output, a)
            rep.err_in, rep.err_out = _nanmax(e_in), _nanmax(e_out)
            rep.rel_in = _nanmax(e_in / _norms(b))
            rep.rel_out = _nanmax(e_out / _norms(a))
            with torch.no_grad():
                try:
                    rep.roundtrip = _nanmax(_err(path.inverse_fn(_as_inverse_call(f))(b), a))
                except Exception:  # noqa: BLE001 - a layer that raises on its own output: infinitely bad
                    rep.roundtrip = math.inf
        layers.append(rep)
    culprit, reason = _culprit(layers, tolerance, gain_threshold)
    g = [(r.gain, r.name) for r in layers if not math.isnan(r.gain)]
    note = traced.note
    skipped = traced.gains_skipped
    if skipped:
        note = (note + "; " if note else "") + f"gains of {skipped} of {len(layers)} layers not computed (time budget)"
    return Localization(layers, traced.n, traced.mode, culprit, reason, max(g)[1] if g else None, tolerance,
                        gain_threshold, path=path.description, note=note)


def _as_inverse_call(f):
    """The inverse-path call matching forward call ``f``: its input is ``f``'s output."""
    from .layers import Call

    return Call(f.name, f.kind, f.output, f.input, f.out_spec)


def localize(model, *, x: Tensor | None = None, z: Tensor | None = None, tolerance: float = 1e-3,
             gain_threshold: float = GAIN_THRESHOLD, gain_iterations: int = GAIN_ITERATIONS,
             seed: int = 0) -> Localization:
    """Trace ``model`` (a stableflows Flow or Transform, a peer flow, a protocol module or a
    :class:`~stableflows.audit.layers.LayerPath`) on data ``x`` (round trip) or on latent codes ``z``
    (inverse pass only) and report every elementary layer; see the module docstring."""
    return localize_many(model, [(x, z)], tolerance=tolerance, gain_threshold=gain_threshold,
                         gain_iterations=gain_iterations, seed=seed)[0]


def localize_many(model, groups: list[tuple[Tensor | None, Tensor | None]], *, tolerance: float = 1e-3,
                  gain_threshold: float = GAIN_THRESHOLD, gain_iterations: int = GAIN_ITERATIONS,
                  seed: int = 0, deadline: float | None = None) -> list[Localization]:
    """:func:`localize` for several groups ``(x, None)`` / ``(None, z)``; layer gains are computed
    for all groups in one batch per layer (much faster for many small groups); those still to do
    at ``deadline`` are left out (NaN, said in the localisation's note)."""
    path = _path(model)
    traced = [path.trace(x=x, z=z) for x, z in groups]
    gains = layer_gains(path, traced, iterations=gain_iterations, seed=seed, deadline=deadline)
    return [summarize(path, t, g, tolerance=tolerance, gain_threshold=gain_threshold) for t, g in zip(traced, gains)]


def _norms(a: Tensor) -> Tensor:
    return _rows(a).double().norm(dim=1).clamp_min(ACTIVATION_FLOOR).cpu()


def _err(a: Tensor, b: Tensor) -> Tensor:
    """Per-example L2 distance in float64; inf where not finite."""
    d = (_rows(a).double() - _rows(b).double()).cpu()
    e = d.norm(dim=1)
    e[~torch.isfinite(d).all(dim=1)] = float("inf")
    return e


def _culprit(layers: list[LayerReport], tolerance: float, gain_threshold: float) -> tuple[str | None, str]:
    """The first layer on the inverse path whose output is non-finite or whose relative error
    exceeds the tolerance while its input was within it (a layer may blow the error up to finite
    but useless values and a later one turn them non-finite: the earlier one is the culprit);
    else the first whose gain exceeds the threshold."""
    for r in layers:
        if r.inv_nonfinite:
            return r.name, f"first non-finite output on the inverse path ({r.inv_nonfinite} examples)"
        if r.rel_out > tolerance and not r.rel_in > tolerance:
            return r.name, (f"reconstruction error jumps here: relative error {r.rel_out:.3g} > {tolerance:g} "
                            f"(error in {r.err_in:.3g}, out {r.err_out:.3g}, own round trip {r.roundtrip:.3g})")
    for r in layers:
        if r.gain > gain_threshold:
            return r.name, f"inverse amplifies perturbations by {r.gain:.3g} > {gain_threshold:g}"
    return None, ""
