"""Speed of a training step at any image size: stableflows' Glow eager and compiled against the
Glow-like peers at an equal parameter count, timed in one process in interleaved rounds.

Used by ``benchmarks/compile_speed.py`` (digits 8x8, Fashion-MNIST 28x28) and ``benchmarks/gpu.py``
(CIFAR-10 size). The peers are built at the given event shape ``(C, H, W)`` the way
:mod:`.peers` builds them for the digits (one squeeze to ``(4C, H/2, W/2)``, then ``N_STEPS`` blocks
with Glow's 3x3 -> 1x1 -> 3x3 conditioner, zero-initialised last layer, the shared ``Logit(0.01)``
pre-transform); widths are matched to stableflows' parameter count (:func:`.contender.match_hidden`).

A *step* is what the training loop does with a model: a dequantised batch, ``loss = mean bpd``,
``backward``, gradient-norm clipping, fused AdamW, any ``after_step`` projection, and one read of
the loss's finiteness. stableflows' models run with :func:`~stableflows.transforms.base.validation`
off, as in the loop (its data are validated once before the first step). Ratios come from
:func:`paired_ms`: rounds ``A B C ... A B C ...`` of ``steps`` steps each, median ms per step per
model, so that slow phases of a shared machine hit every model alike (see :mod:`.paired`).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..metrics import nats_to_bpd
from ..transforms.base import validation
from .contender import LOGIT_ALPHA, Preprocess, count_params, match_hidden, standard_normal_logp
from .peers import AFFINE_CLAMP, N_STEPS, _conv_net, library_available

__all__ = ["Model", "stableflows_glow", "freia_allinone", "normflows_glow", "glow_contenders", "Stepper",
           "paired_ms", "GLOW_PEERS"]

GLOW_PEERS = ("FrEIA-allinone", "normflows-glow")


@dataclass
class Model:
    """A model to time: ``log_prob(v) -> (B,)`` on model-space data ``v`` in ``[0, 1)``."""

    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    hidden: int
    after_step: Callable[[], None] | None = None
    notes: list[str] = field(default_factory=list)
    compile_options: dict | None = None  # Flow.compile(**options) after the initialisation

    @property
    def n_params(self) -> int:
        return count_params(self.module)


# ----------------------------------------------------------------------------- builders
def stableflows_glow(shape: Sequence[int], *, levels: int = 2, steps_per_level: int = 4, hidden: int = 128,
                     logit_alpha: float = LOGIT_ALPHA, compile_options: dict | None = None) -> Model:
    """stableflows' Glow (affine sigmoid coupling, LU 1x1, ActNorm, learned split prior), compiled in
    place with ``Flow.compile(**compile_options)`` when given (after :meth:`Stepper` initialises it)."""
    from ..models import glow

    flow = glow(shape=tuple(shape), levels=levels, steps_per_level=steps_per_level, hidden=hidden,
                logit_alpha=logit_alpha)
    name = "stableflows-glow" + ("-compiled" if compile_options is not None else "")
    m = Model(name, flow, flow.log_prob, hidden, compile_options=compile_options)
    m.notes.append(f"{levels} levels x {steps_per_level} steps")
    if compile_options is not None:
        m.notes.append(f"torch.compile {compile_options or '(defaults)'}")
    return m


class _Pipeline(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.pre = Preprocess("logit")
        self.body = body


def freia_allinone(shape: Sequence[int], hidden: int) -> Model:
    """FrEIA: ``IRevNetDownsampling`` then ``N_STEPS`` ``AllInOneBlock`` (affine clamp 2, soft permutation)."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(*shape)
    inn.append(Fm.IRevNetDownsampling)
    for _ in range(N_STEPS):
        inn.append(Fm.AllInOneBlock, subnet_constructor=lambda c_in, c_out: _conv_net(c_in, c_out, hidden),
                   affine_clamping=AFFINE_CLAMP, permute_soft=True)
    module = _Pipeline(inn)

    def log_prob(v: Tensor) -> Tensor:
        y, ld_pre = module.pre(v)
        z, ljd = module.body(y)
        return standard_normal_logp(z) + ld_pre + ljd

    return Model("FrEIA-allinone", module, log_prob, hidden, notes=[f"downsampling + {N_STEPS} AllInOneBlock"])


def normflows_glow(shape: Sequence[int], hidden: int) -> Model:
    """normflows: ``N_STEPS`` ``GlowBlock`` (affine sigmoid coupling, LU 1x1, ActNorm) after one squeeze."""
    import normflows as nf

    c, h, w = shape
    flows = [nf.flows.GlowBlock(4 * c, hidden, split_mode="channel", scale=True, scale_map="sigmoid")
             for _ in range(N_STEPS)]
    flows.append(nf.flows.Squeeze())  # generative order: the squeeze is the last map z -> x
    body = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian((4 * c, h // 2, w // 2), trainable=False),
                              flows=flows)
    module = _Pipeline(body)

    def log_prob(v: Tensor) -> Tensor:
        y, ld = module.pre(v)
        for f in reversed(module.body.flows):  # data -> latent walks the generative flows backwards
            y, d = f.inverse(y)
            ld = ld + d
        return standard_normal_logp(y) + ld

    return Model("normflows-glow", module, log_prob, hidden, notes=[f"squeeze + {N_STEPS} GlowBlock"])


PEER_BUILDERS = {"FrEIA-allinone": ("FrEIA", freia_allinone), "normflows-glow": ("normflows", normflows_glow)}


def glow_contenders(shape: Sequence[int], *, levels: int = 2, steps_per_level: int = 4, hidden: int = 128,
                    compiled: dict | None = None, eager: bool = True, peers: Sequence[str] = GLOW_PEERS,
                    match: bool = True) -> dict[str, Model]:
    """stableflows' Glow (eager and/or compiled with ``compiled`` options) and the ``peers`` whose
    library imports, their widths matched to the Glow's parameter count (``match``)."""
    out: dict[str, Model] = {}
    kw = dict(levels=levels, steps_per_level=steps_per_level, hidden=hidden)
    torch.manual_seed(0)
    if eager:
        out["stableflows-glow"] = stableflows_glow(shape, **kw)
    if compiled is not None:
        torch.manual_seed(0)
        out["stableflows-glow-compiled"] = stableflows_glow(shape, **kw, compile_options=compiled)
    target = next(iter(out.values())).n_params if out else stableflows_glow(shape, **kw).n_params
    for name in peers:
        lib, build = PEER_BUILDERS[name]
        if not library_available(lib):
            continue
        h = match_hidden(lambda w: build(shape, w).module, target) if match else hidden
        torch.manual_seed(0)
        out[name] = build(shape, h)
    return out


# ----------------------------------------------------------------------------- stepping and timing
class Stepper:
    """One model's training steps on integer data ``x_int`` with ``levels`` levels (see module docstring)."""

    def __init__(self, model: Model, x_int: Tensor, levels: int, *, batch_size: int = 64, lr: float = 1e-3,
                 device: torch.device | str = "cpu", seed: int = 0, init_batch: int = 512):
        from ..train.optim import adamw

        self.model, self.levels, self.batch_size = model, levels, batch_size
        self.device = torch.device(device)
        self.module = model.module.to(self.device)
        self.x = x_int.to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # batches drawn on the device
        self.module.train()
        with torch.no_grad(), validation(False):  # data-dependent initialisation, eagerly
            model.log_prob(self._batch(min(init_batch, self.x.shape[0])))
        if model.compile_options is not None:
            self.module.compile(**model.compile_options)
        self.opt = adamw(self.module.parameters(), lr=lr)
        self.skipped = 0

    def _batch(self, n: int) -> Tensor:
        idx = torch.randint(0, self.x.shape[0], (n,), generator=self.gen, device=self.device)
        raw = self.x[idx]
        u = torch.rand(raw.shape, generator=self.gen, dtype=raw.dtype, device=self.device)
        return (raw + u) / self.levels

    def step(self) -> None:
        v = self._batch(self.batch_size)
        with validation(False):
            self.opt.zero_grad(set_to_none=True)
            loss = nats_to_bpd(self.model.log_prob(v), v[0].numel(), self.levels).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 50.0)
            self.opt.step()
            if self.model.after_step is not None:
                self.model.after_step()
        if not bool(torch.isfinite(loss.detach())):  # the loop's one read
            self.skipped += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ms(steppers: dict[str, Stepper], *, rounds: int = 9, steps: int = 10, warmup: int = 5,
              reference: str | None = None) -> dict:
    """Median ms per step of each stepper over ``rounds`` interleaved rounds of ``steps`` steps (after
    ``warmup`` untimed steps each: allocator, lazy state, compilation). ``ratio_to_reference`` is the
    reference's ms / this model's ms (> 1: faster than the reference)."""
    if not steppers or rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError("need at least one model, rounds >= 1, steps >= 1, warmup >= 0")
    names = list(steppers)
    ref = reference or names[0]
    warm_s = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, s in steppers.items():
            t0 = time.perf_counter()
            for _ in range(warmup):
                s.step()
            _sync(s.device)
            warm_s[n] = time.perf_counter() - t0
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                s = steppers[n]
                _sync(s.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    s.step()
                _sync(s.device)
                times[n].append(1e3 * (time.perf_counter() - t0) / steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"rounds": rounds, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
            "reference": ref,
            "models": [{"name": n, "params": steppers[n].model.n_params, "hidden": steppers[n].model.hidden,
                        "notes": steppers[n].model.notes, "ms_per_step": med[n], "steps_per_s": 1e3 / med[n],
                        "rounds_ms": times[n], "warmup_s": warm_s[n], "skipped_steps": steppers[n].skipped,
                        "ratio_to_reference": med[ref] / med[n] if med[n] > 0 else math.nan} for n in names]}
