"""PGD search for inputs a flow cannot reconstruct (paper 000 Fig. 3, 7, 8; the attack table of 001).

Maximise ``||x' - F^-1(F(x'))||_2`` over ``x'`` in a box around each example, batched over examples,
with signed-gradient ascent steps and projection (Madry et al.'s L-inf PGD)::

    x'_{t+1} = clip_[lo, hi](x'_t + alpha * sign(grad_x' err(x'_t)))

Constraint sets (all boxes ``[lo, hi]``):

* ``"cell"``: the dequantisation cell of the example, ``[x_int / L, (x_int + 1) / L)`` (001: "by
  optimizing within the dequantization distribution of a datapoint");
* ``"linf"``: the L-inf ball ``||x' - x||_inf <= eps``, intersected with the data range;
* ``"range"``: the data range widened by ``widen`` of its width on each side (000 Fig. 8: a Glow
  trained on ``[-0.5, 0.5]`` attacked in ``[-0.7, 0.7]``, i.e. ``widen = 0.2``).

Random start (uniform in the box; for ``"range"`` in the ``eps`` ball around the example), step size
(default ``2.5 * radius / steps``), steps and seed are configurable. An example whose
reconstruction turns non-finite (or raises a numerical failure) is a success of the attack and is
frozen there; an example whose computation raises an error that is not a verdict (a wrong shape,
a bug) is frozen as *could not run*, never a success. For
residual blocks the fixed-point inverse is capped at ``fixed_point_iterations`` during the attack
(gradients come from the block's implicit backward); the reported error of the best point is then
measured again with the block's own converged inverse. The baseline draws the same number of
points uniformly in the same box (:func:`random_search`).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..transforms.base import Transform
from .adapters import Invertible
from .reconstruction import per_example_errors, reconstruct, safe_apply

__all__ = ["AttackResult", "pgd_attack", "random_search", "constraint_box", "CONSTRAINTS", "DEFAULT_EPS",
           "DEFAULT_WIDEN", "capped_fixed_point"]

CONSTRAINTS = ("cell", "linf", "range")
DEFAULT_EPS = 2.0 / 255  # L-inf radius on [0, 1] data (a common image-attack budget)
DEFAULT_WIDEN = 0.2  # paper 000 Fig. 8: [-0.5, 0.5] -> [-0.7, 0.7]
STEP_FACTOR = 2.5  # alpha = STEP_FACTOR * radius / steps


@contextlib.contextmanager
def capped_fixed_point(module: nn.Module | None, k: int | None):
    """Cap the fixed-point inverse of every residual block (a Transform with ``max_iter``) at ``k``
    iterations inside the block; their not-converged warnings are silenced there."""
    if module is None or k is None:
        yield
        return
    saved = []
    for m in module.modules():
        if isinstance(m, Transform) and hasattr(m, "max_iter"):
            saved.append((m, m.max_iter))
            m.max_iter = int(k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        for m, v in saved:
            m.max_iter = v


def constraint_box(constraint: str, x0: Tensor, *, x_int: Tensor | None = None, levels: int | None = None,
                   eps: float = DEFAULT_EPS, data_range: tuple[float, float] = (0.0, 1.0),
                   widen: float = DEFAULT_WIDEN) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` of the constraint set around every example of ``x0``."""
    if constraint == "cell":
        if x_int is None or levels is None:
            raise ValueError("the 'cell' constraint needs integer data and its number of levels")
        lo = (x_int / levels).to(x0)
        hi = torch.nextafter(((x_int + 1) / levels).to(x0), lo)  # half-open cell
        return lo, hi
    a, b = data_range
    if constraint == "linf":
        return (x0 - eps).clamp_min(a), (x0 + eps).clamp_max(b)
    if constraint == "range":
        w = widen * (b - a)
        return torch.full_like(x0, a - w), torch.full_like(x0, b + w)
    raise ValueError(f"unknown constraint {constraint!r}; choose one of {', '.join(CONSTRAINTS)}")


@dataclass
class AttackResult:
    """Best reconstruction error found per example (float64; inf = non-finite reconstruction)."""

    constraint: str
    method: str  # "pgd" or "random"
    best_err: Tensor  # (n,) measured with the converged inverse
    start_err: Tensor  # (n,) at the unperturbed examples
    best_x: Tensor
    evaluations: int  # points tried per example
    history: list = field(default_factory=list)  # max finite error over examples after each step
    status: str = "ok"  # "ok", "outside_domain" or "could not run"
    message: str = ""
    settings: dict = field(default_factory=dict)
    stopped: bool = False  # ended early at its deadline (time budget)

    @property
    def pct_nonfinite(self) -> float:
        return 100.0 * float((~torch.isfinite(self.best_err)).double().mean()) if self.best_err.numel() else math.nan


def _uniform(lo: Tensor, hi: Tensor, g: torch.Generator) -> Tensor:
    u = torch.rand(lo.shape, generator=g, dtype=torch.float64).to(lo)
    return torch.minimum(lo + u * (hi - lo), hi)


def _start_box(constraint: str, x0: Tensor, lo: Tensor, hi: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if constraint == "range":
        return torch.maximum(x0 - eps, lo), torch.minimum(x0 + eps, hi)
    return lo, hi


def _rows_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _err_with_grad(model: Invertible, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example L2 reconstruction error (model dtype) and its gradient w.r.t. ``x``."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        err = _rows_norm(model.inverse(model.forward(xx)) - xx)
        finite = torch.isfinite(err)
        g = None
        if bool(finite.any()):
            (g,) = torch.autograd.grad(err[finite].sum(), xx, allow_unused=True)
    g = torch.zeros_like(x) if g is None else torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    # a NaN reconstruction (inf - inf, 0 * inf) is a non-finite one: inf, the attack's success; NaN
    # stays reserved for inputs outside the domain or that could not run
    err = torch.where(finite, err.detach(), torch.full_like(err.detach(), math.inf))
    return err, g


def _objective(model: Invertible, x: Tensor, active: Tensor):
    """``(err, grad, raised, domain, error, messages)`` for the active rows; rows that raise a
    numerical failure get err = inf, rows that raise an error (could not run) err = NaN."""
    n = x.shape[0]
    err = torch.full((n,), float("nan"), dtype=torch.float64)
    grad = torch.zeros_like(x)
    raised = torch.zeros(n, dtype=torch.bool)
    domain = torch.zeros(n, dtype=torch.bool)
    error = torch.zeros(n, dtype=torch.bool)
    idx = active.nonzero().flatten()
    if idx.numel() == 0:
        return err, grad, raised, domain, error, None
    try:
        e, g = _err_with_grad(model, x[idx])
        err[idx], grad[idx] = e.double().cpu(), g
        return err, grad, raised, domain, error, None
    except Exception:  # noqa: BLE001 - find the rows that raise, keep going with the others
        pass
    probe = safe_apply(lambda t: model.inverse(model.forward(t)), x[idx], batch_size=max(1, idx.numel()))
    bad = probe.raised
    raised[idx[bad]] = True
    domain[idx[bad & probe.domain]] = True
    error[idx[bad & probe.error]] = True
    err[idx[bad]] = float("inf")
    err[idx[bad & probe.error]] = float("nan")
    good = idx[~bad]
    if good.numel():
        try:
            e, g = _err_with_grad(model, x[good])
            err[good], grad[good] = e.double().cpu(), g
        except Exception as ex:  # noqa: BLE001 - the gradient itself fails: those rows could not run
            from .reconstruction import message

            raised[good] = True
            error[good] = True
            probe.messages.add(f"gradient of the reconstruction error: {message(ex)}", "error", int(good.numel()))
    return err, grad, raised, domain, error, probe.messages


def pgd_attack(model: Invertible, x0: Tensor, *, constraint: str = "cell", x_int: Tensor | None = None,
               levels: int | None = None, eps: float = DEFAULT_EPS, data_range: tuple[float, float] = (0.0, 1.0),
               widen: float = DEFAULT_WIDEN, steps: int = 50, step_size: float | None = None,
               random_start: bool = True, fixed_point_iterations: int | None = None, seed: int = 0,
               deadline: float | None = None) -> AttackResult:
    """PGD maximising the reconstruction error of every example of ``x0`` (model space, model dtype).
    ``deadline`` (a ``time.perf_counter()`` value): stop after the step during which it passes."""
    lo, hi = constraint_box(constraint, x0, x_int=x_int, levels=levels, eps=eps, data_range=data_range, widen=widen)
    radius = float(((hi - lo) / 2).amax())
    alpha = step_size if step_size is not None else STEP_FACTOR * radius / max(steps, 1)
    g = torch.Generator().manual_seed(seed)
    x = _uniform(*_start_box(constraint, x0, lo, hi, eps), g) if random_start else x0.clone()
    n = x0.shape[0]
    best = torch.full((n,), -1.0, dtype=torch.float64)
    best_x = x.clone()
    frozen = torch.zeros(n, dtype=torch.bool)
    history = []
    settings = dict(steps=steps, step_size=alpha, eps=eps, widen=widen, random_start=random_start,
                    fixed_point_iterations=fixed_point_iterations, seed=seed, lo=float(lo.min()), hi=float(hi.max()))
    errored = torch.zeros(n, dtype=torch.bool)
    first_error = ""
    stopped = False
    with model.eval_mode(), capped_fixed_point(model.module, fixed_point_iterations):
        for t in range(steps + 1):
            err, grad, raised, domain, error, msgs = _objective(model, x, ~frozen)
            if bool(domain.any()) and t == 0 and bool(domain.all()):
                return _outside(constraint, x0, settings, model)
            if bool(error.any()):
                errored |= error
                first_error = first_error or (msgs.first_text("error") if msgs is not None else "") or "exception"
                frozen |= error
            err[domain] = float("nan")  # outside the model's domain: not a success
            improve = ~frozen & ((err > best) | ~torch.isfinite(err)) & ~torch.isnan(err)
            best[improve] = err[improve]
            best_x[improve] = x[improve]
            frozen |= ~torch.isfinite(err) & ~torch.isnan(err)  # non-finite reconstruction found
            frozen |= domain
            fin = best[torch.isfinite(best)]
            history.append(float(fin.max()) if fin.numel() else math.inf)
            if t == steps or bool(frozen.all()):
                break
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
            step = alpha * grad.sign()
            step[frozen] = 0
            x = torch.minimum(torch.maximum(x + step, lo), hi)
    final = _final_errors(model, best_x)
    final[best < 0] = float("nan")  # never evaluated in the domain
    final[errored] = float("nan")
    start = _final_errors(model, x0)
    status, msg = "ok", ""
    if bool(errored.any()):
        status = "could not run" if bool(errored.all()) else "ok"
        msg = f"could not run {int(errored.sum())} of {n} examples: {first_error}"
    return AttackResult(constraint, "pgd", final, start, best_x, len(history), history, status=status, message=msg,
                        settings=settings, stopped=stopped)


def _final_errors(model: Invertible, x: Tensor) -> Tensor:
    with model.eval_mode():
        r = reconstruct(model, x, keep=False)
    e = r.err_l2.clone()
    e[r.failed_raise] = float("inf")
    e[r.error] = float("nan")
    return e


def _outside(constraint, x0, settings, model) -> AttackResult:
    nan = torch.full((x0.shape[0],), float("nan"), dtype=torch.float64)
    return AttackResult(constraint, "pgd", nan, _final_errors(model, x0), x0.clone(), 0, [], "outside_domain",
                        "the model refuses inputs of this constraint set (InputOutsideDomain)", settings)


def random_search(model: Invertible, x0: Tensor, *, constraint: str = "cell", x_int: Tensor | None = None,
                  levels: int | None = None, eps: float = DEFAULT_EPS, data_range: tuple[float, float] = (0.0, 1.0),
                  widen: float = DEFAULT_WIDEN, points: int = 50, seed: int = 0, batch_size: int = 4096,
                  deadline: float | None = None) -> AttackResult:
    """The baseline of :func:`pgd_attack`: ``points`` uniform draws per example in the same box
    (fewer when ``deadline`` passes)."""
    lo, hi = constraint_box(constraint, x0, x_int=x_int, levels=levels, eps=eps, data_range=data_range, widen=widen)
    g = torch.Generator().manual_seed(seed + 1)
    n = x0.shape[0]
    best = torch.full((n,), float("nan"), dtype=torch.float64)
    best_x = x0.clone()
    history = []
    with model.eval_mode(), torch.no_grad():
        for _ in range(points):
            x = _uniform(lo, hi, g)
            r = reconstruct(model, x, batch_size=batch_size, keep=False)
            err = r.err_l2.clone()
            err[r.failed_raise] = float("inf")
            err[r.outside_domain | r.error] = float("nan")
            better = ~torch.isnan(err) & (torch.isnan(best) | (err > best))
            best[better] = err[better]
            best_x[better] = x[better]
            fin = best[torch.isfinite(best)]
            history.append(float(fin.max()) if fin.numel() else math.inf)
            if deadline is not None and time.perf_counter() > deadline:
                break
    status = "outside_domain" if bool(torch.isnan(best).all()) else "ok"
    final = _final_errors(model, best_x)
    final[torch.isnan(best)] = float("nan")
    return AttackResult(constraint, "random", final, _final_errors(model, x0), best_x, len(history), history, status,
                        settings=dict(points=points, eps=eps, widen=widen, seed=seed),
                        stopped=len(history) < points)
