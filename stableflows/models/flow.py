"""A normalizing flow: a :class:`~stableflows.transforms.base.Transform` on top of a standard normal.

    log p(x) = log N(F(x); 0, I) + log|det dF/dx|

Sampling draws ``z ~ N(0, T^2 I)`` at temperature ``T`` and returns ``F^-1(z)`` (Glow, Kingma &
Dhariwal 2018, sec. 5: reduced-temperature sampling).

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
from typing import Sequence

import torch
from torch import Tensor, nn

from ..transforms.base import (LOG_2PI, Transform, _module_dtype, check_finite, check_shape, check_tensor, run_checked,
                               stats_wanted, sum_except_batch)

__all__ = ["Flow", "standard_normal_log_prob"]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over every non-batch dimension, shape ``(B,)``."""
    return -0.5 * sum_except_batch(z.pow(2)) - 0.5 * z[0].numel() * LOG_2PI


class Flow(nn.Module):
    """Transform + standard-normal base distribution; follows the layer contract too.

    Args:
        transform: the bijection data -> latent.
        shape: event shape of the data, e.g. ``(1, 8, 8)`` or ``(64,)``.
        latent_shape: event shape of ``transform(x)[0]`` (defaults to ``shape``).
        config: the :class:`~stableflows.config.ModelConfig` it was built from, or None.
    """

    def __init__(self, transform: Transform, shape: Sequence[int], latent_shape: Sequence[int] | None = None,
                 config=None):
        super().__init__()
        self.transform = transform
        self.shape = tuple(int(s) for s in shape)
        self.latent_shape = tuple(int(s) for s in (latent_shape if latent_shape is not None else shape))
        if math.prod(self.shape) != math.prod(self.latent_shape):
            raise ValueError(f"latent shape {self.latent_shape} has another size than data shape {self.shape}")
        self.config = config

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return run_checked(lambda v: self.check_input(v, finite=False), self._entry("forward"), x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return run_checked(self.check_latent, self._entry("inverse"), z)

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

    def check_input(self, x: Tensor, what: str = "input", *, finite: bool = True) -> None:
        """Raise a named error for a non-float tensor or one of another dtype than the model's, an
        empty batch, a wrong shape, NaN/inf entries (``finite``: the density's entry; ``forward``
        propagates them), or values outside the first layer's domain."""
        check_tensor(x, what, _module_dtype(self))
        check_shape(x, self.shape, what)
        if finite:
            check_finite(x, what)
        self.transform._check_domain(x, "forward")

    def check_latent(self, z: Tensor, what: str = "latent") -> None:
        """Named errors for latent codes: a floating tensor of the model's dtype, a non-empty batch
        of shape ``(B, *latent_shape)`` (NaN / inf propagate, unless the last layer refuses them)."""
        check_tensor(z, what, _module_dtype(self))
        check_shape(z, self.latent_shape, what)
        self.transform._check_domain(z, "inverse")

    def _log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self.transform(x)
        return standard_normal_log_prob(z) + logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per example, shape ``(B,)``."""
        return run_checked(self.check_input, self._entry("log_prob"), x)

    def log_prob_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(z), log|det dz/dx|)`` per example; their sum is ``log_prob(x)``."""
        z, logdet = run_checked(self.check_input, self.transform, x)
        return standard_normal_log_prob(z), logdet

    def _param(self) -> Tensor:
        for t in list(self.parameters()) + list(self.buffers()):
            if torch.is_floating_point(t):
                return t
        return torch.zeros(())

    @torch.no_grad()
    def sample_latent(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        p = self._param()
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=p.dtype,
                        device=p.device if generator is None else generator.device)
        return (z * temperature).to(p.device)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``F^-1(z)``, ``z ~ N(0, temperature^2 I)``; shape ``(n, *shape)``."""
        x, _ = self.transform.inverse(self.sample_latent(n, temperature, generator))
        return x
