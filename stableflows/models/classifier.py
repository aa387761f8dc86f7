"""Invertible classifiers and hybrid models: an invertible feature map ``F`` with a head on its latent.

    logits = head(F(x)),        log p(x) = log N(F(x); 0, I) + log|det dF/dx|

* :func:`classifier` -- the invertible classifiers of Behrmann et al. 2020 ("Understanding and
  Mitigating Exploding Inverses", sec. 5 / poster "Supervised Learning w/ Memory-Efficient
  Gradients"): a Glow-like stack (squeeze, then [ActNorm, 1x1 conv or permutation, additive or affine
  coupling] steps) without factoring out, so the whole input reaches the head; trained with
  cross-entropy, optionally with memory-saving gradients and the FD / NF regularizers
  (:mod:`stableflows.regularizers`). ``log_prob`` is the NF regularizer's density.
* :func:`hybrid` -- the hybrid models of Chen et al. 2019 (Residual Flows, sec. 5.4; Nalisnick et al.
  2019): ``lambda log p(x) + log p(y|x)`` with residual blocks, coupling blocks, or coupling + 1x1 conv
  blocks; the classifier reads the latent, the density uses the flow and a standard normal.
  (The paper also taps features after every squeeze; here the head reads the final latent only,
  which keeps the whole network one memory-saving chain.)

Both return an :class:`InvertibleClassifier`. ``memory_saving=True`` makes ``.flow`` a
:class:`~stableflows.memory.MemorySavingCompose` that recomputes activations by inversion; the flag
can be flipped later (:func:`stableflows.memory.set_memory_saving`) and does not change the
``state_dict``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import DEFAULT_LOGIT_ALPHA
from ..memory import MemorySavingCompose, set_memory_saving
from ..transforms.base import ShapeError, Transform, check_finite, check_shape
from ..transforms.coupling import AdditiveCoupling, AffineCoupling
from ..transforms.elementwise import Logit
from ..transforms.linear import Invertible1x1
from ..transforms.lipschitz import RefreshOnEval
from ..transforms.normalization import ActNorm
from ..transforms.reshape import Squeeze
from .factories import PERMUTATIONS, flow_step
from .flow import Flow, standard_normal_log_prob
from .registry import register_model

__all__ = ["InvertibleClassifier", "classifier", "hybrid", "make_head", "HEADS", "BLOCKS"]

HEADS = ("linear", "mlp", "bn_relu", "conv")
BLOCKS = ("residual", "coupling", "coupling_1x1")
CLASSIFIER_COUPLINGS = ("affine", "additive")  # the couplings of the papers on invertible classifiers


class InvertibleClassifier(RefreshOnEval, nn.Module):
    """``.flow`` (a :class:`Transform`, data -> latent) and ``.head`` (latent -> logits).

    ``forward(x)`` returns logits ``(B, n_classes)``; :meth:`features` the flow's ``(z, logdet)``;
    :meth:`log_prob` the density with a standard-normal base; ``inverse``, ``sample`` and
    ``transform`` / ``latent_shape`` make it usable wherever a :class:`Flow` is read (audit, bpd).
    ``lam`` is the hybrid weight of ``log p(x)`` (0 for a pure classifier). With residual blocks,
    ``eval()`` re-converges their spectral norms for the current weights (:class:`RefreshOnEval`).
    """

    def __init__(self, flow: Transform, head: nn.Module, shape: Sequence[int], latent_shape: Sequence[int], *,
                 n_classes: int, lam: float = 0.0, config=None):
        super().__init__()
        self.flow = flow
        self.head = head
        self.shape = tuple(int(s) for s in shape)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if math.prod(self.shape) != math.prod(self.latent_shape):
            raise ValueError(f"latent shape {self.latent_shape} has another size than data shape {self.shape}")
        self.n_classes = int(n_classes)
        self.lam = float(lam)
        self.config = config

    @property
    def transform(self) -> Transform:
        return self.flow

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def memory_saving(self) -> bool:
        return isinstance(self.flow, MemorySavingCompose) and self.flow.enabled

    @memory_saving.setter
    def memory_saving(self, enabled: bool) -> None:
        set_memory_saving(self, enabled)

    def check_input(self, x: Tensor, what: str = "input") -> None:
        check_finite(x, what)
        check_shape(x, self.shape, what)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``, ``z`` of shape ``(B, *latent_shape)``."""
        self.check_input(x)
        return self.flow(x)

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.features(x)
        return self.head(z)  # (B, n_classes)

    def logits_and_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs from one pass through the flow: ``(logits (B, K), log p(x) (B,))``."""
        z, logdet = self.features(x)
        return self.head(z), standard_normal_log_prob(z) + logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(F(x); 0, I) + log|det dF/dx|`` per example, shape ``(B,)``."""
        z, logdet = self.features(x)
        return standard_normal_log_prob(z) + logdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(z)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self(x).argmax(dim=1)

    def as_flow(self) -> Flow:
        """A :class:`Flow` sharing this model's invertible part (for density tools and the audit)."""
        return Flow(self.flow, self.shape, self.latent_shape, config=self.config)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        return self.as_flow().sample(n, temperature, generator)


# ----------------------------------------------------------------------------- heads
def make_head(kind: str, latent_shape: Sequence[int], n_classes: int, *, hidden: int = 128) -> nn.Module:
    """Classification head on the latent ``(B, *latent_shape)``.

    ``linear``: flatten -> Linear. ``mlp``: flatten -> Linear(hidden) -> ReLU -> Linear.
    ``bn_relu``: flatten -> BatchNorm1d -> ReLU -> Linear (the head of the exploding-inverses
    authors' classifier code). ``conv`` (images): 3x3 conv -> ReLU -> global average pool -> Linear
    (the branch of Chen et al. 2019, app. E, without its ActNorm).
    """
    d = math.prod(latent_shape)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    if kind == "bn_relu":
        return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, n_classes))
    if kind == "conv":
        if len(latent_shape) != 3:
            raise ShapeError(f"head 'conv' needs an image latent (C, H, W), got {tuple(latent_shape)}")
        return nn.Sequential(nn.Conv2d(latent_shape[0], hidden, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, n_classes))
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


# ----------------------------------------------------------------------------- shared structure
def _check(shape, levels, steps_per_level, hidden, n_classes, logit_alpha) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ShapeError(f"shape must be (D,) for vectors or (C, H, W) for images, got {shape}")
    if len(shape) == 1 and shape[0] < 2:
        raise ShapeError(f"an invertible classifier on vectors needs D >= 2, got {shape}")
    if levels < 1 or steps_per_level < 1 or hidden < 1:
        raise ValueError(f"levels, steps_per_level and hidden must be >= 1, got {levels}, {steps_per_level}, {hidden}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not 0 <= logit_alpha < 0.5:
        raise ValueError(f"logit_alpha must lie in [0, 0.5), got {logit_alpha}")
    if len(shape) == 3 and ((shape[1] % 2 ** levels) or (shape[2] % 2 ** levels)):
        raise ShapeError(f"{levels} levels need height and width divisible by {2 ** levels}, got {shape}")
    return shape


def _stack(shape, levels, steps_per_level, step) -> tuple[list[Transform], tuple[int, ...]]:
    """Vectors: ``levels * steps_per_level`` steps. Images: per level a squeeze, then the steps
    (no factoring out). ``step(shape, k)`` returns the layers of step ``k``."""
    layers: list[Transform] = []
    if len(shape) == 1:
        for k in range(levels * steps_per_level):
            layers += step(shape, k)
        return layers, shape
    for _ in range(levels):
        layers.append(Squeeze(2))
        shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)  # (4C, H/2, W/2)
        for k in range(steps_per_level):
            layers += step(shape, k)
    return layers, shape


def _finish(layers, shape, latent, *, head, n_classes, head_hidden, logit_alpha, memory_saving, lam, config):
    pre: list[Transform] = [Logit(logit_alpha)] if logit_alpha > 0 else []
    flow = MemorySavingCompose(*(pre + layers), enabled=memory_saving)
    return InvertibleClassifier(flow, make_head(head, latent, n_classes, hidden=head_hidden), shape, latent,
                                n_classes=n_classes, lam=lam, config=config)


# ----------------------------------------------------------------------------- factories
CLASSIFIER_LOGIT_ALPHA = 0.0  # classifier(): no logit unless asked for (see its docstring)


def classifier(*, shape: Sequence[int], n_classes: int = 10, levels: int = 2, steps_per_level: int = 4,
               hidden: int = 64, coupling: str = "additive", scale: str = "sigmoid", permutation: str = "lu",
               mask: str = "channel", actnorm: bool | None = None, head: str = "linear", head_hidden: int = 128,
               logit_alpha: float | None = None, memory_saving: bool = False, config=None) -> InvertibleClassifier:
    """An invertible classifier: [Logit] -> per level (squeeze, ``steps_per_level`` x [ActNorm,
    1x1 conv / permutation, ``coupling``]) -> ``head`` on the latent.

    ``coupling`` is ``"additive"`` (globally bi-Lipschitz) or ``"affine"`` with scale
    parameterisation ``scale`` (only locally; Behrmann et al. 2020). For vectors ``shape=(D,)`` the
    stack has ``levels * steps_per_level`` steps and MLP conditioners.

    Args:
        shape: ``(C, H, W)`` (squeezed levels, CNN conditioners) or ``(D,)`` (MLP conditioners).
        n_classes: classes of the head.
        levels: squeeze levels of an image model (no factoring out: the head sees the whole latent).
        steps_per_level: flow steps per level.
        hidden: width of the conditioner networks.
        coupling: ``"additive"`` | ``"affine"``.
        scale: scale of affine couplings (:data:`stableflows.transforms.scales.SCALES`).
        permutation: channel mixing before each coupling (see :func:`stableflows.models.glow`).
        mask: ``"channel"`` | ``"checkerboard"``.
        actnorm: ActNorm at the start of every step (None: on).
        head: ``"linear"`` | ``"mlp"`` | ``"bn_relu"`` | ``"conv"`` (:func:`make_head`).
        head_hidden: hidden width of the ``mlp`` / ``conv`` heads.
        logit_alpha: logit pre-transform (0: none). None (not given): :data:`CLASSIFIER_LOGIT_ALPHA` = 0,
            unlike the density models' ``DEFAULT_LOGIT_ALPHA``: the classifiers of papers 000 / 001 read
            the data as they are, and the finite-difference regulariser evaluates ``F(x + eps d)``
            with ``eps = 0.1``, which leaves ``[0, 1]`` (and a logit's domain) for inputs near the
            borders; a classifier has no density to which the logit's log-det would contribute.
        memory_saving: recompute activations by inversion in the backward pass.
        config: the stored :class:`~stableflows.config.ModelConfig` (``build_model``).
    """
    if coupling not in CLASSIFIER_COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(CLASSIFIER_COUPLINGS)}")
    if permutation not in PERMUTATIONS:
        raise ValueError(f"unknown permutation {permutation!r}; choose one of {', '.join(PERMUTATIONS)}")
    logit_alpha = CLASSIFIER_LOGIT_ALPHA if logit_alpha is None else logit_alpha
    shape = _check(shape, levels, steps_per_level, hidden, n_classes, logit_alpha)
    actnorm = True if actnorm is None else actnorm

    def step(s, k):
        return flow_step(s, k, hidden=hidden, coupling=coupling, scale=scale, permutation=permutation, mask=mask,
                         actnorm=actnorm)

    layers, latent = _stack(shape, levels, steps_per_level, step)
    return _finish(layers, shape, latent, head=head, n_classes=n_classes, head_hidden=head_hidden,
                   logit_alpha=logit_alpha, memory_saving=memory_saving, lam=0.0, config=config)


HYBRID_DEFAULTS = {"coeff": 0.98, "activation": "lipswish", "estimator": "roulette", "n_power_iter": 5}


def hybrid(*, shape: Sequence[int], n_classes: int = 10, block: str = "residual", lam: float = 1.0,
           levels: int = 2, steps_per_level: int = 4, hidden: int = 64, coupling: str = "affine",
           scale: str = "sigmoid", actnorm: bool | None = None, head: str = "linear", head_hidden: int = 128,
           logit_alpha: float = DEFAULT_LOGIT_ALPHA, memory_saving: bool = False, coeff: float | None = None,
           activation: str | None = None, estimator: str | None = None, n_exact_terms: int = 2,
           n_series_terms: int = 5, n_power_iter: int | None = None, neumann_grad: bool = True,
           grad_in_forward: bool = True, norm: str = "spectral", config=None) -> InvertibleClassifier:
    """A hybrid model for ``lam * log p(x) + log p(y|x)`` (Chen et al. 2019, sec. 5.4, eq. 11).

    ``block``: ``"residual"`` ([ActNorm,] i-ResNet block with a Lipschitz-``coeff`` branch and the
    ``estimator`` log-det), ``"coupling"`` ([ActNorm,] ``coupling`` with alternating halves) or
    ``"coupling_1x1"`` ([ActNorm,] invertible 1x1 conv, coupling). ``lam`` is stored on the model and
    read by :class:`stableflows.train.supervised.HybridObjective`; use ``1 / D`` to weigh the
    density per dimension.

    Args:
        shape: ``(C, H, W)`` or ``(D,)``.
        n_classes: classes of the head.
        block: ``"residual"`` | ``"coupling"`` | ``"coupling_1x1"``.
        lam: weight of ``log p(x)`` (nats) next to ``log p(y|x)``; 0 is a classifier.
        levels, steps_per_level: squeeze levels (images, no factoring out) and blocks per level.
        hidden: width of the residual branches / coupling conditioners.
        coupling, scale: the coupling blocks' kind (``"affine"`` | ``"additive"``) and affine scale.
        actnorm: ActNorm in front of every block (None: on).
        head, head_hidden: the classification head (:func:`make_head`) and its hidden width.
        logit_alpha: logit pre-transform (0: none).
        memory_saving: recompute activations by inversion in the backward pass.
        coeff, activation, estimator, n_power_iter: residual blocks' Lipschitz bound, activation,
            log-det estimator and minimum power iterations; None: 0.98, ``lipswish``, ``roulette``, 5.
        n_exact_terms, n_series_terms, neumann_grad, grad_in_forward: estimator options
            (:func:`stableflows.estimators.make_estimator`).
        norm: ``spectral`` | ``inf`` | ``one`` normalisation of the residual branches.
        config: the stored :class:`~stableflows.config.ModelConfig` (``build_model``).
    """
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    shape = _check(shape, levels, steps_per_level, hidden, n_classes, logit_alpha)
    actnorm = True if actnorm is None else actnorm
    given = dict(coeff=coeff, activation=activation, estimator=estimator, n_power_iter=n_power_iter)
    coeff, activation, estimator, n_power_iter = (HYBRID_DEFAULTS[k] if v is None else v for k, v in given.items())
    if block == "residual":
        from ..transforms.residual import ResidualBlock, conv_lipschitz, mlp_lipschitz

        def step(s, k):
            if len(s) == 1:
                g = mlp_lipschitz(s[0], hidden, coeff=coeff, activation=activation, norm=norm,
                                  n_power_iter=n_power_iter)
            else:
                g = conv_lipschitz(s[0], hidden, coeff=coeff, activation=activation, norm=norm,
                                   input_shape=s[1:], n_power_iter=n_power_iter)
            res = ResidualBlock(g, estimator=estimator, n_exact_terms=n_exact_terms, n_series_terms=n_series_terms,
                                neumann_grad=neumann_grad, grad_in_forward=grad_in_forward)
            return ([ActNorm(s)] if actnorm else []) + [res]
    else:
        cls = AffineCoupling if coupling == "affine" else AdditiveCoupling
        if coupling not in CLASSIFIER_COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(CLASSIFIER_COUPLINGS)}")
        kw = {"scale": scale} if coupling == "affine" else {}

        def step(s, k):
            out: list[Transform] = [ActNorm(s)] if actnorm else []
            if block == "coupling_1x1":
                out.append(Invertible1x1(s, lu=True))
            out.append(cls(s, mask="channel", parity=k % 2, hidden=hidden, **kw))
            return out

    layers, latent = _stack(shape, levels, steps_per_level, step)
    return _finish(layers, shape, latent, head=head, n_classes=n_classes, head_hidden=head_hidden,
                   logit_alpha=logit_alpha, memory_saving=memory_saving, lam=lam, config=config)


register_model("classifier", classifier)
register_model("hybrid", hybrid)
