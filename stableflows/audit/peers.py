"""Adapters of the peer libraries' flows: the maps the audit measures (the library's own) and the
layers it localises through (:mod:`.layers`).

=============================  =====================================  ==================================
structure                      maps audited                           layers localised
=============================  =====================================  ==================================
normflows ``NormalizingFlow``  ``flows`` walked z <- x (``inverse``)    ``flows``; ``GlowBlock`` and
/ ``ClassCondFlow``            and x <- z (``forward``)                ``AffineCouplingBlock`` expanded
normflows ``MultiscaleFlow``   ``inverse_and_log_det`` /               ``transform``, ``flows.i.j``,
                               ``forward_and_log_det`` (latents of     ``merges.i`` (splits)
                               every level concatenated)
zuko ``Flow`` (unconditional)  ``flow().transform`` / ``.inv``         ``flow().transform.transforms``
FrEIA ``SequenceINN``          ``inn(x)`` / ``inn(z, rev=True)``       ``module_list``
FrEIA ``GraphINN``             the same; several output nodes          every node, by hooks on the
                               concatenated                            library's own graph walk
nflows ``Flow`` / Transform    ``_transform`` / ``.inverse``           ``CompositeTransform`` s,
                                                                       nested ones expanded
=============================  =====================================  ==================================

Conditional flows (a context ``c``) are not adapted: give a ``(forward, inverse)`` pair that closes
over the context. A layer walk that is not the library's own map is checked against it before it
is trusted (:meth:`~stableflows.audit.layers.ChainPath.verify`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from .layers import Chain, ChainPath, HookPath, Step, first_output, flat, spec_of, tensors, unflat

__all__ = ["PEER_LIBRARIES", "peer_of", "peer_invertible", "Packing"]

PEER_LIBRARIES = ("normflows", "zuko", "FrEIA", "nflows")


def peer_of(model) -> str | None:
    root = type(model).__module__.split(".")[0]
    return root if root in PEER_LIBRARIES else None


class Packing:
    """Several latent tensors (multi-scale outputs) as one ``(B, D)`` tensor: their flat
    concatenation, in the library's order. A single tensor passes unchanged."""

    def __init__(self):
        self.spec = None

    def pack(self, v) -> Tensor:
        if torch.is_tensor(v):
            return v
        self.spec = spec_of(v)
        return flat(v)

    def unpack(self, z: Tensor):
        return z if self.spec is None else unflat(z, self.spec)

    @property
    def packed(self) -> bool:
        return self.spec is not None


def _adapter():
    from . import adapters

    return adapters


# ----------------------------------------------------------------------------- normflows
_NF_SEQUENTIAL = ("GlowBlock", "AffineCouplingBlock")  # normflows composites whose flows run in order


def _nf_steps(flow: nn.Module, name: str) -> list[Step]:
    """Steps (data -> latent) of one normflows flow: ``flow.inverse`` maps towards the latent."""
    if type(flow).__name__ in _NF_SEQUENTIAL and isinstance(getattr(flow, "flows", None), nn.ModuleList):
        out = []
        for i in range(len(flow.flows) - 1, -1, -1):
            out += _nf_steps(flow.flows[i], f"{name}.flows.{i}")
        return out
    return [Step(name, type(flow).__name__, lambda v, f=flow: f.inverse(v)[0], lambda v, f=flow: f(v)[0],
                 module=flow)]


def _nf_sampler(bases: list, packing: Packing | None, dtype_of: Callable[[], torch.dtype], note: list[str]):
    """Latents at temperature T from normflows base distributions that honour ``temperature``:
    ``z_T = mode + T (z_1 - mode)`` (exact for location-scale bases, e.g. DiagGaussian, GlowBase)."""
    if not all(hasattr(q, "temperature") and callable(q) for q in bases):
        note.append("base distribution without a temperature: samples drawn from N(0, T^2 I) in the latent shape")
        return None

    def draw(q, n, t, seed):
        old = q.temperature
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                q.temperature = t
                return q(n)[0].detach()
        finally:
            q.temperature = old

    def sample(n, temperature, generator=None):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        zs = []
        for i, q in enumerate(bases):
            mode = draw(q, n, 1e-30, seed + i)
            one = draw(q, n, 1.0, seed + i)
            zs.append((mode.double() + temperature * (one.double() - mode.double())).to(dtype_of()))
        if packing is None:
            return zs[0]
        return flat(zs)
    return sample


def _normflows(nfm: nn.Module):
    A = _adapter()
    name = type(nfm).__name__
    if name == "MultiscaleFlow":
        return _nf_multiscale(nfm)
    if name.startswith("Conditional") or not isinstance(getattr(nfm, "flows", None), nn.ModuleList):
        raise A.AdapterError(f"normflows {name} is not supported (conditional or without a flows list): give a "
                             "(forward, inverse) pair")

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

    steps = []
    for i in range(len(nfm.flows) - 1, -1, -1):
        steps += _nf_steps(nfm.flows[i], f"flows.{i}")
    path = ChainPath(Chain(steps, "normflows flows (GlowBlock / AffineCouplingBlock expanded)"))
    note: list[str] = []
    q0 = getattr(nfm, "q0", None)
    sample = _nf_sampler([q0], None, lambda: A.module_dtype(nfm), note) if q0 is not None else None
    inv_ = A.Invertible(fwd, inv, logdet=lambda x: fwd(x)[1], module=nfm,
                        make_shadow=lambda dt: _normflows(copy.deepcopy(nfm).to(dt)), sample_latent=sample,
                        kind="normflows", layers=path)
    inv_.notes += note
    return inv_


def _nf_multiscale(nfm: nn.Module):
    """normflows ``MultiscaleFlow``: latents of every level (``z[0]`` deepest) concatenated."""
    A = _adapter()
    packing = Packing()

    def fwd(x):
        z, ld = nfm.inverse_and_log_det(x)
        return packing.pack(list(z)), ld

    def inv(z):
        return nfm.forward_and_log_det(list(packing.unpack(z)))[0]

    def split_step(merge, name):
        return Step(name, type(merge).__name__, lambda v, m=merge: list(m.inverse(v)[0]),
                    lambda v, m=merge: m(list(v))[0], split=True, module=merge)

    steps = []
    if nfm.transform is not None:
        t = nfm.transform
        steps.append(Step("transform", type(t).__name__, lambda v: t.inverse(v)[0], lambda v: t(v)[0], module=t))
    for i in range(len(nfm.q0) - 1, -1, -1):
        for j in range(len(nfm.flows[i]) - 1, -1, -1):
            steps += _nf_steps(nfm.flows[i][j], f"flows.{i}.{j}")
        if i > 0:
            steps.append(split_step(nfm.merges[i - 1], f"merges.{i - 1}"))
    chain = Chain(steps, "normflows MultiscaleFlow levels and splits")

    def unpack(z):
        return packing.unpack(z)
    path = ChainPath(chain, pack=lambda v: packing.pack(list(v)), unpack=unpack)
    note: list[str] = []
    sample = _nf_sampler(list(nfm.q0), packing, lambda: A.module_dtype(nfm), note)
    out = A.Invertible(fwd, inv, logdet=lambda x: fwd(x)[1], module=nfm,
                       make_shadow=lambda dt: _nf_multiscale(copy.deepcopy(nfm).to(dt)), sample_latent=sample,
                       kind="normflows", layers=path)
    out.notes += note
    return out


# ----------------------------------------------------------------------------- zuko
def _zuko_steps(t, name: str) -> list[Step]:
    inner = getattr(t, "transforms", None)
    if type(t).__name__ == "ComposedTransform" and inner is not None:
        out = []
        for i, s in enumerate(inner):
            out += _zuko_steps(s, f"{name}.{i}")
        return out
    return [Step(name, type(t).__name__, lambda v, t=t: t(v), lambda v, t=t: t.inv(v))]


def _zuko(flow: nn.Module):
    """zuko flows are lazy: ``flow()`` is the distribution, ``.transform`` maps data -> latent."""
    A = _adapter()
    try:
        dist = flow()
    except TypeError as e:
        raise A.AdapterError(f"calling the zuko {type(flow).__name__} without a context failed ({e}); a conditional "
                             "flow needs a (forward, inverse) pair that closes over its context") from e

    def fwd(x):
        return flow().transform(x)

    def inv(z):
        return flow().transform.inv(z)

    def logdet(x):
        return flow().transform.call_and_ladj(x)[1]

    def chain():
        lazy = getattr(flow.transform, "transforms", None)
        built = flow().transform
        inner = getattr(built, "transforms", None)
        if inner is None:
            return Chain([Step("transform", type(built).__name__, built, built.inv)], "zuko transform")
        steps = []
        for i, t in enumerate(inner):
            kind = type(lazy[i]).__name__ if lazy is not None and i < len(lazy) else None
            for s in _zuko_steps(t, f"transform.transforms.{i}"):
                if kind is not None and kind != s.kind:
                    s.kind = f"{kind}: {s.kind}"
                steps.append(s)
        return Chain(steps, "zuko flow().transform.transforms")

    def loc_scale():
        base = flow().base
        d = getattr(base, "base_dist", base)
        return d.loc, d.scale

    base = dist.base
    d = getattr(base, "base_dist", base)
    sample = A.gaussian_sampler(loc_scale, lambda: d.loc.dtype) if hasattr(d, "loc") and hasattr(d, "scale") else None
    return A.Invertible(fwd, inv, logdet=logdet, module=flow,
                        make_shadow=lambda dt: _zuko(copy.deepcopy(flow).to(dt)), sample_latent=sample, kind="zuko",
                        layers=ChainPath(chain))


# ----------------------------------------------------------------------------- FrEIA
def _freia_value(outs):
    """FrEIA modules return tuples of tensors: one tensor, or a list of several."""
    outs = tuple(outs)
    return outs[0] if len(outs) == 1 else list(outs)


def _freia_args(v):
    return tuple(tensors(v))


def _freia(inn: nn.Module):
    """FrEIA: ``inn(x) -> (z, log_jac_det)``, ``inn(z, rev=True) -> (x, log_jac_det)``; no base.
    Several output nodes (a ``GraphINN``) are concatenated into one latent."""
    A = _adapter()
    name = type(inn).__name__
    packing = Packing()
    graph = hasattr(inn, "node_list")
    if graph:
        n_in = len(inn.in_nodes)
        if n_in != 1:
            raise A.AdapterError(f"FrEIA GraphINN with {n_in} input nodes: the audit feeds one data tensor; give a "
                                 "(forward, inverse) pair")
        if inn.condition_nodes:
            raise A.AdapterError("conditional FrEIA GraphINN: give a (forward, inverse) pair that closes over the "
                                 "condition")
    elif any(c is not None for c in getattr(inn, "conditions", [])):
        raise A.AdapterError("conditional FrEIA SequenceINN: give a (forward, inverse) pair that closes over the "
                             "condition")

    def fwd(x):
        out, ljd = inn(x)
        return packing.pack(out if torch.is_tensor(out) else _freia_value(out)), ljd

    def inv(z):
        v = packing.unpack(z)
        out = inn(list(v) if isinstance(v, list) else v, rev=True)[0]
        return out if torch.is_tensor(out) else tuple(out)[0]

    if graph:
        nodes = []
        k = 0
        for node in inn.node_list:
            if node.module is None:
                continue
            default = node.name == hex(id(node))[-6:]
            nodes.append((f"module_list.{k}" + ("" if default else f" ({node.name})"), node.module))
            k += 1

        def run(v, rev):
            return inv(v) if rev else fwd(v)[0]
        path = HookPath(nodes, run, "FrEIA GraphINN nodes")
    else:
        steps = [Step(f"module_list.{i}", type(m).__name__,
                      lambda v, m=m: _freia_value(m(_freia_args(v), rev=False, jac=False)[0]),
                      lambda v, m=m: _freia_value(m(_freia_args(v), rev=True, jac=False)[0]), module=m)
                 for i, m in enumerate(inn.module_list)]
        path = ChainPath(Chain(steps, f"FrEIA {name} module_list"), pack=lambda v: packing.pack(v),
                         unpack=packing.unpack)
    return A.Invertible(lambda x: fwd(x)[0], inv, logdet=lambda x: fwd(x)[1], module=inn,
                        make_shadow=lambda dt: _freia(copy.deepcopy(inn).to(dt)), kind="FrEIA", layers=path)


# ----------------------------------------------------------------------------- nflows
def _nflows_steps(t: nn.Module, name: str) -> list[Step] | None:
    kind = type(t).__name__
    if kind == "MultiscaleCompositeTransform":
        return None
    inner = getattr(t, "_transforms", None)
    if kind == "CompositeTransform" and inner is not None:
        out = []
        for i, s in enumerate(inner):
            sub = _nflows_steps(s, f"{name}._transforms.{i}")
            if sub is None:
                return None
            out += sub
        return out
    return [Step(name, kind, lambda v, t=t: t(v)[0], lambda v, t=t: t.inverse(v)[0], module=t)]


def _nflows(flow: nn.Module):
    """nflows: a ``Flow`` holds ``_transform`` (data -> latent) and ``_distribution``; a bare nflows
    ``Transform`` is accepted too."""
    A = _adapter()
    t = getattr(flow, "_transform", flow)
    prefix = "_transform" if t is not flow else ""
    steps = _nflows_steps(t, prefix)
    path, note = None, ""
    if steps is None:
        note = "nflows MultiscaleCompositeTransform: its splits are not walked, no per-layer localisation"
    else:
        for s in steps:
            s.name = s.name.lstrip(".") or "transform"
        path = ChainPath(Chain(steps, "nflows CompositeTransform"))
    out = A.Invertible(lambda x: t(x)[0], lambda z: t.inverse(z)[0], logdet=lambda x: t(x)[1], module=flow,
                       make_shadow=lambda dt: _nflows(copy.deepcopy(flow).to(dt)), kind="nflows", layers=path,
                       layers_note=note)
    return out


def peer_invertible(model):
    """The :class:`~stableflows.audit.adapters.Invertible` of a flow of a peer library, or None."""
    lib = peer_of(model)
    if lib is None:
        return None
    return {"normflows": _normflows, "zuko": _zuko, "FrEIA": _freia, "nflows": _nflows}[lib](model)


def first(out):
    return first_output(out)
