"""Conditional flows ``p(x | c)``: the cINN factory and context helpers.

A conditional invertible neural network (cINN; Ardizzone et al. 2019, "Guided image generation
with conditional invertible neural networks"; Kingma & Dhariwal 2018, sec. 5, class-conditional
Glow) is a flow whose couplings see a context ``c`` (:mod:`stableflows.transforms.conditional`)::

    log p(x | c) = log N(F(x; c); 0, I) + log|det dF/dx (x; c)|

:func:`cinn` is :func:`~stableflows.models.factories.glow`'s architecture (same options) with every
coupling conditional and, with ``split_prior``, the top prior class-conditional (Glow's ``ycond``).
:func:`make_conditional` does the same to any flow built of stableflows couplings (``realnvp()``,
``nice()``, ...). Class labels become contexts with :func:`one_hot`::

    flow = cinn(shape=(1, 8, 8), context_features=10)
    c = one_hot(y, 10)                           # (B, 10)
    flow.log_prob(x, context=c)                  # log p(x | y), (B,)
    flow.sample(8, context=one_hot(torch.arange(10), 10))   # (8, 10, 1, 8, 8): 8 per class
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..transforms.base import ContextError, validation_enabled
from ..transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling
from ..transforms.conditional import (ConditionalAdditiveCoupling, ConditionalAffineCoupling, ConditionalCoupling,
                                      ConditionalElementwiseAffine, ConditionalSplineCoupling, as_context_shape)
from ..transforms.multiscale import ElementwiseAffine
from ..transforms.nets import MLP, GlowCNN
from ..transforms.splines import SplineCoupling
from .factories import glow
from .flow import Flow
from .registry import register_model

__all__ = ["cinn", "make_conditional", "one_hot"]


def one_hot(y: Tensor, classes: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Labels ``y`` (integers, any shape) as one-hot contexts ``(*y.shape, classes)`` of ``dtype``
    (default: the default float dtype). Computed by comparison, without reading the device (unlike
    ``F.one_hot`` on a CPU); labels outside ``[0, classes)`` are a :class:`ContextError` when
    validation is on (one device read), else they give a zero row."""
    if not torch.is_tensor(y) or y.is_floating_point() or y.dtype == torch.bool:
        raise ContextError(f"labels must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ContextError(f"classes must be a positive int, got {classes!r}")
    if validation_enabled() and y.numel():
        lo, hi = torch.stack([y.min(), y.max()]).tolist()
        if lo < 0 or hi >= classes:
            raise ContextError(f"labels must lie in [0, {classes - 1}] for {classes} classes, got {lo}..{hi}")
    return (y[..., None] == torch.arange(classes, device=y.device)).to(dtype or torch.get_default_dtype())


def _hidden(net: nn.Module) -> int:
    """Hidden width of a conditioner built by :mod:`stableflows.transforms.nets`."""
    if isinstance(net, MLP):
        return net[0].out_features
    if isinstance(net, GlowCNN):
        return net.net[0].out_channels
    raise TypeError(f"cannot read the width of a conditioner of type {type(net).__name__}")


def _conditional_layer(layer: nn.Module, cs: tuple[int, ...], prior: bool) -> nn.Module | None:
    """The conditional counterpart of ``layer`` (fresh conditioner, same map family), or None to keep it."""
    if isinstance(layer, (ConditionalCoupling, ConditionalElementwiseAffine)):
        return None
    if isinstance(layer, Coupling):
        kw = dict(context_shape=cs, mask=layer.mask, parity=layer.parity, hidden=_hidden(layer.net))
        if type(layer) is AffineCoupling:
            return ConditionalAffineCoupling(layer.shape, scale=layer.scale, **kw)
        if type(layer) is AdditiveCoupling:
            return ConditionalAdditiveCoupling(layer.shape, **kw)
        if type(layer) is SplineCoupling:
            return ConditionalSplineCoupling(layer.shape, bins=layer.bins, bound=layer.bound, **kw)
        raise TypeError(f"no conditional counterpart of {type(layer).__name__}")
    if prior and type(layer) is ElementwiseAffine:
        return ConditionalElementwiseAffine(layer.shape, context_shape=cs)
    return None


def _replace(module: nn.Module, cs: tuple[int, ...], prior: bool) -> int:
    count = 0
    for name, child in list(module.named_children()):
        new = _conditional_layer(child, cs, prior)
        if new is None:
            count += _replace(child, cs, prior)
        else:
            module._modules[name] = new.to(next((p.device for p in child.parameters()), torch.device("cpu")))
            count += 1
    return count


def make_conditional(flow: Flow, *, context_shape: int | Sequence[int], prior: bool = True) -> Flow:
    """``flow`` with every coupling replaced by its conditional counterpart (same shape, mask,
    parity, width, scale / bins; a fresh zero-initialised conditioner that also sees the context)
    and, with ``prior``, every learned top prior (:class:`ElementwiseAffine`) by the
    class-conditional one. Returns a new :class:`Flow` sharing the other layers and the base."""
    cs = as_context_shape(context_shape, "make_conditional")
    if _replace(flow.transform, cs, prior) == 0:
        raise TypeError(f"{type(flow.transform).__name__} has no coupling layer to make conditional")
    return Flow(flow.transform, flow.shape, flow.latent_shape, config=flow.config, base=flow.base)


def cinn(*, shape: Sequence[int], context_features: int | None = None, context_shape: Sequence[int] | None = None,
         n_classes: int = 10, levels: int = 2, steps_per_level: int = 4, hidden: int = 64, coupling: str | None = None,
         scale: str = "sigmoid", permutation: str = "lu", mask: str = "channel", logit_alpha: float | None = None,
         split_prior: bool = True, actnorm: bool | None = None, split_condition: str = "kept",
         split_shuffle: bool = False, scale_floor: float | None = None, conditional_prior: bool = True,
         config=None) -> Flow:
    """A conditional Glow (cINN): :func:`~stableflows.models.factories.glow` with conditional
    couplings (and a class-conditional top prior), modelling ``p(x | c)``.

    Args:
        shape: event shape of the data, ``(C, H, W)`` or ``(D,)``.
        context_features: size ``k`` of a vector context ``(B, k)`` (None: ``n_classes``, i.e.
            one-hot class labels, :func:`one_hot`).
        context_shape: the context's event shape instead, e.g. ``(C_c, H_c, W_c)`` for an image
            context (pooled to each level's size); give one of ``context_features`` / ``context_shape``.
        n_classes: classes of a label context (used when neither of the two above is given).
        levels, steps_per_level, hidden, coupling, scale, permutation, mask, logit_alpha,
            split_prior, actnorm, split_condition, split_shuffle, scale_floor: as :func:`glow`
            (``coupling`` / ``logit_alpha`` None: glow's defaults).
        conditional_prior: make the top prior (present with ``split_prior``) class-conditional.
        config: the :class:`~stableflows.config.ModelConfig` stored on the flow (``build_model``).
    """
    if context_features is not None and context_shape is not None:
        raise ValueError("give context_features (a vector context) or context_shape, not both")
    if context_shape is None:
        k = n_classes if context_features is None else context_features
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"context_features must be a positive int, got {k!r}")
        context_shape = (k,)
    cs = as_context_shape(context_shape, "cinn")
    kw = dict(coupling=coupling, logit_alpha=logit_alpha)
    flow = glow(shape=shape, levels=levels, steps_per_level=steps_per_level, hidden=hidden, scale=scale,
                permutation=permutation, mask=mask, split_prior=split_prior, actnorm=actnorm,
                split_condition=split_condition, split_shuffle=split_shuffle, scale_floor=scale_floor, config=config,
                **{k: v for k, v in kw.items() if v is not None})
    return make_conditional(flow, context_shape=cs, prior=conditional_prior)


register_model("cinn", cinn)
