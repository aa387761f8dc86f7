"""Per-example likelihood terms and their decomposition (Nalisnick et al. 2019, paper 004, Fig. 4).

For a flow ``z = F(x)`` with base distribution ``p_Z`` (the flow's own ``base``: ``N(0, I)`` by
default, or a learned diagonal Gaussian / mixture),

    log p(x) = log p_Z(F(x)) + log|det dF/dx| = log p(z) + logdet,

and the log-det is a sum over the elementary layers ``F = F_L o ... o F_1``,
``logdet = sum_l log|det dF_l/dh_{l-1}|`` (recorded per layer with
:func:`~stableflows.transforms.base.trace`). Multi-scale flows (RealNVP / Glow) factor out part of the
latent after each level; per *scale* ``k`` this module reports the log-det of the layers of level
``k`` (steps and split prior) and ``log p(z_k)`` of the latent entries factored out there, so that

    log p(x) = sum_k [log p(z_k) + logdet_k] + logdet_pre

(``pre``: layers outside the multi-scale body, e.g. the logit pre-transform). The split of
``log p(z)`` over scales needs a base that factorises over the latent entries (``N(0, I)``, a
diagonal Gaussian); for a mixture the per-scale ``log p(z_k)`` are NaN and ``log_pz_note`` says why
(the total ``log p(z)`` is exact either way).

Inputs a model refuses (:class:`~stableflows.transforms.base.InputOutsideDomain`, e.g. a logit
pre-transform outside [0, 1]) or on which it fails get NaN terms and a status -- never dropped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..models.distributions import BaseDistribution, StandardNormal
from ..transforms.base import InputOutsideDomain, trace
from ..transforms.multiscale import MultiScale

__all__ = ["latent_base", "latent_log_prob", "Terms", "likelihood_terms", "Decomposition", "decompose", "scale_layout",
           "ScaleInfo", "EVAL_BATCH", "STATUS_OK", "STATUS_DOMAIN", "STATUS_ERROR", "STATUS_NONFINITE"]

EVAL_BATCH = 256  # examples per forward pass
STATUS_OK, STATUS_DOMAIN, STATUS_ERROR, STATUS_NONFINITE = "ok", "outside_domain", "error", "nonfinite"


@dataclass
class Terms:
    """Per-example terms (float64 numpy, shape ``(N,)``); ``z`` is ``(N, D)`` when kept."""

    log_px: np.ndarray
    log_pz: np.ndarray
    logdet: np.ndarray
    status: np.ndarray  # (N,) str: ok | outside_domain | error | nonfinite
    messages: Counter = field(default_factory=Counter)
    z: np.ndarray | None = None

    @property
    def n_bad(self) -> dict:
        return {s: int(np.sum(self.status == s)) for s in (STATUS_DOMAIN, STATUS_ERROR, STATUS_NONFINITE)}


def _device_dtype(flow: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in list(flow.parameters()) + list(flow.buffers()) if torch.is_floating_point(t)), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _message(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def latent_base(flow: nn.Module, z: Tensor) -> BaseDistribution:
    """The flow's base distribution (``flow.base``), or ``N(0, I)`` on ``z``'s event shape for a flow
    without one (e.g. the classifiers)."""
    base = getattr(flow, "base", None)
    return StandardNormal(z.shape[1:]) if base is None else base


def latent_log_prob(flow: nn.Module, z: Tensor) -> Tensor:
    """``log p_Z(z)`` per example under :func:`latent_base`."""
    return latent_base(flow, z).log_prob(z)


def _entry_log_prob(flow: nn.Module, z: Tensor) -> Tensor | None:
    """Per-entry ``log p_Z`` ``(B, D)`` when the base factorises over the entries, else None."""
    e = latent_base(flow, z).entry_log_prob(z)
    return None if e is None else e.reshape(z.shape[0], -1)


@torch.no_grad()
def _terms_batch(flow, v: Tensor, keep_z: bool):
    z, logdet = flow.transform(v)
    lpz = latent_log_prob(flow, z)
    return lpz, logdet, (z.reshape(z.shape[0], -1) if keep_z else None)


@torch.no_grad()
def likelihood_terms(flow: nn.Module, v: Tensor, *, batch_size: int = EVAL_BATCH, keep_z: bool = False) -> Terms:
    """``log p(x)``, ``log p(z)`` and ``logdet`` of model-space inputs ``v`` ``(N, *shape)`` under ``flow``
    (eval mode, the flow's dtype and device). A batch that raises is redone example by example;
    an example that still raises gets NaN terms and status ``outside_domain`` or ``error``."""
    was_training = flow.training
    flow.eval()
    device, dtype = _device_dtype(flow)
    n = v.shape[0]
    lpz, ld = np.full(n, np.nan), np.full(n, np.nan)
    status = np.array([STATUS_OK] * n, dtype=object)
    zs = np.full((n, int(np.prod(v.shape[1:]))), np.nan) if keep_z else None
    messages: Counter = Counter()
    try:
        for s in range(0, n, batch_size):
            vb = v[s:s + batch_size].to(device=device, dtype=dtype)
            try:
                parts = [(_terms_batch(flow, vb, keep_z), slice(s, s + vb.shape[0]))]
            except Exception:  # noqa: BLE001 - attribute the failure to single examples
                parts = []
                for i in range(vb.shape[0]):
                    try:
                        parts.append((_terms_batch(flow, vb[i:i + 1], keep_z), slice(s + i, s + i + 1)))
                    except Exception as e:  # noqa: BLE001
                        status[s + i] = STATUS_DOMAIN if isinstance(e, InputOutsideDomain) else STATUS_ERROR
                        messages[_message(e)] += 1
            for (a, b, z), sl in parts:
                lpz[sl] = a.double().cpu().numpy()
                ld[sl] = b.double().cpu().numpy()
                if keep_z:
                    zs[sl] = z.double().cpu().numpy()
    finally:
        flow.train(was_training)
    lpx = lpz + ld
    bad = (status == STATUS_OK) & ~np.isfinite(lpx)
    status[bad] = STATUS_NONFINITE
    return Terms(log_px=lpx, log_pz=lpz, logdet=ld, status=status, messages=messages, z=zs)


# ----------------------------------------------------------------------------- scales
@dataclass
class ScaleInfo:
    """One scale of a multi-scale flow: its modules and the latent entries it factors out."""

    name: str  # "scale 1" (finest) ... or "pre" / "body"
    modules: set  # ids of the modules belonging to it
    latent: slice | None  # entries of the flat latent factored out at this scale


def _ids(*mods: nn.Module) -> set:
    return {id(m) for mod in mods for m in mod.modules()}


def scale_layout(flow: nn.Module) -> list[ScaleInfo]:
    """Scales of ``flow`` in order, finest first. A flow without :class:`MultiScale` has one scale
    ``"scale 1"`` holding every layer inside ``flow.transform`` and the whole latent; layers of a
    multi-scale flow outside the multi-scale body form the scale ``"pre"``."""
    chain: list[MultiScale] = []
    outer = next((m for m in flow.modules() if isinstance(m, MultiScale)), None)
    m = outer
    while isinstance(m, MultiScale):
        chain.append(m)
        m = m.inner
    d = int(np.prod(flow.latent_shape)) if hasattr(flow, "latent_shape") else None
    if not chain:
        return [ScaleInfo("scale 1", _ids(flow.transform), slice(0, d))]
    scales: list[ScaleInfo] = []
    end = d
    for k, ms in enumerate(chain):
        n_out = int(np.prod(ms.out_shape))
        scales.append(ScaleInfo(f"scale {k + 1}", _ids(ms.level, ms.prior), slice(end - n_out, end)))
        end -= n_out
    scales.append(ScaleInfo(f"scale {len(chain) + 1}", _ids(chain[-1].inner), slice(0, end)))
    body = _ids(outer)
    pre = {i for i in _ids(flow.transform) if i not in body}
    return [ScaleInfo("pre", pre, None)] + scales


@dataclass
class Decomposition:
    """``log p(x)`` of a batch split into latent and per-layer / per-scale log-det terms (float64 numpy)."""

    log_px: np.ndarray  # (N,)
    log_pz: np.ndarray  # (N,)
    logdet: np.ndarray  # (N,)
    layer_names: list  # elementary layers in forward call order
    layer_types: list
    layer_logdet: np.ndarray  # (L, N)
    scale_names: list
    scale_logdet: np.ndarray  # (S, N)
    scale_log_pz: np.ndarray  # (S, N); 0 for scales without latent entries ("pre"); NaN: see log_pz_note
    log_pz_note: str = ""  # why log p(z) is not split over scales (a base that does not factorise)

    def per_layer_mean(self) -> list[dict]:
        return [{"layer": n, "type": t, "logdet_mean": float(np.mean(r))}
                for n, t, r in zip(self.layer_names, self.layer_types, self.layer_logdet)]

    def per_scale_mean(self) -> list[dict]:
        return [{"scale": n, "logdet_mean": float(np.mean(a)), "log_pz_mean": float(np.mean(b))}
                for n, a, b in zip(self.scale_names, self.scale_logdet, self.scale_log_pz)]

    def summary(self) -> dict:
        """Per-layer and per-scale means (and the note when ``log p(z)`` is not split over scales)."""
        out = {"layers": self.per_layer_mean(), "scales": self.per_scale_mean()}
        if self.log_pz_note:
            out["log_pz_note"] = self.log_pz_note
        return out


@torch.no_grad()
def decompose(flow: nn.Module, v: Tensor) -> Decomposition:
    """Decompose ``log p(v)`` of one batch (model-space inputs the flow accepts) per layer and scale.

    Every elementary layer call is recorded with :func:`trace`; their log-dets add up to the flow's
    log-det, and ``log p(z)`` splits over the latent entries factored out at each scale.
    """
    was_training = flow.training
    flow.eval()
    device, dtype = _device_dtype(flow)
    v = v.to(device=device, dtype=dtype)
    modules = dict(flow.named_modules())
    try:
        with trace(flow) as tr:
            z, logdet = flow.transform(v)
        lpz = latent_log_prob(flow, z).double().cpu().numpy()
        entries = _entry_log_prob(flow, z)
    finally:
        flow.train(was_training)
    z = z.reshape(z.shape[0], -1)
    leaves = [r for r in tr.leaves() if r.direction == "forward"]
    names = [r.name for r in leaves]
    types = [type(modules[n]).__name__ if n in modules else n for n in names]
    layer_ld = np.stack([r.logdet.double().cpu().numpy() for r in leaves]) if leaves else np.zeros((0, v.shape[0]))
    layout = scale_layout(flow)
    s_ld = np.zeros((len(layout), v.shape[0]))
    s_lpz = np.zeros((len(layout), v.shape[0]))
    layer_scale = []
    for i, name in enumerate(names):
        mid = id(modules.get(name))
        k = next((j for j, s in enumerate(layout) if mid in s.modules), None)
        if k is None:
            raise RuntimeError(f"layer {name!r} belongs to no scale of the flow")
        s_ld[k] += layer_ld[i]
        layer_scale.append(k)
    note = "" if entries is not None else (f"the base distribution ({type(flow.base).__name__}) does not factorise "
                                           "over the latent entries: log p(z) is not split over scales")
    for k, s in enumerate(layout):
        if s.latent is not None:
            s_lpz[k] = entries[:, s.latent].sum(1).double().cpu().numpy() if entries is not None else np.nan
    used = [layer_scale.count(k) > 0 or s.latent is not None for k, s in enumerate(layout)]  # drop an empty "pre"
    layout = [s for s, u in zip(layout, used) if u]
    s_ld, s_lpz = s_ld[used], s_lpz[used]
    ld = logdet.double().cpu().numpy()
    return Decomposition(log_px=lpz + ld, log_pz=lpz, logdet=ld, layer_names=names, layer_types=types,
                         layer_logdet=layer_ld, scale_names=[s.name for s in layout], scale_logdet=s_ld,
                         scale_log_pz=s_lpz, log_pz_note=note)
