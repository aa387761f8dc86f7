"""A normalizing flow: a :class:`~stableflows.transforms.base.Transform` on top of a base distribution.

    log p(x) = log p_Z(F(x)) + log|det dF/dx|

``p_Z`` is ``N(0, I)`` unless another one is given (:mod:`stableflows.models.distributions`:
a diagonal Gaussian or a Gaussian mixture with learned parameters; :meth:`Flow.with_base`).
Sampling draws ``z ~ p_Z`` at temperature ``T`` (``z = T eps`` for ``N(0, I)``) and returns
``x = F^-1(z)`` (Glow, Kingma & Dhariwal 2018, sec. 5: reduced-temperature sampling), with

    log p(x) = log p_Z(z) - log|det dF^-1/dz|

for :meth:`Flow.sample_and_log_prob`. The sampling methods follow torch.distributions / zuko:
``sample(shape)`` (no gradient), ``rsample(shape)`` (differentiable: reverse-KL / variational
training), ``sample_and_log_prob`` / ``rsample_and_log_prob``; ``shape`` is an int ``n`` or a
sample shape (``()``, ``(4,)``, ``torch.Size([2, 3])``) and the result has shape ``(*shape, *event)``.

Conditional flows (cINNs, Ardizzone et al. 2019) model ``p(x | c)``: every method takes a
``context`` that is handed to every conditional layer, ``log p(x | c) = log p_Z(F(x; c)) +
log|det dF/dx (x; c)|``, ``log_prob(x, context=c)`` with one context row per example. Sampling
follows torch.distributions' batch shapes: ``sample(shape, context=c)`` with ``c`` of shape
``(*batch, *context_shape)`` draws ``shape`` samples per context row, result
``(*shape, *batch, *event)``: ``sample(context=c)`` one per row, ``sample(8, context=c)`` eight per
row; a single context ``(*context_shape)`` gives ``(*shape, *event)``.

Inputs are validated once, at the public entry (``log_prob``, ``forward``, ``inverse``): a floating
tensor of the model's dtype, a non-empty batch of the event shape, inside the domain of the first
layer (e.g. the Logit's [0, 1]), and finite for ``log_prob`` (``forward`` / ``inverse`` propagate
NaN / inf, which the audit counts); the layers inside trust it
(:func:`~stableflows.transforms.base.validation` switches the checks off; compiled code skips them).

``flow.compile(**torch_compile_options)`` compiles the three entry points in place
(``torch.compile``; the model stays a :class:`Flow`, its checkpoints and copies are plain): the
checks stay eager, in front of the compiled code, and traced calls (the audit, ``collect_stats``)
run eagerly, so per-layer records are exactly those of the uncompiled model.
"""
from __future__ import annotations

import math
import operator
import dataclasses
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ..transforms.base import (LOG_2PI, ContextError, Transform, _module_dtype, check_context, check_finite,
                               check_model_context, check_shape, check_tensor, context_shape_of, requires_context,
                               run_checked, stats_wanted, sum_except_batch)
from .distributions import BaseDistribution, StandardNormal, make_base

SampleShape = Union[int, Sequence[int], torch.Size]

__all__ = ["Flow", "standard_normal_log_prob"]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over every non-batch dimension, shape ``(B,)``."""
    return -0.5 * sum_except_batch(z.pow(2)) - 0.5 * z[0].numel() * LOG_2PI


class Flow(nn.Module):
    """Transform + base distribution (standard normal by default); follows the layer contract too.

    Args:
        transform: the bijection data -> latent.
        shape: event shape of the data, e.g. ``(1, 8, 8)`` or ``(64,)``.
        latent_shape: event shape of ``transform(x)[0]`` (defaults to ``shape``).
        config: the :class:`~stableflows.config.ModelConfig` it was built from, or None.
        base: a :class:`~stableflows.models.distributions.BaseDistribution` on ``latent_shape``
            (default: ``StandardNormal``).

    ``context_shape`` is the context event shape of a conditional flow (None: unconditional).
    """

    def __init__(self, transform: Transform, shape: Sequence[int], latent_shape: Sequence[int] | None = None,
                 config=None, base: BaseDistribution | None = None):
        super().__init__()
        self.transform = transform
        self.shape = tuple(int(s) for s in shape)
        self.latent_shape = tuple(int(s) for s in (latent_shape if latent_shape is not None else shape))
        if math.prod(self.shape) != math.prod(self.latent_shape):
            raise ValueError(f"latent shape {self.latent_shape} has another size than data shape {self.shape}")
        self.config = config
        self.base = self._checked_base(base if base is not None else StandardNormal(self.latent_shape))
        self.context_shape = context_shape_of(transform)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return run_checked(lambda v: self.check_input(v, finite=False, context=context),
                           lambda v: self._entry("forward")(v, context), x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return run_checked(lambda v: self.check_latent(v, context=context),
                           lambda v: self._entry("inverse")(v, context), z)

    # ------------------------------------------------------------------ compilation
    _ENTRIES = ("forward", "inverse", "log_prob")

    def _eager(self, name: str):
        return {"forward": self.transform, "inverse": self.transform.inverse, "log_prob": self._log_prob}[name]

    def _entry(self, name: str):
        compiled = self.__dict__.get("_compiled")
        if compiled is None or stats_wanted():  # traced calls run eagerly: the records of every layer
            return self._eager(name)
        return compiled[name]

    def compile(self, **options) -> "Flow":
        """Compile ``forward``, ``inverse`` and ``log_prob`` with ``torch.compile(**options)`` in place
        (e.g. ``fullgraph=True``, ``mode="max-autotune"``); returns ``self``. Initialise data-dependent
        layers first (one training-mode forward: ActNorm), so that the compiled code has no branch on
        the device. Deep copies (EMA, the audit's float64 shadow) and pickles are not compiled.
        Shapes are static unless ``dynamic`` is given: every flow shares the layers' code, and with
        automatic dynamic shapes a second flow of another image size made Inductor compile symbolic
        sizes (torch 2.13: "cannot determine truth value of Relational" at 28x28 after 8x8)."""
        options.setdefault("dynamic", False)
        self.__dict__["_compiled"] = {name: torch.compile(self._eager(name), **options) for name in self._ENTRIES}
        return self

    @property
    def is_compiled(self) -> bool:
        return self.__dict__.get("_compiled") is not None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_compiled", None)  # compiled code belongs to this instance
        return state

    def check_input(self, x: Tensor, what: str = "input", *, finite: bool = True, context: Tensor | None = None) -> None:
        """Raise a named error for a non-float tensor or one of another dtype than the model's, an
        empty batch, a wrong shape, NaN/inf entries (``finite``: the density's entry; ``forward``
        propagates them), or values outside the first layer's domain; and a :class:`ContextError`
        for a missing, unexpected or ill-shaped ``context`` (NaN / inf in it too, with ``finite``)."""
        check_tensor(x, what, _module_dtype(self))
        check_shape(x, self.shape, what)
        if finite:
            check_finite(x, what)
        self.transform._check_domain(x, "forward")
        self._check_context(context, x.shape[0], finite)

    def check_latent(self, z: Tensor, what: str = "latent", *, context: Tensor | None = None) -> None:
        """Named errors for latent codes: a floating tensor of the model's dtype, a non-empty batch
        of shape ``(B, *latent_shape)`` (NaN / inf propagate, unless the last layer refuses them),
        and the context as in :meth:`check_input`."""
        check_tensor(z, what, _module_dtype(self))
        check_shape(z, self.latent_shape, what)
        self.transform._check_domain(z, "inverse")
        self._check_context(context, z.shape[0], False)

    def _check_context(self, context: Tensor | None, batch: int, finite: bool) -> None:
        check_model_context(self.transform, context, batch, "this flow")
        if finite and context is not None:
            check_finite(context, "context")

    def _log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z) + logdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` (``log p(x | context)`` for a conditional flow) per example, shape ``(B,)``."""
        return run_checked(lambda v: self.check_input(v, context=context),
                           lambda v: self._entry("log_prob")(v, context), x)

    def log_prob_parts(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(log p(z), log|det dz/dx|)`` per example; their sum is ``log_prob(x)``."""
        z, logdet = run_checked(lambda v: self.check_input(v, context=context), lambda v: self.transform(v, context), x)
        return self.base.log_prob(z), logdet

    def _param(self) -> Tensor:
        for t in list(self.parameters()) + list(self.buffers()):
            if torch.is_floating_point(t):
                return t
        return torch.zeros(())

    # ------------------------------------------------------------------ base distribution
    def _checked_base(self, base: BaseDistribution) -> BaseDistribution:
        if not isinstance(base, BaseDistribution):
            raise TypeError(f"base must be a BaseDistribution, got {type(base).__name__}")
        if base.event_shape != self.latent_shape:
            raise ValueError(f"base distribution on {base.event_shape} does not fit the latent shape {self.latent_shape}")
        return base

    def with_base(self, base: str | BaseDistribution, *, components: int = 10) -> "Flow":
        """Replace the base distribution (in place; returns the flow): ``"normal"``, ``"diag_normal"``,
        ``"mixture"`` (``components`` Gaussians) or a :class:`BaseDistribution` on ``latent_shape``.
        Its parameters take the flow's dtype and device; ``.config`` records a named base, so that
        checkpoints rebuild it."""
        new = make_base(base, self.latent_shape, components=components) if isinstance(base, str) else base
        p = self._param()
        self.base = self._checked_base(new).to(device=p.device, dtype=p.dtype)
        if isinstance(base, str) and self.config is not None and dataclasses.is_dataclass(self.config):
            fields = {f.name for f in dataclasses.fields(self.config)}
            if {"base", "base_components"} <= fields:
                self.config = dataclasses.replace(self.config, base=base, base_components=components)
        return self

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _sample_shape(shape: SampleShape) -> tuple[int, ...]:
        """``n`` -> ``(n,)``; a sequence / ``torch.Size`` of positive ints as it is."""
        def index(d) -> int:
            if isinstance(d, (bool, float, Tensor)) or not hasattr(d, "__index__"):
                raise TypeError(f"sample shape must be an int or a sequence of ints (e.g. 64, (4,), "
                                f"torch.Size([2, 3])), got {shape!r}")
            return operator.index(d)

        dims = (index(shape),) if not isinstance(shape, (Sequence, torch.Size)) or isinstance(shape, str) \
            else tuple(index(d) for d in shape)
        if any(d < 1 for d in dims):
            raise ValueError(f"number of samples must be >= 1, got sample shape {dims}")
        return dims

    def _latent(self, m: int, temperature: float, generator: torch.Generator | None) -> Tensor:
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        p = self._param()
        return self.base.rsample(m, temperature, generator, dtype=p.dtype, device=p.device)  # (m, *latent)

    def _commit_actnorm(self) -> None:
        """Differentiable sampling uses uninitialised ActNorm layers as the identity; mark them
        initialised so that a later forward pass on data does not replace the trained map."""
        from ..transforms.normalization import ActNorm

        for m in self.modules():
            if isinstance(m, ActNorm):
                m.initialized.fill_(True)

    def rsample_and_log_prob(self, shape: SampleShape = (), temperature: float = 1.0,
                             generator: torch.Generator | None = None, *,
                             context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Differentiable samples ``x = F^-1(z)``, ``z ~ p_Z`` at ``temperature``, and the model's
        ``log p(x) = log p_Z(z) - log|det dF^-1/dz|`` (the ``T = 1`` density at ``x``, whatever
        ``temperature``); shapes ``(*shape, *event)`` and ``shape``. Gradients reach the transform
        and the base's parameters (reverse KL: ``(log_p - log_target(x)).mean()``). A conditional
        flow samples ``x ~ p(x | context)``: shapes ``(*shape, *batch, *event)`` and
        ``(*shape, *batch)`` for a context of shape ``(*batch, *context_shape)`` (module docstring)."""
        return self._draw(shape, temperature, generator, log_prob=True, context=context)

    def _sample_context(self, context: Tensor | None, m: int) -> tuple[tuple[int, ...], Tensor | None]:
        """``(batch shape, context rows (m * prod(batch), *context_shape))`` for ``m`` draws per context row."""
        cs = self.context_shape
        if cs is None:
            if context is not None:
                raise ContextError("this flow is not conditional: it takes no context")
            return (), None
        if context is None:
            if requires_context(self.transform):
                raise ContextError(f"this flow is conditional: give context= of shape ({', '.join(map(str, cs))}) "
                                   f"or (batch, {', '.join(map(str, cs))}) to sample")
            return (), None
        if not torch.is_tensor(context) or context.dim() < len(cs) or tuple(context.shape[context.dim() - len(cs):]) != cs:
            got = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ContextError(f"context must have shape (*batch, {', '.join(map(str, cs))}), got {got}")
        batch = tuple(context.shape[:context.dim() - len(cs)])
        rows = context.reshape(1, -1, *cs).expand(m, -1, *cs).reshape(-1, *cs)  # draw-major: (m * prod(batch), *cs)
        check_context(rows, cs, rows.shape[0], _module_dtype(self))
        return batch, rows

    def _draw(self, shape, temperature, generator, *, log_prob: bool, context=None) -> tuple[Tensor, Tensor | None]:
        dims = self._sample_shape(shape)
        batch, rows = self._sample_context(context, math.prod(dims))
        if self.training and torch.is_grad_enabled():
            self._commit_actnorm()
        z = self._latent(math.prod(dims) * math.prod(batch), temperature, generator)  # (m, *latent)
        x, inv_logdet = self.transform.inverse(z, rows)  # (m, *shape), (m,)
        out_dims = dims + batch
        log_p = (self.base.log_prob(z) - inv_logdet).reshape(out_dims) if log_prob else None
        return x.reshape(*out_dims, *self.shape), log_p

    def rsample(self, shape: SampleShape = (), temperature: float = 1.0,
                generator: torch.Generator | None = None, *, context: Tensor | None = None) -> Tensor:
        """Differentiable samples ``F^-1(z)``, shape ``(*shape, *event)`` (see :meth:`rsample_and_log_prob`)."""
        return self._draw(shape, temperature, generator, log_prob=False, context=context)[0]

    @torch.no_grad()
    def sample_and_log_prob(self, shape: SampleShape = (), temperature: float = 1.0,
                            generator: torch.Generator | None = None, *,
                            context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`rsample_and_log_prob` without gradients."""
        return self.rsample_and_log_prob(shape, temperature, generator, context=context)

    @torch.no_grad()
    def sample_latent(self, n: SampleShape, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> Tensor:
        """Latents ``z ~ p_Z`` at ``temperature``, shape ``(*n, *latent_shape)`` (``(n, *latent_shape)`` for an int)."""
        dims = self._sample_shape(n)
        return self._latent(math.prod(dims), temperature, generator).reshape(*dims, *self.latent_shape)

    @torch.no_grad()
    def sample(self, shape: SampleShape = (), temperature: float = 1.0,
               generator: torch.Generator | None = None, *, context: Tensor | None = None) -> Tensor:
        """Samples ``F^-1(z)``, ``z ~ p_Z`` at ``temperature`` (``N(0, T^2 I)`` for the standard normal),
        without gradients; shape ``(*shape, *event)``, e.g. ``sample(64)`` -> ``(64, *event)``; of a
        conditional flow ``(*shape, *batch, *event)`` for a context ``(*batch, *context_shape)``."""
        return self._draw(shape, temperature, generator, log_prob=False, context=context)[0]
