"""Base distributions ``p_Z`` of a :class:`~stableflows.models.flow.Flow` on its latent event shape.

    log p(x) = log p_Z(F(x)) + log|det dF/dx|

* :class:`StandardNormal` -- ``N(0, I)``, no parameters (the default; Dinh et al. 2017, Kingma &
  Dhariwal 2018).
* :class:`DiagNormal` -- ``N(mu, diag(sigma^2))`` with learned ``mu`` and ``log sigma`` per latent
  entry, initialised at ``N(0, I)`` (normflows' trainable ``DiagGaussian``)::

      log p(z) = sum_d [ -(z_d - mu_d)^2 / (2 sigma_d^2) - log sigma_d - log(2 pi) / 2 ]

* :class:`GaussianMixture` -- ``sum_k w_k N(mu_k, diag(sigma_k^2))`` with learned logits of the
  weights ``w = softmax(logits)``, means and log-scales (Izmailov et al. 2020, "Semi-supervised
  learning with normalizing flows", use one as a flow's base)::

      log p(z) = logsumexp_k [ log w_k + log N(z; mu_k, diag(sigma_k^2)) ]

  The means start at ``N(0, I)`` draws (distinct components: identical ones would get identical
  gradients for ever), the scales at 1, the weights equal.

Sampling at temperature ``T`` (Glow, sec. 5): ``z = T eps`` (standard normal), ``mu + T sigma eps``
(diagonal), ``mu_k + T sigma_k eps`` with ``k ~ Cat(w)`` (mixture); ``eps ~ N(0, I)``. ``rsample``
is differentiable in ``mu``, ``sigma`` (and whatever follows); the mixture's discrete choice of
``k`` is not, so the weights get no pathwise gradient from ``rsample`` (they are learned through
``log_prob``, e.g. maximum likelihood or the ``log q`` term of a reverse KL).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..transforms.base import LOG_2PI, sum_except_batch

__all__ = ["BaseDistribution", "StandardNormal", "DiagNormal", "GaussianMixture", "BASES", "make_base"]


class BaseDistribution(nn.Module):
    """A distribution on ``event_shape``: ``log_prob(z)`` ``(B,)`` for ``z`` ``(B, *event_shape)``,
    ``rsample(n, temperature, generator, dtype=, device=)`` ``(n, *event_shape)``, differentiable."""

    kind = ""

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def entry_log_prob(self, z: Tensor) -> Tensor | None:
        """Per-entry log densities ``(B, *event_shape)`` summing to ``log_prob(z)`` when the
        distribution factorises over the latent entries; None when it does not (a mixture)."""
        return None

    def rsample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, *,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        raise NotImplementedError

    def _noise(self, shape: tuple[int, ...], generator, dtype, device) -> Tensor:
        """``eps ~ N(0, I)`` of ``shape`` from ``generator`` (on its device), moved to ``device``."""
        p = next(iter(self.parameters()), None)
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.get_default_dtype())
        device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        eps = torch.randn(shape, generator=generator, dtype=dtype,
                          device=device if generator is None else generator.device)
        return eps.to(device)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


class StandardNormal(BaseDistribution):
    """``N(0, I)`` on ``event_shape``; no parameters (so no entries in a ``state_dict``)."""

    kind = "normal"

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * sum_except_batch(z.pow(2)) - 0.5 * self.dim * LOG_2PI

    def entry_log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.pow(2) - 0.5 * LOG_2PI

    def rsample(self, n, temperature=1.0, generator=None, *, dtype=None, device=None):
        return self._noise((n, *self.event_shape), generator, dtype, device) * temperature


class DiagNormal(BaseDistribution):
    """``N(loc, diag(exp(log_scale)^2))`` with learned ``loc`` and ``log_scale`` of ``event_shape``."""

    kind = "diag_normal"

    def __init__(self, event_shape: Sequence[int]):
        super().__init__(event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def log_prob(self, z: Tensor) -> Tensor:
        u = (z - self.loc) * torch.exp(-self.log_scale)
        return sum_except_batch(-0.5 * u.pow(2) - self.log_scale) - 0.5 * self.dim * LOG_2PI

    def entry_log_prob(self, z: Tensor) -> Tensor:
        u = (z - self.loc) * torch.exp(-self.log_scale)
        return -0.5 * u.pow(2) - self.log_scale - 0.5 * LOG_2PI

    def rsample(self, n, temperature=1.0, generator=None, *, dtype=None, device=None):
        eps = self._noise((n, *self.event_shape), generator, dtype, device)
        return self.loc + temperature * torch.exp(self.log_scale) * eps


class GaussianMixture(BaseDistribution):
    """``K`` diagonal Gaussians on ``event_shape`` with learned weights (``logits`` ``(K,)``), means
    and log-scales (``(K, *event_shape)``)."""

    kind = "mixture"

    def __init__(self, event_shape: Sequence[int], components: int = 10):
        super().__init__(event_shape)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ConfigError(f"a Gaussian mixture needs an integer number of components >= 1, got {components!r}")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(torch.randn(components, *self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(components, *self.event_shape))

    def component_log_prob(self, z: Tensor) -> Tensor:
        """``log w_k + log N(z; mu_k, sigma_k)`` per example and component, shape ``(B, K)``."""
        u = (z.unsqueeze(1) - self.loc) * torch.exp(-self.log_scale)  # (B, K, *event)
        lp = (-0.5 * u.pow(2) - self.log_scale).flatten(2).sum(-1) - 0.5 * self.dim * LOG_2PI  # (B, K)
        return lp + torch.log_softmax(self.logits, dim=0)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(z), dim=1)

    def rsample(self, n, temperature=1.0, generator=None, *, dtype=None, device=None):
        eps = self._noise((n, *self.event_shape), generator, dtype, device)
        w = torch.softmax(self.logits.detach(), dim=0)
        k = torch.multinomial(w.to(eps.device if generator is None else generator.device), n, replacement=True,
                              generator=generator).to(self.loc.device)  # (n,)
        return self.loc[k] + temperature * torch.exp(self.log_scale[k]) * eps

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, components={self.components}"


BASES = {"normal": StandardNormal, "diag_normal": DiagNormal, "mixture": GaussianMixture}


def make_base(kind: str, event_shape: Sequence[int], *, components: int = 10) -> BaseDistribution:
    """The base distribution ``kind`` (``normal`` | ``diag_normal`` | ``mixture``) on ``event_shape``;
    ``components`` is read by ``mixture`` only."""
    if kind not in BASES:
        raise ConfigError(f"unknown base distribution {kind!r}; choose one of {', '.join(BASES)}")
    if kind == "mixture":
        return GaussianMixture(event_shape, components)
    return BASES[kind](event_shape)
