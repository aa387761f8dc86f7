"""Reconstruction error per example: ``x_hat = F^-1(F(x))`` (docs/METRICS.md, paper 000 Fig. 2-5).

    err_2 = ||x - x_hat||_2,   err_inf = ||x - x_hat||_inf,   err_rel = err_2 / max(||x||_2, REL_FLOOR)

Errors are measured in float64 from the model's outputs. A non-finite reconstruction is a failure
with error ``inf`` -- counted, never dropped. Inputs the model refuses with
:class:`~stableflows.transforms.base.InputOutsideDomain` (e.g. a logit pre-transform outside
``[0, 1]``) are marked ``outside_domain``: they are not reconstructions at all and are reported
apart. Any other exception of the forward or inverse is a failure of that example.

Also here: the error after ``k`` repeated forward/inverse passes (paper 000 Fig. 4),
``x_j = F^-1(F(x_{j-1}))``, ``err_j = ||x_j - x||_2``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..transforms.base import InputOutsideDomain, Transform
from .adapters import Invertible

__all__ = ["Reconstruction", "reconstruct", "repeated_passes", "safe_apply", "REL_FLOOR", "per_example_errors"]

REL_FLOOR = 1e-12  # smallest ||x|| a relative error is divided by


@dataclass
class Applied:
    """Output of :func:`safe_apply`: ``out`` with NaN rows where an example raised."""

    out: Tensor | None
    raised: Tensor  # (B,) bool
    domain: Tensor  # (B,) bool: raised InputOutsideDomain
    messages: Counter = field(default_factory=Counter)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def raising_layer(e: BaseException, root: nn.Module | None) -> str | None:
    """Dotted name (inside ``root``) of the innermost stableflows layer whose code raised ``e``."""
    if root is None:
        return None
    names = {id(m): n for n, m in root.named_modules()}
    found = None
    tb = e.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Transform) and id(obj) in names:
            found = names[id(obj)]
        tb = tb.tb_next
    return found


def _message(e: BaseException, root: nn.Module | None = None) -> str:
    """``"[layer] ErrorType: first line"`` with numbers replaced by ``#`` (so messages count up)."""
    text = str(e).strip().splitlines()
    msg = _NUMBER.sub("#", f"{type(e).__name__}: {text[0] if text else ''}")[:200]
    layer = raising_layer(e, root)
    return f"[{layer}] {msg}" if layer is not None else msg


def safe_apply(fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 512,
               root: nn.Module | None = None) -> Applied:
    """``fn`` over ``x`` in batches; a batch that raises is redone example by example, and the
    examples that still raise get NaN outputs and are flagged (never dropped). Their messages are
    counted, prefixed by the raising layer's name inside ``root`` when given."""
    n = x.shape[0]
    raised = torch.zeros(n, dtype=torch.bool)
    domain = torch.zeros(n, dtype=torch.bool)
    messages: Counter = Counter()
    outs: list[tuple[Tensor | None, int]] = []
    for s in range(0, n, batch_size):
        xb = x[s:s + batch_size]
        try:
            outs.append((fn(xb).detach(), xb.shape[0]))
            continue
        except Exception:  # noqa: BLE001 - redo one by one to attribute the failure
            pass
        rows: list[tuple[Tensor | None, int]] = []
        for i in range(xb.shape[0]):
            try:
                rows.append((fn(xb[i:i + 1]).detach(), 1))
            except Exception as e:  # noqa: BLE001 - counted and reported per example
                rows.append((None, 1))
                raised[s + i] = True
                domain[s + i] = isinstance(e, InputOutsideDomain)
                messages[_message(e, root)] += 1
        outs.append((_stack_rows(rows), xb.shape[0]))
    return Applied(_stack_rows(outs), raised, domain, messages)


def _stack_rows(parts: list[tuple[Tensor | None, int]]) -> Tensor | None:
    """Concatenate ``(tensor or None, rows)`` parts; a None part becomes ``rows`` rows of NaN."""
    like = next((t for t, _ in parts if t is not None), None)
    if like is None:
        return None
    filled = [t if t is not None else torch.full((m, *like.shape[1:]), float("nan"), dtype=like.dtype,
                                                     device=like.device) for t, m in parts]
    return torch.cat(filled, 0)


def finite_rows(t: Tensor | None, n: int) -> Tensor:
    if t is None:
        return torch.zeros(n, dtype=torch.bool)
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1).cpu()


def per_example_errors(x: Tensor, x_hat: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(err_2, err_inf, err_rel)`` in float64, ``inf`` where ``x_hat`` is not finite."""
    n = x.shape[0]
    if x_hat is None:
        inf = torch.full((n,), float("inf"), dtype=torch.float64)
        return inf, inf.clone(), inf.clone()
    d = (x_hat.detach().double().cpu() - x.detach().double().cpu()).reshape(n, -1)
    e2, einf = d.norm(dim=1), d.abs().amax(dim=1)
    bad = ~torch.isfinite(d).all(dim=1)
    e2[bad] = float("inf")
    einf[bad] = float("inf")
    xn = x.detach().double().cpu().reshape(n, -1).norm(dim=1).clamp_min(REL_FLOOR)
    return e2, einf, e2 / xn


@dataclass
class Reconstruction:
    """Per-example round trip ``x -> z -> x_hat`` of one input family (all tensors length ``n``)."""

    err_l2: Tensor  # float64; inf = non-finite reconstruction; nan = outside the model's domain
    err_linf: Tensor
    err_rel: Tensor
    finite_forward: Tensor  # bool: z finite (False where the forward raised)
    finite_inverse: Tensor  # bool: x_hat finite
    outside_domain: Tensor  # bool: the forward refused the input (InputOutsideDomain)
    raised: Tensor  # bool: forward or inverse raised anything
    messages: dict
    z: Tensor | None = None
    x_hat: Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.err_l2.shape[0])

    @property
    def in_domain(self) -> Tensor:
        return ~self.outside_domain

    def counts(self) -> dict[str, int]:
        ind = self.in_domain
        return {
            "n": self.n,
            "outside_domain": int(self.outside_domain.sum()),
            "nonfinite_forward": int((~self.finite_forward & ind).sum()),
            "nonfinite_inverse": int((self.finite_forward & ~self.finite_inverse & ind).sum()),
            "nonfinite_reconstruction": int((~self.finite_inverse & ind).sum()),
            "raised": int((self.raised & ind).sum()),
        }


def reconstruct(model: Invertible, x: Tensor, *, batch_size: int = 512, keep: bool = True) -> Reconstruction:
    """Round trip every example of ``x`` (already in the model's dtype) through ``model``."""
    n = x.shape[0]
    with torch.no_grad():
        fz = safe_apply(model.forward, x, batch_size=batch_size, root=model.traceable)
        z = fz.out
        if z is not None and model.latent_shape is None:
            model.latent_shape = tuple(z.shape[1:])
        if z is None:
            fx = Applied(None, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
        else:
            fx = safe_apply(model.inverse, z, batch_size=batch_size, root=model.traceable)
    e2, einf, erel = per_example_errors(x, fx.out)
    dom = fz.domain.clone()
    for e in (e2, einf, erel):
        e[dom] = float("nan")
    messages = dict(fz.messages + fx.messages)
    return Reconstruction(
        err_l2=e2, err_linf=einf, err_rel=erel,
        finite_forward=finite_rows(z, n) & ~fz.raised,
        finite_inverse=finite_rows(fx.out, n) & ~fx.raised & ~fz.raised,
        outside_domain=dom, raised=fz.raised | fx.raised, messages=messages,
        z=z if keep else None, x_hat=fx.out if keep else None,
    )


def repeated_passes(model: Invertible, x: Tensor, k: int, *, batch_size: int = 512) -> Tensor:
    """``(n, k)`` float64: ``||x_j - x||_2`` after ``j = 1..k`` forward/inverse passes (inf once
    non-finite or raising; nan where the first forward is outside the domain)."""
    n = x.shape[0]
    out = torch.full((n, k), float("nan"), dtype=torch.float64)
    cur = x
    dead = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for j in range(k):
            fz = safe_apply(model.forward, cur, batch_size=batch_size)
            if j == 0:
                first_domain = fz.domain
            if fz.out is None:
                nxt = None
            else:
                nxt = safe_apply(model.inverse, fz.out, batch_size=batch_size).out
            e2 = per_example_errors(x, nxt)[0]
            dead |= ~torch.isfinite(e2)
            e2[dead] = float("inf")
            out[:, j] = e2
            if nxt is None:
                break
            # keep passing only the finite rows; dead rows stay inf
            cur = torch.where(dead.to(nxt.device).view(-1, *([1] * (nxt.dim() - 1))), x, nxt)
        out[first_domain] = float("nan")
        if nxt is None:
            out[:, j:] = float("inf")
            out[first_domain] = float("nan")
    return out
