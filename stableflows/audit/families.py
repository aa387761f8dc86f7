"""Input families of the audit: where must the flow be invertible?

=====================  ==========================================================================
name                   inputs
=====================  ==========================================================================
``test`` / ``train``   held-out (training) data in model space (fixed dequantisation noise, seed 0)
``samples_t{T}``       latent codes ``z ~ N(0, T^2 I)``, audited through ``x = F^-1(z)``;
                       ``samples`` expands to ``T`` in :data:`TEMPERATURES` (1, 0.7 and 0, i.e. z = 0)
``clipped_c{c}``       ``x = F^-1(z)`` at temperature :data:`CLIP_TEMPERATURE` (z = 0) with every
                       intermediate activation of the inverse clamped to ``[-c, c]`` (Daniels,
                       paper 003 Fig. 1); ``clipped`` expands to ``c`` in :data:`CLIP_THRESHOLDS`
``uniform``, ``gaussian``, ``constant``, ``grayed``, ``inverted``, ``out_of_range``,
``natural_patches``    the OOD families of :func:`stableflows.data.ood.ood_family`
                       (``noise`` = uniform + gaussian, ``patches`` = natural_patches,
                       ``ood`` = all seven; ``grayed_mid`` and ``digits28`` (28x28) are named only)
=====================  ==========================================================================

``all`` is every family but ``train``. A latent family's generated ``x`` is then round-tripped like
data; a generated ``x`` that is non-finite, or that the forward refuses, is a failure of the model
(its own output cannot be mapped back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError
from ..data.ood import EXTRA_FAMILIES, FAMILY_DESCRIPTIONS

__all__ = ["FamilyInput", "expand_families", "build_family", "TEMPERATURES", "CLIP_THRESHOLDS",
           "CLIP_TEMPERATURE", "DEFAULT_FAMILIES", "OOD_NAMES"]

TEMPERATURES = (1.0, 0.7, 0.0)
CLIP_THRESHOLDS = (1000.0, 100.0, 10.0)
CLIP_TEMPERATURE = 0.0  # paper 003 samples z = 0 with clipped activations
OOD_NAMES = ("uniform", "gaussian", "constant", "grayed", "inverted", "out_of_range", "natural_patches") + EXTRA_FAMILIES
DEFAULT_FAMILIES = ("test", "samples", "clipped", "noise", "constant", "grayed", "inverted", "out_of_range",
                    "patches")
_ALIASES = {"noise": ("uniform", "gaussian"), "patches": ("natural_patches",), "ood": tuple(n for n in OOD_NAMES if n not in EXTRA_FAMILIES)}


def _fmt(v: float) -> str:
    return f"{v:g}"


def expand_families(spec, *, temperatures=TEMPERATURES, clip_thresholds=CLIP_THRESHOLDS) -> list[str]:
    """Family names from a list or a comma-separated string of names and groups, in order, unique."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for name in spec:
        if name == "all":
            items = expand_families(DEFAULT_FAMILIES, temperatures=temperatures, clip_thresholds=clip_thresholds)
        elif name == "samples":
            items = [f"samples_t{_fmt(t)}" for t in temperatures]
        elif name == "clipped":
            items = [f"clipped_c{_fmt(c)}" for c in clip_thresholds]
        elif name in _ALIASES:
            items = list(_ALIASES[name])
        elif name in ("test", "train") or name in OOD_NAMES or _parse_latent(name) is not None:
            items = [name]
        else:
            raise ConfigError(
                f"unknown audit family {name!r}; known: test, train, samples, samples_t<T>, clipped, clipped_c<c>, "
                f"noise, patches, ood, all, {', '.join(OOD_NAMES)}")
        out += [i for i in items if i not in out]
    return out


def _parse_latent(name: str) -> tuple[str, float] | None:
    for prefix, kind in (("samples_t", "samples"), ("clipped_c", "clipped")):
        if name.startswith(prefix):
            try:
                v = float(name[len(prefix):])
            except ValueError:
                return None
            if v < 0 or (kind == "clipped" and v == 0):
                return None
            return kind, v
    return None


@dataclass
class FamilyInput:
    """The inputs of one family: data ``x`` (model space) or latent codes ``z``."""

    name: str
    kind: str  # "data" or "latent"
    description: str
    x: Tensor | None = None
    z: Tensor | None = None
    temperature: float | None = None
    clip: float | None = None

    @property
    def size(self) -> int:
        return int((self.x if self.x is not None else self.z).shape[0])

    def head(self, k: int) -> "FamilyInput":
        """The first ``k`` examples (a time budget's cut)."""
        return self.part(0, k)

    def part(self, a: int, b: int) -> "FamilyInput":
        """Examples ``a`` to ``b - 1``."""
        return FamilyInput(self.name, self.kind, self.description, x=None if self.x is None else self.x[a:b],
                           z=None if self.z is None else self.z[a:b], temperature=self.temperature, clip=self.clip)


LATENT_N = 256  # samples per latent family when the audit has no data to size them


def build_family(name: str, model, *, test: Tensor, train: Tensor | None = None, levels: int | None = None,
                 n: int | None = None, seed: int = 0) -> FamilyInput:
    """The inputs of family ``name`` for ``model`` (an :class:`~stableflows.audit.adapters.Invertible`
    whose ``latent_shape`` is known); ``test`` (and ``train``) are model-space data. ``n`` caps
    the number of examples (default: as many as ``test``)."""
    n_ref = test.shape[0] if test is not None else (LATENT_N if n is None else int(n))
    n = n_ref if n is None else int(n)
    if name == "test":
        return FamilyInput(name, "data", "held-out data", x=test[:n])
    if name == "train":
        if train is None:
            raise ConfigError("family 'train' needs training data")
        return FamilyInput(name, "data", "training data", x=train[:n])
    latent = _parse_latent(name)
    if latent is not None:
        kind, v = latent
        g = torch.Generator().manual_seed(seed)
        if kind == "samples":
            m = 1 if v == 0 else n  # z = 0: every sample is the same
            return FamilyInput(name, "latent", f"samples F^-1(z), z ~ N(0, {_fmt(v)}^2 I)",
                               z=model.sample_latent(m, v, g), temperature=v)
        t = CLIP_TEMPERATURE
        m = 1 if t == 0 else n
        return FamilyInput(name, "latent", f"samples at T={_fmt(t)} with inverse activations clipped to "
                           f"[-{_fmt(v)}, {_fmt(v)}]", z=model.sample_latent(m, t, g), temperature=t, clip=v)
    if name in OOD_NAMES:
        from ..data.ood import ood_family

        m = min(n, n_ref)
        x = ood_family(name, test, m, seed=seed, levels=levels)
        return FamilyInput(name, "data", _OOD_DESCRIPTIONS.get(name) or FAMILY_DESCRIPTIONS[name], x=x.to(test.dtype))
    raise ConfigError(f"unknown audit family {name!r}")


_OOD_DESCRIPTIONS = {
    "uniform": "uniform noise U[0,1)",
    "gaussian": "Gaussian noise N(0.5, 0.25^2), not clamped",
    "constant": "constant images",
    "grayed": "contrast halved toward the mean",
    "inverted": "inverted images 1 - v",
    "out_of_range": "data scaled x2 about 0.5 (beyond [0, 1])",
    "natural_patches": "natural-image patches",
}
