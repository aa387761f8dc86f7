"""Memory-saving backpropagation through invertible chains, and a check of its gradients.

An invertible network need not store its activations for backpropagation: each layer's input can
be recomputed from its output by the inverse (Gomez et al. 2017, RevNets; Jacobsen et al. 2018,
i-RevNets). :class:`MemorySavingCompose` runs ``F = F_n o ... o F_1`` inside one custom
``torch.autograd.Function`` that keeps only the final output ``y_n``. Its backward pass walks the
chain from the top:

    x_i = F_i^{-1}(y_i)                              (no graph, the recomputation)
    y_i', ld_i' = F_i(x_i)                            (graph of this one layer only)
    g_{x_i}, g_theta_i = vjp((y_i', ld_i'), (x_i, theta_i), (g_{y_i}, g_ld))
    y_{i-1} := x_i,  g_{y_{i-1}} := g_{x_i}

so activation memory does not grow with the depth. The log-det output is the sum of the layer
log-dets, hence every ``ld_i`` receives the same incoming gradient ``g_ld``.

The gradient is exact whenever the inverse is numerically exact. When it is not (affine coupling
with scales near zero, Behrmann et al. 2020, "Understanding and Mitigating Exploding Inverses in
Invertible Neural Networks", Fig. 1), the recomputed activations and therefore the gradients are
wrong -- silently. :func:`gradient_angle` measures the angle between the stored-activation
gradient and the memory-saving gradient, and :class:`GradientGuard` lets a training loop track it
every ``k`` steps and fall back to stored activations for a step whose memory-saving gradient is
non-finite or off.

The same machinery runs the chain in the inverse direction (``MemorySavingCompose.inverse``), where
the forward maps recompute the inputs; the inverse-side finite-difference regularizer uses it.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .transforms import base as _base
from .transforms.base import Compose, StableflowsError, Transform
from .transforms.coupling import Coupling
from .transforms.lipschitz import frozen_normalization

__all__ = [
    "MemorySavingCompose",
    "memory_saving",
    "chain_layers",
    "memory_saving_modules",
    "has_memory_saving",
    "set_memory_saving",
    "stored_activations",
    "is_recomputing",
    "GradientAngle",
    "GradientComparison",
    "compare_gradients",
    "gradient_angle",
    "GradientGuard",
]

log = logging.getLogger("stableflows.memory")

DEG_PER_RAD = 180.0 / math.pi
GRAD_NORM_FLOOR = 1e-300  # below this the stored gradient counts as zero (angle undefined -> 0 if both zero)

_RECOMPUTING = [0]  # > 0 while a backward pass recomputes layers


def is_recomputing() -> bool:
    """True while :class:`MemorySavingCompose` re-runs layers in its backward pass.

    A layer whose forward has side effects (e.g. a power iteration that updates a buffer) may
    skip them when this is set, so that the recomputation reproduces the stored forward."""
    return _RECOMPUTING[0] > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _RECOMPUTING[0] += 1
    tracers = list(_base._ACTIVE_TRACERS)  # recomputations are not layer calls a user made
    _base._ACTIVE_TRACERS.clear()
    inside = _base._SWITCHES.inside
    _base._SWITCHES.inside = True  # inputs checked in the forward pass: no entry checks (device reads) again
    try:
        yield
    finally:
        _base._SWITCHES.inside = inside
        _base._ACTIVE_TRACERS.extend(tracers)
        _RECOMPUTING[0] -= 1


# ----------------------------------------------------------------------------- flattening
def chain_layers(transform: nn.Module) -> list[Transform]:
    """The elementary links of a chain: nested :class:`Compose` (and a flow's ``.transform``)
    are flattened in order; any other transform (a multi-scale split, a residual block) is one link.

    The finer the chain, the less memory a memory-saving backward pass needs at its peak.
    """
    inner = getattr(transform, "transform", None)
    if not isinstance(transform, Transform) and isinstance(inner, Transform):
        return chain_layers(inner)
    if isinstance(transform, Compose):
        out: list[Transform] = []
        for layer in transform.layers:
            out += chain_layers(layer)
        return out
    if not isinstance(transform, Transform):
        raise TypeError(f"expected a Transform (or a flow with .transform), got {type(transform).__name__}")
    return [transform]


# ----------------------------------------------------------------------------- autograd
def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _rng_state(device: torch.device) -> tuple:
    cpu = torch.get_rng_state()
    if device.type == "cuda":
        return cpu, torch.cuda.get_rng_state(device)
    return cpu, None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _snapshot_stats(layer: nn.Module) -> list[tuple[nn.Module, dict]]:
    return [(m, dict(m.stats)) for m in layer.modules() if isinstance(m, Transform) and m.stats]


class _InvertibleChain(torch.autograd.Function):
    """``(y, logdet) = chain(x)`` keeping only ``y``; see the module docstring.

    ``params`` are passed as inputs so autograd returns their gradients; ``index[i]`` lists the
    positions in ``params`` of layer ``i``'s trainable parameters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, chain: "MemorySavingCompose", reverse: bool, index: list[list[int]],
                *params: Tensor):
        layers = list(chain.layers)[::-1] if reverse else list(chain.layers)
        rng, stats = [], []
        y, total = x, x.new_zeros(x.shape[0])
        for layer in layers:  # autograd.Function.forward runs without a graph
            if chain.preserve_rng_state:
                rng.append(_rng_state(y.device))
            y, ld = layer.inverse(y) if reverse else layer(y)
            total = total + ld
            stats.append(_snapshot_stats(layer))
        if _same_storage(y, x):  # an output may not alias the input of a custom Function
            y = y.clone()
        ctx.chain, ctx.reverse, ctx.index, ctx.rng, ctx.stats = chain, reverse, index, rng, stats
        ctx.params = params  # references to the leaves, not activations
        # buffers a forward may update (power-iteration vectors of spectral norms): the recomputation
        # must see the values this call used; small, parameter-sized at most
        ctx.buffers = [(b, b.detach().clone()) for b in chain.buffers() if b.is_floating_point()]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y)
        return y, total

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor | None, g_ld: Tensor | None):
        (y,) = ctx.saved_tensors
        params = ctx.params
        layers = list(ctx.chain.layers)[::-1] if ctx.reverse else list(ctx.chain.layers)
        grads: list[Tensor | None] = [None] * len(params)
        resume = _rng_state(y.device) if ctx.rng else None
        cur = y.detach()
        if g_y is None:
            g_y = torch.zeros_like(cur)
        now = [(b, b.detach().clone()) for b, _ in ctx.buffers]
        _restore_buffers(ctx.buffers)
        with _recomputing(), frozen_normalization(ctx.chain):
            for i in range(len(layers) - 1, -1, -1):
                layer = layers[i]
                need_x = i > 0 or ctx.needs_input_grad[0]
                p_i = [params[j] for j in ctx.index[i]]
                if ctx.chain.fuse_couplings and _fusable(layer):
                    x_i, g_x, g_p = _coupling_link(layer, cur, g_y, g_ld, need_x, p_i, ctx.reverse)
                else:
                    rng = ctx.rng[i] if ctx.rng else None
                    x_i, g_x, g_p = _generic_link(layer, cur, g_y, g_ld, need_x, p_i, ctx.reverse, rng)
                g_y = g_x
                for j, gj in zip(ctx.index[i], g_p):
                    if gj is not None:
                        grads[j] = gj if grads[j] is None else grads[j] + gj
                for module, s in ctx.stats[i]:  # recomputations do not overwrite forward diagnostics
                    module.stats = s
                cur = x_i
        _restore_buffers(now)
        if resume is not None:
            _set_rng_state(resume, y.device)
        g_x = g_y if ctx.needs_input_grad[0] else None
        return (g_x, None, None, None, *grads)


def _vjp(pairs: list[tuple[Tensor, Tensor | None]], inputs: list[Tensor]) -> tuple:
    """``sum_k g_k^T d out_k / d inputs`` for the pairs ``(out_k, g_k)`` that carry a gradient."""
    outs = [o for o, g in pairs if g is not None and o.requires_grad]
    gouts = [g for o, g in pairs if g is not None and o.requires_grad]
    if outs and inputs:
        return torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
    return (None,) * len(inputs)


def _generic_link(layer, cur, g_y, g_ld, need_x, p_i, reverse, rng):
    """Any link: ``x = F^-1(y)`` without a graph, then the vjp of ``F`` at ``x``.
    Returns ``(x, dL/dx or None, dL/dtheta per parameter)``."""
    fwd = layer.inverse if reverse else layer
    inv = layer if reverse else layer.inverse
    with torch.no_grad():
        x_i, _ = inv(cur)  # the recomputed input of the link
    if rng is not None:
        _set_rng_state(rng, cur.device)
    with torch.enable_grad():
        x_leaf = x_i.detach().requires_grad_(need_x)
        y_rec, ld_rec = fwd(x_leaf)
    g = _vjp([(y_rec, g_y), (ld_rec, g_ld)], ([x_leaf] if need_x else []) + p_i)
    g_x = None
    if need_x:
        g_x = g[0] if g[0] is not None else torch.zeros_like(x_i)
        g = g[1:]
    return x_i.detach(), g_x, g


def _fusable(layer: nn.Module) -> bool:
    return isinstance(layer, Coupling) and type(layer)._forward is Coupling._forward \
        and type(layer)._inverse is Coupling._inverse


def _coupling_link(layer: Coupling, cur, g_y, g_ld, need_x, p_i, reverse):
    """A coupling link with one conditioner evaluation instead of two (as in RevNets).

    The kept part is the same on both sides (``y_a = x_a``), so the conditioner ``h = net(y_a)`` is
    evaluated once, with a graph; the transformed part of the input is solved from ``h`` without a
    graph, and the elementwise map is re-applied with a graph for the vjp. The gradient w.r.t. the
    input is ``g_y`` on the kept part plus what flows through ``h``, and the vjp of the
    elementwise map on the transformed part (``_params`` ignores the transformed entries, so
    their gradient through ``h`` is zero)."""
    solve, apply = (layer._couple, layer._uncouple) if reverse else (layer._uncouple, layer._couple)
    with torch.enable_grad():
        a_leaf = cur.detach().requires_grad_(need_x)
        h = layer._params(a_leaf)  # (B, P, N_b)
    with torch.no_grad():
        xb, _ = solve(layer._take(cur), h.detach())  # (B, N_b)
    with torch.enable_grad():
        xb_leaf = xb.detach().requires_grad_(need_x)
        yb_rec, ld_rec = apply(xb_leaf, h)
    x_i = layer._put(cur, xb)
    g = _vjp([(yb_rec, layer._take(g_y)), (ld_rec, g_ld)], ([a_leaf, xb_leaf] if need_x else []) + p_i)
    g_x = None
    if need_x:
        g_a, g_b = g[0], g[1]
        g_x = layer._put(g_y if g_a is None else g_y + g_a, g_b if g_b is not None else torch.zeros_like(xb))
        g = g[2:]
    return x_i, g_x, g


# ----------------------------------------------------------------------------- the chain
class MemorySavingCompose(Compose):
    """A :class:`Compose` whose backward pass recomputes activations by inverting them.

    ``F = F_n o ... o F_1``; ``forward`` stores only ``F(x)`` (for gradients) and ``inverse``
    stores only ``F^{-1}(z)``. Gradients w.r.t. parameters, the input and the log-det output are
    those of the plain :class:`Compose` whenever every layer's inverse is exact.

    Args:
        layers: the links (nested :class:`Compose` are kept as one link each; use
            :func:`memory_saving` to flatten them).
        enabled: when False it behaves exactly like :class:`Compose` (stored activations).
        preserve_rng_state: restore the RNG state of each link before its recomputation, so that
            stochastic layers (random log-det estimators) see the same random numbers as in the
            forward pass (costs one RNG state, ~5 KB, per link -- not activation-sized).
        fuse_couplings: recompute coupling layers with one conditioner evaluation instead of two
            (inverse, then forward): the conditioner runs once on the kept half, which input and
            output share. Same gradients; about a quarter less backward time.

    The floating-point buffers of the chain (e.g. power-iteration vectors of spectral norms, which
    a training-mode forward updates) are kept as they were after this forward call and put back
    during its recomputation, so repeated forward calls before one backward are recomputed exactly.

    Limitations: double backward (``create_graph=True``) is not supported; layers must not change
    parameters in place during the forward pass (data-dependent initialisation happens once,
    before the first gradient, and is fine).
    """

    def __init__(self, *layers: Transform, enabled: bool = True, preserve_rng_state: bool = True,
                 fuse_couplings: bool = True):
        super().__init__(*layers)
        self.enabled = bool(enabled)
        self.preserve_rng_state = bool(preserve_rng_state)
        self.fuse_couplings = bool(fuse_couplings)

    def _trainable(self) -> list[Tensor]:
        seen, out = set(), []
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _index(self, params: list[Tensor], reverse: bool) -> list[list[int]]:
        pos = {id(p): k for k, p in enumerate(params)}
        layers = list(self.layers)[::-1] if reverse else list(self.layers)
        index = []
        for layer in layers:
            seen, idx = set(), []
            for p in layer.parameters():
                if id(p) in pos and id(p) not in seen:
                    seen.add(id(p))
                    idx.append(pos[id(p)])
            index.append(idx)
        return index

    def _run(self, x: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
        params = self._trainable()
        if not (self.enabled and torch.is_grad_enabled() and (x.requires_grad or params)):
            return super()._inverse(x) if reverse else super()._forward(x)
        return _InvertibleChain.apply(x, self, reverse, self._index(params, reverse), *params)

    def _forward(self, x):
        return self._run(x, reverse=False)

    def _inverse(self, z):
        return self._run(z, reverse=True)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, links={len(self.layers)}"


def memory_saving(transform: nn.Module, *, enabled: bool = True, preserve_rng_state: bool = True,
                  fuse_couplings: bool = True) -> MemorySavingCompose:
    """A :class:`MemorySavingCompose` over the flattened links of ``transform`` (a Compose, any
    Transform, or a flow with ``.transform``). The layers (and their parameters) are shared, not
    copied."""
    return MemorySavingCompose(*chain_layers(transform), enabled=enabled, preserve_rng_state=preserve_rng_state,
                               fuse_couplings=fuse_couplings)


def memory_saving_modules(model: nn.Module) -> list[MemorySavingCompose]:
    return [m for m in model.modules() if isinstance(m, MemorySavingCompose)]


def has_memory_saving(model: nn.Module) -> bool:
    """True if ``model`` holds at least one enabled :class:`MemorySavingCompose`."""
    return any(m.enabled for m in memory_saving_modules(model))


def set_memory_saving(model: nn.Module, enabled: bool) -> None:
    """Switch every :class:`MemorySavingCompose` inside ``model`` on or off."""
    for m in memory_saving_modules(model):
        m.enabled = bool(enabled)


@contextlib.contextmanager
def stored_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` backpropagates with stored activations (memory saving off)."""
    mods = memory_saving_modules(model)
    before = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


# ----------------------------------------------------------------------------- gradient check
class GradientAngle(NamedTuple):
    """``angle`` in degrees between the stored-activation and memory-saving gradients, and
    ``rel_error = ||g_ms - g_st|| / ||g_st||``; ``nan`` / ``inf`` when a gradient is not finite."""

    angle: float
    rel_error: float


class GradientComparison(NamedTuple):
    angle: float
    rel_error: float
    finite_saving: bool  # memory-saving gradient finite
    finite_stored: bool
    norm_saving: float
    norm_stored: float
    loss_saving: float
    loss_stored: float
    grads_saving: list  # per parameter (None where unused)
    grads_stored: list


def _loss_value(out) -> Tensor:
    """A loss function may return a scalar or ``(scalar, logs)`` (the Objective protocol)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _call_loss(loss_fn, model, batch) -> tuple[Tensor, dict]:
    out = loss_fn.loss(model, batch) if hasattr(loss_fn, "loss") else loss_fn(model, batch)
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else {})
    return out, {}


def default_loss(model: nn.Module, batch) -> Tensor:
    """Cross-entropy of ``model(x)`` when the batch has labels, else ``-mean log p(x)``.

    ``batch`` may be a :class:`~stableflows.train.objectives.Batch`, a tensor, or ``(x, y)``."""
    x, y = _unpack(batch)
    if y is not None:
        return torch.nn.functional.cross_entropy(model(x), y)
    return -model.log_prob(x).mean()


def _unpack(batch) -> tuple[Tensor, Tensor | None]:
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch.x, getattr(batch, "y", None)


def _snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _restore_buffers(snap: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, v in snap:
            b.copy_(v)


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)]) if params else torch.zeros(0, dtype=torch.float64)


def angle_between(g_saving: Tensor, g_stored: Tensor) -> GradientAngle:
    """Angle (degrees) and relative L2 distance of two flat gradient vectors (float64)."""
    a, b = g_saving.double(), g_stored.double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return GradientAngle(float("nan"), float("inf"))
    na, nb = float(a.norm()), float(b.norm())
    diff = float((a - b).norm())
    if nb <= GRAD_NORM_FLOOR:
        return GradientAngle(0.0 if na <= GRAD_NORM_FLOOR else 90.0, 0.0 if diff <= GRAD_NORM_FLOOR else float("inf"))
    if na <= GRAD_NORM_FLOOR:
        return GradientAngle(90.0, diff / nb)
    cos = float(torch.dot(a, b)) / (na * nb)
    return GradientAngle(math.acos(max(-1.0, min(1.0, cos))) * DEG_PER_RAD, diff / nb)


def compare_gradients(model: nn.Module, batch, loss_fn=None, *, params: Sequence[Tensor] | None = None
                      ) -> GradientComparison:
    """Gradients of ``loss_fn(model, batch)`` with stored activations and with memory saving.

    Both passes see the same random numbers and the same buffers (both are restored between
    them); ``.grad`` of the parameters is not touched. ``loss_fn`` returns a scalar or
    ``(scalar, logs)`` or is an Objective with ``.loss``; default :func:`default_loss`.
    """
    if not has_memory_saving(model):
        raise StableflowsError("the model has no enabled MemorySavingCompose: build it with memory_saving=True")
    loss_fn = default_loss if loss_fn is None else loss_fn
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    rng, bufs = _rng_state(device), _snapshot_buffers(model)
    step = getattr(loss_fn, "step", None)  # an objective that counts its own steps sees one step
    with stored_activations(model):
        loss_st, _ = _call_loss(loss_fn, model, batch)
        g_st = _grads(loss_st, params)
    _set_rng_state(rng, device)
    _restore_buffers(bufs)
    if isinstance(step, int):
        loss_fn.step = step
    loss_ms, _ = _call_loss(loss_fn, model, batch)
    g_ms = _grads(loss_ms, params)
    a, b = _flat(g_ms, params), _flat(g_st, params)
    ang = angle_between(a, b)
    return GradientComparison(
        angle=ang.angle, rel_error=ang.rel_error,
        finite_saving=bool(torch.isfinite(a).all()), finite_stored=bool(torch.isfinite(b).all()),
        norm_saving=float(a.norm()), norm_stored=float(b.norm()),
        loss_saving=float(loss_ms.detach()), loss_stored=float(loss_st.detach()),
        grads_saving=g_ms, grads_stored=g_st)


def gradient_angle(model: nn.Module, batch, loss_fn=None) -> GradientAngle:
    """``(angle in degrees, relative L2 distance)`` between the stored-activation gradient and
    the memory-saving gradient of ``loss_fn`` over all trainable parameters
    (Behrmann et al. 2020, Fig. 1). See :func:`compare_gradients`."""
    c = compare_gradients(model, batch, loss_fn)
    return GradientAngle(c.angle, c.rel_error)


# ----------------------------------------------------------------------------- training guard
class GradientGuard:
    """Backward pass of a training step with a watch on memory-saving gradients.

    ``guard.backward(model, objective, batch, step)`` replaces ``loss.backward()`` in a loop:

    - every step the memory-saving gradient is checked for NaN/inf;
    - every ``every`` steps (``every > 0``) the stored-activation gradient of the same batch (same
      random numbers) is computed too and ``grad_angle`` / ``grad_rel_error`` are logged;
    - with ``fallback=True`` a step whose memory-saving gradient is non-finite, or (on a check
      step) off by more than ``max_angle`` degrees or ``max_rel_error``, uses the stored-activation
      gradient instead; this is logged (``grad_fallback = 1``) and reported through ``logging``.

    Gradients are accumulated into ``p.grad``. Models without memory saving run a plain backward.
    ``history`` keeps ``(step, angle, rel_error, fell_back)`` of every check and fallback.
    """

    def __init__(self, *, every: int = 100, max_angle: float = 1.0, max_rel_error: float = 0.05,
                 fallback: bool = True, logger: logging.Logger | None = None):
        if every < 0:
            raise ValueError(f"every must be >= 0 (0 disables the periodic check), got {every}")
        if not max_angle > 0 or not max_rel_error > 0:
            raise ValueError(f"max_angle and max_rel_error must be > 0, got {max_angle}, {max_rel_error}")
        self.every, self.max_angle, self.max_rel_error = int(every), float(max_angle), float(max_rel_error)
        self.fallback = bool(fallback)
        self.log = logger or log
        self.history: list[tuple[int, float, float, bool]] = []
        self.n_fallbacks = 0

    def backward(self, model: nn.Module, objective, batch, step: int, *, check: bool | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        """One step's backward pass; ``check`` (default: ``step % every == 0``) forces or skips the
        comparison with stored activations on this step."""
        if hasattr(objective, "set_step"):
            objective.set_step(step)
        if not has_memory_saving(model):
            loss, logs = _call_loss(objective, model, batch)
            loss.backward()
            return loss.detach(), dict(logs)
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        rng, bufs = _rng_state(device), _snapshot_buffers(model)
        loss, logs = _call_loss(objective, model, batch)
        logs = dict(logs)
        g_ms = _grads(loss, params)
        flat_ms = _flat(g_ms, params)
        finite = bool(torch.isfinite(flat_ms).all())
        if check is None:
            check = self.every > 0 and step % self.every == 0
        grads = g_ms
        if check or (self.fallback and not finite):
            after = _rng_state(device)
            _set_rng_state(rng, device)
            _restore_buffers(bufs)
            with stored_activations(model):
                loss_st, logs_st = _call_loss(objective, model, batch)
                g_st = _grads(loss_st, params)
            _set_rng_state(after, device)
            ang = angle_between(flat_ms, _flat(g_st, params))
            logs["grad_angle"], logs["grad_rel_error"] = ang.angle, ang.rel_error
            bad = not finite or not (ang.angle <= self.max_angle and ang.rel_error <= self.max_rel_error)
            fell_back = bad and self.fallback
            if fell_back:
                grads, loss, logs = g_st, loss_st, {**dict(logs_st), "grad_angle": ang.angle,
                                                    "grad_rel_error": ang.rel_error}
                self.n_fallbacks += 1
                self.log.warning("step %d: memory-saving gradient %s (angle %.3g deg, rel. error %.3g); "
                                 "used stored activations", step, "non-finite" if not finite else "off",
                                 ang.angle, ang.rel_error)
            logs["grad_fallback"] = float(fell_back)
            self.history.append((int(step), ang.angle, ang.rel_error, fell_back))
        logs["grad_nonfinite"] = float(not finite)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g
        return loss.detach(), logs
