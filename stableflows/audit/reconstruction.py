"""Reconstruction error per example: ``x_hat = F^-1(F(x))`` (docs/METRICS.md, paper 000 Fig. 2-5).

    err_2 = ||x - x_hat||_2,   err_inf = ||x - x_hat||_inf,   err_rel = err_2 / max(||x||_2, REL_FLOOR)

Errors are measured in float64 from the model's outputs. A non-finite reconstruction is a failure
with error ``inf`` -- counted, never dropped.

An exception of the forward or inverse is sorted by what it says (:func:`classify`):

* ``"domain"``: the input lies outside the model's domain (``InputOutsideDomain`` of stableflows or
  nflows, e.g. a logit pre-transform outside ``[0, 1]``): not a reconstruction at all, reported
  apart (error NaN);
* ``"failure"``: a numerical failure of the map itself (:data:`FAILURE_EXCEPTIONS`: an iterative
  inverse that did not converge, a non-finite intermediate a layer refused, a singular matrix,
  overflow): a failure of that example (error ``inf``), part of the verdict;
* ``"error"``: anything else (a wrong shape or dtype, an ``AttributeError`` in an adapter, a bug in
  the user's model): the audit *could not run* that example. Its error is NaN, never a verdict.

Messages are counted per kind of message (numbers masked, so that ``1x64`` and ``2x64`` count
together) and reported with the full, unmasked text of their first occurrence.

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

from ..transforms.base import InputOutsideDomain, InverseNotConverged, NonFiniteInputError, Transform
from .adapters import Invertible

__all__ = ["Reconstruction", "reconstruct", "repeated_passes", "safe_apply", "REL_FLOOR", "per_example_errors",
           "classify", "FAILURE_EXCEPTIONS", "Applied", "Messages"]

REL_FLOOR = 1e-12  # smallest ||x|| a relative error is divided by
# exceptions that are a numerical failure of the map (a verdict), not an error of the audit
FAILURE_EXCEPTIONS = (InverseNotConverged, NonFiniteInputError, torch.linalg.LinAlgError, FloatingPointError,
                      OverflowError, ZeroDivisionError)
_FAILURE_NAMES = {"InverseNotConverged", "NotConvergedError"}  # the same, by class name, from other libraries
MESSAGE_CHARS = 300  # longest message kept


def classify(e: BaseException) -> str:
    """``"domain"``, ``"failure"`` or ``"error"`` (see the module docstring)."""
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, InputOutsideDomain) or "InputOutsideDomain" in names:
        return "domain"
    if isinstance(e, FAILURE_EXCEPTIONS) or names & _FAILURE_NAMES:
        return "failure"
    return "error"


class Messages:
    """Exception messages counted by kind (numbers masked), each shown with its first full text."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}
        self.kinds: dict[str, str] = {}

    def add(self, text: str, kind: str, n: int = 1) -> None:
        key = _NUMBER.sub("#", text)
        self.counts[key] += n
        self.first.setdefault(key, text)
        self.kinds.setdefault(key, kind)

    def merge(self, other: "Messages") -> "Messages":
        out = Messages()
        for src in (self, other):
            for k, c in src.counts.items():
                out.add(src.first[k], src.kinds[k], c)
        return out

    def as_dict(self, kind: str | None = None) -> dict[str, int]:
        """``{full text of the first occurrence: count}``, most frequent first."""
        return {self.first[k]: c for k, c in self.counts.most_common() if kind is None or self.kinds[k] == kind}

    @classmethod
    def from_rows(cls, rows) -> "Messages":
        """Messages of the rows ``[(text, kind) or None, ...]``."""
        out = cls()
        for r in rows:
            if r is not None:
                out.add(r[0], r[1])
        return out

    def first_text(self, kind: str) -> str | None:
        d = self.as_dict(kind)
        return next(iter(d)) if d else None

    def __bool__(self) -> bool:
        return bool(self.counts)


@dataclass
class Applied:
    """Output of :func:`safe_apply`: ``out`` with NaN rows where an example raised."""

    out: Tensor | None
    raised: Tensor  # (B,) bool: raised anything
    domain: Tensor  # (B,) bool: raised InputOutsideDomain
    error: Tensor  # (B,) bool: raised an error that is not a verdict (the audit could not run it)
    messages: Messages = field(default_factory=Messages)
    rows: list = field(default_factory=list)  # per example: (message, kind) of its exception, or None


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def raising_layer(e: BaseException, root: nn.Module | None) -> str | None:
    """Dotted name of the innermost layer whose code raised ``e``: set on the exception by the
    layer walks of :mod:`.layers` (``e.audit_layer``), or found in the traceback among the
    stableflows layers of ``root``."""
    named = getattr(e, "audit_layer", None)
    if named is not None:
        return named
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


def message(e: BaseException, root: nn.Module | None = None) -> str:
    """``"[layer] ErrorType: first line"`` (the full first line, numbers included)."""
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"[:MESSAGE_CHARS]
    layer = raising_layer(e, root)
    return f"[{layer}] {msg}" if layer is not None else msg


def safe_apply(fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 512,
               root: nn.Module | None = None) -> Applied:
    """``fn`` over ``x`` in batches; a batch that raises is split in halves until the examples that
    raise are isolated (a few calls per failing example, not one per example); those get NaN
    outputs and are flagged (never dropped). Their messages are counted, prefixed by the raising
    layer's name when known."""
    n = x.shape[0]
    raised = torch.zeros(n, dtype=torch.bool)
    domain = torch.zeros(n, dtype=torch.bool)
    error = torch.zeros(n, dtype=torch.bool)
    messages = Messages()
    rows: list = [None] * n

    def run(start: int, stop: int) -> list[tuple[Tensor | None, int]]:
        xb = x[start:stop]
        try:
            return [(fn(xb).detach(), stop - start)]
        except Exception as e:  # noqa: BLE001 - isolate the failing examples
            if stop - start == 1:
                kind = classify(e)
                raised[start] = True
                domain[start] = kind == "domain"
                error[start] = kind == "error"
                text = message(e, root)
                messages.add(text, kind)
                rows[start] = (text, kind)
                return [(None, 1)]
        mid = (start + stop) // 2
        return run(start, mid) + run(mid, stop)

    outs: list[tuple[Tensor | None, int]] = []
    for s in range(0, n, batch_size):
        outs += run(s, min(s + batch_size, n))
    return Applied(_stack_rows(outs), raised, domain, error, messages, rows)


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

    err_l2: Tensor  # float64; inf = non-finite reconstruction; nan = outside the domain or could not run
    err_linf: Tensor
    err_rel: Tensor
    finite_forward: Tensor  # bool: z finite (False where the forward raised)
    finite_inverse: Tensor  # bool: x_hat finite
    outside_domain: Tensor  # bool: the forward refused the input (InputOutsideDomain)
    raised: Tensor  # bool: forward or inverse raised anything
    messages: dict  # full text of the first message of each kind -> count
    error: Tensor | None = None  # bool: raised an error that is not a verdict (could not run)
    message_kinds: dict = field(default_factory=dict)  # message -> "domain" | "failure" | "error"
    z: Tensor | None = None
    x_hat: Tensor | None = None
    rows: list | None = None  # per example: (message, kind) of its first exception, or None

    def __post_init__(self):
        if self.error is None:
            self.error = torch.zeros_like(self.raised)
        if self.rows is None:
            self.rows = [None] * self.n

    _FIELDS = ("err_l2", "err_linf", "err_rel", "finite_forward", "finite_inverse", "outside_domain", "raised",
               "error")

    def take(self, idx: Tensor) -> "Reconstruction":
        """The examples ``idx`` (their messages recounted)."""
        rows = [self.rows[int(i)] for i in idx]
        msgs = Messages.from_rows(rows)
        parts = {f: getattr(self, f)[idx] for f in self._FIELDS}
        cut = (lambda t: None if t is None else t[idx.to(t.device)])
        return Reconstruction(**parts, messages=msgs.as_dict(), message_kinds={msgs.first[k]: msgs.kinds[k]
                                                                                  for k in msgs.counts},
                              z=cut(self.z), x_hat=cut(self.x_hat), rows=rows)

    @classmethod
    def cat(cls, parts: list["Reconstruction"]) -> "Reconstruction":
        if len(parts) == 1:
            return parts[0]
        rows = [r for p in parts for r in p.rows]
        msgs = Messages.from_rows(rows)

        def join(name):
            ts = [getattr(p, name) for p in parts]
            return None if any(t is None for t in ts) else torch.cat(ts, 0)
        return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in cls._FIELDS},
                   messages=msgs.as_dict(), message_kinds={msgs.first[k]: msgs.kinds[k] for k in msgs.counts},
                   z=join("z"), x_hat=join("x_hat"), rows=rows)

    @property
    def n(self) -> int:
        return int(self.err_l2.shape[0])

    @property
    def in_domain(self) -> Tensor:
        return ~self.outside_domain

    @property
    def failed_raise(self) -> Tensor:
        """Examples whose computation raised a numerical failure (a verdict)."""
        return self.raised & ~self.outside_domain & ~self.error

    def first_error(self) -> str | None:
        return next((m for m, k in self.message_kinds.items() if k == "error"), None)

    def counts(self) -> dict[str, int]:
        ind = self.in_domain & ~self.error
        return {
            "n": self.n,
            "outside_domain": int(self.outside_domain.sum()),
            "could_not_run": int(self.error.sum()),
            "nonfinite_forward": int((~self.finite_forward & ind).sum()),
            "nonfinite_inverse": int((self.finite_forward & ~self.finite_inverse & ind).sum()),
            "nonfinite_reconstruction": int((~self.finite_inverse & ind).sum()),
            "raised": int((self.raised & ind).sum()),
        }


def _messages(m: Messages) -> tuple[dict, dict]:
    d = m.as_dict()
    kinds = {m.first[k]: m.kinds[k] for k in m.counts}
    return d, kinds


def reconstruct(model: Invertible, x: Tensor, *, batch_size: int = 512, keep: bool = True) -> Reconstruction:
    """Round trip every example of ``x`` (already in the model's dtype) through ``model``; the
    inverse runs on the examples whose forward did not raise."""
    n = x.shape[0]
    root = getattr(model, "traceable", None)
    with torch.no_grad():
        fz = safe_apply(model.forward, x, batch_size=batch_size, root=root)
        z = fz.out
        if z is not None and model.latent_shape is None:
            ok_rows = ~fz.raised
            if bool(ok_rows.any()):
                model.latent_shape = tuple(z.shape[1:])
        ok = ~fz.raised
        fx = Applied(None, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool),
                     torch.zeros(n, dtype=torch.bool))
        x_hat = None
        if z is not None and bool(ok.any()):
            idx = ok.nonzero().flatten()
            part = safe_apply(model.inverse, z[idx.to(z.device)] if not bool(ok.all()) else z,
                              batch_size=batch_size, root=root)
            if part.out is not None:
                x_hat = torch.full((n, *part.out.shape[1:]), float("nan"), dtype=part.out.dtype,
                                   device=part.out.device)
                x_hat[idx.to(x_hat.device)] = part.out
            for name in ("raised", "domain", "error"):
                getattr(fx, name)[idx] = getattr(part, name)
            fx.messages = part.messages
            fx.rows = [None] * n
            for j, i in enumerate(idx.tolist()):
                fx.rows[i] = part.rows[j]
    e2, einf, erel = per_example_errors(x, x_hat)
    error = fz.error | fx.error
    dom = fz.domain & ~error
    for e in (e2, einf, erel):
        e[dom | error] = float("nan")
    messages, kinds = _messages(fz.messages.merge(fx.messages))
    raised = fz.raised | fx.raised
    rows = [fz.rows[i] if fz.rows[i] is not None else (fx.rows[i] if fx.rows else None) for i in range(n)]
    return Reconstruction(
        err_l2=e2, err_linf=einf, err_rel=erel,
        finite_forward=finite_rows(z, n) & ~fz.raised,
        finite_inverse=finite_rows(x_hat, n) & ~raised,
        outside_domain=dom, raised=raised, messages=messages, error=error, message_kinds=kinds,
        z=z if keep else None, x_hat=x_hat if keep else None, rows=rows,
    )


def repeated_passes(model: Invertible, x: Tensor, k: int, *, batch_size: int = 512,
                    deadline: float | None = None) -> Tensor:
    """``(n, k)`` float64: ``||x_j - x||_2`` after ``j = 1..k`` forward/inverse passes (inf once
    non-finite or failing; nan where the first forward is outside the domain, or from the pass on
    which an example raised an error that is not a verdict). Only the examples still finite are
    passed on. Past ``deadline`` (a ``time.perf_counter()`` value) no further pass starts (those
    columns stay NaN)."""
    import time

    n = x.shape[0]
    out = torch.full((n, k), float("nan"), dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    dead = torch.zeros(n, dtype=torch.bool)  # non-finite or failed: inf from here on
    cur = x
    done = 0  # passes run
    with torch.no_grad():
        for j in range(k):
            idx = alive.nonzero().flatten()
            if not idx.numel() or (deadline is not None and j > 0 and time.perf_counter() > deadline):
                break
            rec = reconstruct(model, cur[idx.to(cur.device)], batch_size=batch_size)
            done = j + 1
            e2 = per_example_errors(x[idx.to(x.device)], rec.x_hat)[0]
            stop = rec.error | rec.outside_domain
            if j == 0:
                out[idx[rec.outside_domain]] = float("nan")
            fail = ~stop & ~torch.isfinite(e2)
            e2[stop] = float("nan")
            out[idx, j] = e2
            dead[idx[fail]] = True
            alive[idx[stop | fail]] = False
            if rec.x_hat is None:
                break
            cur = cur.clone()
            keep = ~(stop | fail)
            cur[idx[keep].to(cur.device)] = rec.x_hat[keep.to(rec.x_hat.device)].to(cur.dtype)
        if not alive.any():
            done = k
        for j in range(done):  # dead rows stay inf after their failure
            col = out[:, j]
            col[dead & torch.isnan(col)] = float("inf")
    return out
