"""Small adapters that build the models users would pick in other libraries, on a benchmark task.

Each builder ``(hidden, preprocess, shape=EVENT_SHAPE) -> Contender`` wraps one library's own layers in
the same pipeline as stableflows' models: ``v`` (model-space images ``(B, *shape)``: digits
``(1, 8, 8)``, Fashion-MNIST ``(1, 28, 28)``) -> the shared
:class:`~stableflows.bench.contender.Preprocess` (stableflows' ``Logit(LOGIT_ALPHA)`` = ``Logit(0.01)`` by default, its log-det
counted) -> the library's flow -> a standard-normal base. Only the library's public classes are used;
conventions that differ between libraries (PEERS.md) are handled here:

* **normflows** writes flows generatively (``x = flows[-1](... flows[0](z))``): data -> latent walks
  ``flows`` backwards through ``.inverse`` and sums those log-dets; latent -> data walks forwards.
  Its base is ``DiagGaussian(trainable=False)`` (standard normal). Its residual flow needs
  ``normflows.utils.update_lipschitz`` after every optimizer step (``after_step``).
* **zuko** flows are lazy: ``flow()`` is the distribution; ``flow().transform`` maps data -> latent,
  ``.inv`` back. NSF is fully autoregressive (zuko's default).
* **FrEIA**: ``inn(x) -> (z, log_jac_det)``, ``inn(z, rev=True)``; no base of its own (standard
  normal added here).
* **nflows**: ``flow.log_prob``; the inverse through ``flow._transform.inverse`` (no public one).

Depths follow stableflows' reference Glow (8 steps, two of them per squeeze level there); widths
are matched to a parameter count by the harness (:func:`~stableflows.bench.contender.match_hidden`).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import Tensor, nn

from .contender import EVENT_SHAPE, Contender, Preprocess, standard_normal_logp

__all__ = ["PEERS", "available", "library_available", "LIBRARIES", "N_STEPS", "COEFF",
           "NORMFLOWS_LIPSCHITZ_ITERS", "AFFINE_CLAMP"]

LIBRARIES = {"normflows": "normflows", "zuko": "zuko", "FrEIA": "FrEIA", "nflows": "nflows"}  # name -> module
N_STEPS = 8  # coupling / residual steps of every peer model (stableflows' Glow: 2 levels x 4 steps)
N_AUTOREGRESSIVE = 5  # MAF transforms (each one is a full MADE network)
N_SPLINE = 3  # NSF transforms (zuko's default)
COEFF = 0.98  # Lipschitz bound of residual branches (Residual Flows; stableflows' default)
NORMFLOWS_LIPSCHITZ_ITERS = 50  # power iterations after each step, as in normflows' residual-flow example
AFFINE_CLAMP = 2.0  # FrEIA's soft clamp of log-scales (its default)


def library_available(name: str) -> bool:
    try:
        importlib.import_module(LIBRARIES[name])
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False


def _zero_last(seq: nn.Sequential) -> nn.Sequential:
    last = [m for m in seq if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return seq


def _conv_net(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """Glow's conditioner 3x3 -> 1x1 -> 3x3 with ReLU, last layer zero (each block starts as identity)."""
    return _zero_last(nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                    nn.Conv2d(hidden, c_out, 3, padding=1)))


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    return _zero_last(nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, d_out)))


class _Pipeline(nn.Module):
    """``pre`` (shared pre-transform) followed by a library's flow ``body`` (its input reshaped to
    ``event``); ``layers`` lists the three for the audit's layer protocol (per-layer localisation)."""

    def __init__(self, pre: Preprocess, body: nn.Module, event: tuple[int, ...] = EVENT_SHAPE,
                 shape: tuple[int, ...] = EVENT_SHAPE):
        super().__init__()
        self.pre = pre
        self.body = body
        self.event, self.shape = tuple(event), tuple(shape)

    @property
    def layers(self) -> list:
        return [self.pre, _Reshape(self.shape, self.event), self.body]


class _Reshape(nn.Module):
    def __init__(self, shape_in: tuple[int, ...], shape_out: tuple[int, ...]):
        super().__init__()
        self.shape_in, self.shape_out = shape_in, shape_out

    def forward(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.shape_out)

    def inverse(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.shape_in)


def _contender(name: str, library: str, family: str, body: nn.Module, preprocess: str, hidden: int, *,
               to_latent: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
               to_data: Callable[[nn.Module, Tensor], Tensor], event: tuple[int, ...], shape: tuple[int, ...],
               description: str, after_step: Callable[[nn.Module], None] | None = None) -> Contender:
    """Assemble a peer contender from ``to_latent(body, y) -> (z, log|det dz/dy|)`` and ``to_data``,
    where ``y`` is the pre-transformed input ``(B, *shape)`` reshaped to the library's ``event`` shape."""
    module = _Pipeline(Preprocess(preprocess), body, event, shape)

    def latent(m: nn.Module, v: Tensor) -> tuple[Tensor, Tensor]:
        y, ld_pre = m.pre(v)
        z, ld = to_latent(m.body, y.reshape(y.shape[0], *event))
        return z, ld_pre + ld

    def log_prob(m: nn.Module, v: Tensor) -> Tensor:
        z, ld = latent(m, v)
        return standard_normal_logp(z) + ld

    def forward(m: nn.Module, v: Tensor) -> Tensor:
        return latent(m, v)[0]

    def inverse(m: nn.Module, z: Tensor) -> Tensor:
        y = to_data(m.body, z)
        return m.pre.inverse(y.reshape(y.shape[0], *shape))

    step = (lambda m: after_step(m.body)) if after_step is not None else None
    return Contender(name=name, library=library, family=family, module=module, log_prob=log_prob,
                     forward=forward, inverse=inverse, hidden=hidden, after_step=step, description=description)


# ----------------------------------------------------------------------------- normflows
def _normflows_walk(nfm: nn.Module) -> tuple[Callable, Callable]:
    def to_latent(m, y):
        ld = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        for f in reversed(m.flows):
            y, d = f.inverse(y)
            ld = ld + d
        return y, ld

    def to_data(m, z):
        for f in m.flows:
            z, _ = f(z)
        return z

    return to_latent, to_data


def _squeezed(shape: tuple[int, ...]) -> tuple[int, int, int]:
    c, hh, ww = shape
    return 4 * c, hh // 2, ww // 2  # after one squeeze: (1, 8, 8) -> (4, 4, 4), (1, 28, 28) -> (4, 14, 14)


def normflows_glow(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
    import normflows as nf

    h = hidden or 112
    c, hh, ww = _squeezed(shape)
    flows = [nf.flows.GlowBlock(c, h, split_mode="channel", scale=True, scale_map="sigmoid") for _ in range(N_STEPS)]
    flows.append(nf.flows.Squeeze())  # generative order: the squeeze is the last map z -> x
    body = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian((c, hh, ww), trainable=False), flows=flows)
    to_latent, to_data = _normflows_walk(body)
    return _contender("normflows-glow", "normflows", "glow-like", body, preprocess, h, to_latent=to_latent,
                      to_data=to_data, event=shape, shape=shape,
                      description=f"squeeze + {N_STEPS} GlowBlock (affine coupling sigmoid, LU 1x1 conv, ActNorm)")


def normflows_realnvp(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
    import normflows as nf

    h, D = hidden or 128, math.prod(shape)
    b = (torch.arange(D) % 2).float()
    flows = []
    for k in range(N_STEPS):
        mask = b if k % 2 == 0 else 1 - b
        s = nf.nets.MLP([D, h, h, D], init_zeros=True)
        t = nf.nets.MLP([D, h, h, D], init_zeros=True)
        flows += [nf.flows.MaskedAffineFlow(mask, t, s), nf.flows.ActNorm(D)]
    body = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(D, trainable=False), flows=flows)
    to_latent, to_data = _normflows_walk(body)
    return _contender("normflows-realnvp", "normflows", "realnvp-like", body, preprocess, h, to_latent=to_latent,
                      to_data=to_data, event=(D,), shape=shape,
                      description=f"{N_STEPS} x [MaskedAffineFlow (MLP s, t), ActNorm] on vectors")


def normflows_resflow(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
    import normflows as nf

    h, D = hidden or 256, math.prod(shape)
    flows = []
    for _ in range(N_STEPS):
        net = nf.nets.LipschitzMLP([D, h, h, D], init_zeros=True, lipschitz_const=COEFF)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(D)]
    body = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(D, trainable=False), flows=flows)
    to_latent, to_data = _normflows_walk(body)

    def after_step(m: nn.Module) -> None:
        nf.utils.update_lipschitz(m, NORMFLOWS_LIPSCHITZ_ITERS)

    return _contender("normflows-resflow", "normflows", "residual", body, preprocess, h, to_latent=to_latent,
                      to_data=to_data, event=(D,), shape=shape, after_step=after_step,
                      description=f"{N_STEPS} x [Residual(LipschitzMLP c={COEFF}), ActNorm] on vectors "
                                  "(the published residual-flow code)")


# ----------------------------------------------------------------------------- zuko
def _zuko(name: str, family: str, make: Callable[[int, int], nn.Module], default_hidden: int, description: str):
    def build(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
        h, D = hidden or default_hidden, math.prod(shape)
        body = make(D, h)

        def to_latent(m, y):
            return m().transform.call_and_ladj(y)

        def to_data(m, z):
            return m().transform.inv(z)

        return _contender(name, "zuko", family, body, preprocess, h, to_latent=to_latent, to_data=to_data,
                          event=(D,), shape=shape, description=description)

    return build


def _zuko_realnvp(D: int, h: int) -> nn.Module:
    import zuko

    return zuko.flows.RealNVP(D, transforms=N_STEPS, hidden_features=(h, h))


def _zuko_maf(D: int, h: int) -> nn.Module:
    import zuko

    return zuko.flows.MAF(D, transforms=N_AUTOREGRESSIVE, hidden_features=(h, h))


def _zuko_nsf(D: int, h: int) -> nn.Module:
    import zuko

    return zuko.flows.NSF(D, transforms=N_SPLINE, hidden_features=(h, h))


# ----------------------------------------------------------------------------- FrEIA
def _freia(name: str, family: str, block: str, default_hidden: int, description: str):
    def build(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        h = hidden or default_hidden

        def subnet(c_in: int, c_out: int) -> nn.Module:
            return _conv_net(c_in, c_out, h)

        inn = Ff.SequenceINN(*shape)
        inn.append(Fm.IRevNetDownsampling)  # (1, 8, 8) -> (4, 4, 4)
        squeezed = _squeezed(shape)
        for k in range(N_STEPS):
            if block == "glow":
                inn.append(Fm.ActNorm)
                inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=AFFINE_CLAMP)
                inn.append(Fm.PermuteRandom, seed=k)
            else:
                inn.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=AFFINE_CLAMP,
                           permute_soft=True)

        def to_latent(m, y):
            z, ljd = m(y)
            return z, ljd

        def to_data(m, z):
            return m(z.reshape(z.shape[0], *squeezed), rev=True)[0]

        return _contender(name, "FrEIA", family, inn, preprocess, h, to_latent=to_latent, to_data=to_data,
                          event=shape, shape=shape, description=description)

    return build


# ----------------------------------------------------------------------------- nflows
def nflows_realnvp(hidden: int | None = None, preprocess: str = "logit", shape=EVENT_SHAPE) -> Contender:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.transforms.normalization import ActNorm

    h, D = hidden or 96, math.prod(shape)
    layers = []
    for k in range(N_STEPS):
        mask = (torch.arange(D) + k) % 2  # alternate which half is transformed
        layers += [ActNorm(D), AffineCouplingTransform(
            mask, transform_net_create_fn=lambda i, o: ResidualNet(i, o, hidden_features=h, num_blocks=2))]
    body = Flow(CompositeTransform(layers), StandardNormal([D]))

    def to_latent(m, y):
        return m._transform(y)

    def to_data(m, z):
        return m._transform.inverse(z)[0]

    return _contender("nflows-realnvp", "nflows", "realnvp-like", body, preprocess, h, to_latent=to_latent,
                      to_data=to_data, event=(D,), shape=shape,
                      description=f"{N_STEPS} x [ActNorm, AffineCouplingTransform (ResidualNet)] on vectors")


PEERS: dict[str, tuple[str, Callable[..., Contender]]] = {
    "normflows-glow": ("normflows", normflows_glow),
    "normflows-realnvp": ("normflows", normflows_realnvp),
    "normflows-resflow": ("normflows", normflows_resflow),
    "zuko-realnvp": ("zuko", _zuko("zuko-realnvp", "realnvp-like", _zuko_realnvp, 128,
                                   f"RealNVP, {N_STEPS} affine couplings (soft-clipped log-scales)")),
    "zuko-maf": ("zuko", _zuko("zuko-maf", "autoregressive", _zuko_maf, 128,
                               f"MAF, {N_AUTOREGRESSIVE} masked affine autoregressive transforms")),
    "zuko-nsf": ("zuko", _zuko("zuko-nsf", "spline", _zuko_nsf, 128,
                               f"NSF, {N_SPLINE} fully autoregressive rational-quadratic spline transforms")),
    "FrEIA-glow": ("FrEIA", _freia("FrEIA-glow", "glow-like", "glow", 112,
                                   f"downsampling + {N_STEPS} x [ActNorm, GLOWCouplingBlock, PermuteRandom]")),
    "FrEIA-allinone": ("FrEIA", _freia("FrEIA-allinone", "glow-like", "allinone", 112,
                                       f"downsampling + {N_STEPS} AllInOneBlock (soft permutation)")),
    "nflows-realnvp": ("nflows", nflows_realnvp),
}


def available() -> dict[str, Callable[..., Contender]]:
    """The peer builders whose library imports here."""
    ok = {lib: library_available(lib) for lib in LIBRARIES}
    return {name: build for name, (lib, build) in PEERS.items() if ok[lib]}
