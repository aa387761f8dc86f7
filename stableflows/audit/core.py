"""``audit(model, data, ...) -> AuditReport``: where, on what inputs and by how much a flow stops
being invertible (issue 4; papers 000, 001 and 003 in ``../shared/papers``).

For every input family (:mod:`.families`) the audit measures per example the reconstruction error
``||x - F^-1(F(x))||`` (L2, L-inf, relative) with non-finite outputs counted (:mod:`.reconstruction`),
the same computation in a float64 copy of the model (the *shadow*), the error growth over ``repeat``
forward/inverse passes, the Jacobian spectra of forward and inverse at ``spectra_points`` points
(:mod:`.spectra`) and, for stableflows models, the per-layer localisation of the inverse pass
(:mod:`.localize`). Optionally a PGD attack searches each constraint set for inputs the model
cannot reconstruct (:mod:`.attacks`). :class:`~stableflows.audit.report.AuditReport` holds it all
and writes JSON and a self-contained HTML page.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..config import ConfigError
from ..transforms.base import ShapeError
from .adapters import Invertible, as_invertible
from .attacks import CONSTRAINTS, DEFAULT_EPS, DEFAULT_WIDEN, pgd_attack, random_search
from .families import CLIP_THRESHOLDS, DEFAULT_FAMILIES, TEMPERATURES, FamilyInput, build_family, expand_families
from .localize import GAIN_THRESHOLD, Localization, clip_activations, localize_many
from .reconstruction import Messages, Reconstruction, finite_rows, reconstruct, repeated_passes, safe_apply
from .budget import DEFAULT_BUDGET, MIN_EXAMPLES, Budget
from .progress import Progress
from .spectra import EXACT_MAX_DIM, LANCZOS_STEPS, MIN_LANCZOS, Spectra, probe_vjp_seconds, spectra
from .verdict import COULD_NOT_RUN, CRITERIA, NOT_INVERTIBLE, FamilyVerdict, Verdict, family_verdict

__all__ = ["audit", "FamilyResult", "AttackOutcome", "DEFAULT_ATTACK", "PREVIEW"]

DEFAULT_ATTACK = dict(constraints=CONSTRAINTS, examples=64, steps=50, step_size=None, eps=DEFAULT_EPS,
                      widen=DEFAULT_WIDEN, random_start=True, fixed_point_iterations=None, baseline=True, seed=0)
PREVIEW = 8  # images kept per family for the HTML report
LOCALIZE_PROBE = 4  # examples of the localisation probe under a time budget
SPECTRA_PROBE = 4  # points of the spectra probe under a time budget
RATE_PROBE = 8  # examples of the round-trip probe under a time budget


@dataclass
class FamilyResult:
    """Everything measured on one input family."""

    name: str
    kind: str  # "data" or "latent"
    description: str
    recon: Reconstruction
    errors: dict  # "l2" / "linf" / "rel" -> (n,) float64, inf = failure, nan = outside domain
    verdict: FamilyVerdict
    shadow_errors: dict | None = None
    repeated: Tensor | None = None  # (n, k)
    spectra: Spectra | None = None
    localization: Localization | None = None
    generation: dict | None = None  # latent families: how generating x = F^-1(z) went
    preview: dict | None = None  # {"x": (k, C, H, W), "x_hat": ...} for image data
    temperature: float | None = None
    clip: float | None = None
    seconds: float = 0.0  # of its round trips


@dataclass
class AttackOutcome:
    constraint: str
    pgd: Any  # AttackResult
    random: Any | None
    errors: dict
    verdict: FamilyVerdict
    preview: dict | None = None
    from_random: Tensor | None = None  # per example: the random baseline found the worse point


def _worst_of(pgd, base) -> Tensor | None:
    """Per example, whether the random baseline's best point is worse (a larger error; non-finite
    beats finite) than PGD's: the attack's verdict judges the worse of the two, so a non-invertible
    input that either search found is reported."""
    if base is None or base.status != "ok":
        return None
    return _rank(base.best_err) > _rank(pgd.best_err)


def _rank(err: Tensor) -> Tensor:
    """Errors ordered for :func:`_worst_of`: NaN (not evaluated, outside the domain) below everything."""
    return torch.where(torch.isnan(err), torch.full_like(err, -1.0), err)


def _to_model_space(data: Tensor, levels: int | None, seed: int) -> Tensor:
    if levels is None:
        return data
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(data.shape, generator=g, dtype=torch.float64).to(data.device)
    return ((data.double() + u) / levels).to(data.dtype if data.is_floating_point() else torch.float32)


def _prepare(data, levels, train):
    """``(test, train, levels)`` from a Splits, a tensor, or None."""
    if data is None:
        return None, train, levels
    if hasattr(data, "test") and hasattr(data, "levels"):  # stableflows.data.Splits
        if levels is not None and levels != data.levels:
            raise ConfigError(f"levels={levels} contradicts the dataset's {data.levels}")
        return data.test, (data.train if train is None else train), data.levels
    if not torch.is_tensor(data):
        raise ShapeError(f"data must be a tensor (B, *shape) or a stableflows Splits, got {type(data).__name__}")
    if data.dim() < 2 or data.shape[0] == 0:
        raise ShapeError(f"data must have shape (B, *event_shape) with B >= 1, got {tuple(data.shape)}")
    if levels is not None:
        from ..metrics import check_levels

        check_levels(data.double(), levels, "audit data")
    return data, train, levels


def _select(err: Tensor, valid: Tensor, k: int, seed: int) -> Tensor:
    """Up to ``k`` valid indices: the worst half by error, the rest at random; sorted."""
    idx = valid.nonzero().flatten()
    if idx.numel() <= k:
        return idx
    e = torch.nan_to_num(err[idx], nan=-1.0, posinf=math.inf)
    worst = idx[torch.argsort(e, descending=True, stable=True)[: k // 2]]
    rest = idx[~torch.isin(idx, worst)]
    g = torch.Generator().manual_seed(seed)
    pick = rest[torch.randperm(rest.numel(), generator=g)[: k - worst.numel()]]
    return torch.sort(torch.cat([worst, pick])).values


def _worst(err: Tensor, valid: Tensor, k: int) -> Tensor:
    idx = valid.nonzero().flatten()
    e = torch.nan_to_num(err[idx], nan=-1.0, posinf=math.inf)
    return torch.sort(idx[torch.argsort(e, descending=True, stable=True)[:k]]).values


def _errors(rec: Reconstruction, failed: Tensor | None = None, error: Tensor | None = None) -> dict[str, Tensor]:
    """Errors with ``inf`` for every failed example (a numerical failure raised, or ``failed``)
    and NaN for the examples the audit could not run."""
    out = {"l2": rec.err_l2.clone(), "linf": rec.err_linf.clone(), "rel": rec.err_rel.clone()}
    err = rec.error if error is None else (rec.error | error)
    bad = rec.failed_raise
    if failed is not None:
        bad = bad | failed
    bad = bad & ~err
    for e in out.values():
        e[bad] = math.inf
        e[err] = math.nan
    return out


def _generate(model: Invertible, z: Tensor, clip: float | None, batch_size: int):
    """``x = F^-1(z)`` (activations clipped at ``clip``): ``(Applied, clipped entries, note)``."""
    counts: dict = {}
    clip_ctx = model.clip_context(clip) if clip is not None else None
    if clip_ctx is not None:
        with clip_ctx as counts, torch.no_grad():
            app = safe_apply(model.inverse, z, batch_size=batch_size, root=model.traceable)
    else:
        with torch.no_grad():
            app = safe_apply(model.inverse, z, batch_size=batch_size, root=model.traceable)
    note = None
    if clip is not None and clip_ctx is None:
        note = f"activation clipping needs per-layer access ({model.layers_note}): generated without clipping"
    return app, dict(counts), note


def _round_trips(model: Invertible, items: list[tuple[FamilyInput, Tensor | None]], batch_size: int) -> list:
    """:func:`_round_trip` of several families, each in its own calls (so that every family's
    numbers are those of its own batches, reproducible by recomputing that family alone)."""
    out = []
    for fam, x in items:
        gen = None
        if fam.kind == "latent":
            app, counts, note = _generate(model, fam.z.to(model.dtype), fam.clip, batch_size)
            gen = (app.out, app.raised, app.error, app.rows, counts, note)
            x_in = None if app.out is None else torch.nan_to_num(app.out, nan=0.0, posinf=0.0, neginf=0.0)
        else:
            x_in = x.to(model.dtype)
        rec = reconstruct(model, x_in, batch_size=batch_size) if x_in is not None and x_in.shape[0] else None
        out.append(_assemble(model, fam, x, x_in, rec, gen))
    return out


def _assemble(model, fam, x, x_in, rec, gen):
    """The tuple ``(x, rec, errors, outside_domain, generation, raised, error, error_text)`` of one family."""
    if fam.kind != "latent":
        if rec is None:
            rec = _no_reconstruction(x.shape[0], torch.zeros(x.shape[0], dtype=torch.bool))
        return x_in, rec, _errors(rec), rec.outside_domain, None, rec.failed_raise, rec.error, rec.first_error()
    out, g_raised, g_error, g_rows, counts, note = gen
    n = fam.z.shape[0]
    fin = finite_rows(out, n) & ~g_raised
    msgs = Messages.from_rows(g_rows)
    info = {"n": n, "nonfinite": int((~fin & ~g_raised).sum()), "raised": int((g_raised & ~g_error).sum()),
            "could_not_run": int(g_error.sum()), "messages": msgs.as_dict()}
    if fam.clip is not None:
        info["clipped_entries"] = {k: v for k, v in counts.items() if v}
        if note:
            info["note"] = note
    gen_failed, gen_raised = ~fin & ~g_error, g_raised & ~g_error
    if rec is None:  # every example raised
        rec = _no_reconstruction(n, g_error)
    x_out = out if out is not None else torch.full((n, 1), math.nan, dtype=model.dtype)
    # the model's own outputs must map back: a refusal is a failure here, and a failed generation too
    error = g_error | rec.error
    raised = (gen_raised | (rec.raised & ~rec.error)) & ~error
    rec.outside_domain = torch.zeros_like(rec.outside_domain)
    rec.error = error
    rec.raised = rec.raised | g_raised
    rec.rows = [g if g is not None else r for g, r in zip(g_rows, rec.rows)]
    text = msgs.first_text("error") or rec.first_error()
    return x_out, rec, _errors(rec, gen_failed | raised), None, info, raised, error, text


def _round_trip(model: Invertible, fam: FamilyInput, x: Tensor | None, batch_size: int):
    """Reconstruction of a family with ``model``:
    ``(x, rec, errors, outside_domain, generation, raised, error, error_text)``."""
    return _round_trips(model, [(fam, x)], batch_size)[0]


def _no_reconstruction(n: int, error: Tensor) -> Reconstruction:
    inf = torch.full((n,), math.inf, dtype=torch.float64)
    no = torch.zeros(n, dtype=torch.bool)
    return Reconstruction(inf, inf.clone(), inf.clone(), no, no.clone(), no.clone(), torch.ones(n, dtype=torch.bool),
                          {}, error=error.clone())


def _fingerprint(module) -> Tensor | None:
    """A float64 sum per parameter (detects a model that changes its own weights while audited)."""
    if module is None:
        return None
    ps = [p.detach().double().sum().cpu() for p in module.parameters()]
    return torch.stack(ps) if ps else None


def _recon_phase(m: Invertible, built: dict[str, FamilyInput], plan: Budget, batch_size: int, prog: Progress
                 ) -> dict[str, tuple[FamilyInput, tuple]]:
    """Round trips of every family, each family in one go (its numbers reproducible by recomputing
    it alone). Under a budget each family gets as many examples (at least :data:`MIN_EXAMPLES`)
    as the time per example measured so far (first on a probe of a few test examples) allows
    before the round trips' deadline."""
    names = list(built)
    out: dict = {}
    rate = None
    if plan.limited and names:
        f0 = built[names[0]]
        probe = f0.head(min(f0.size, RATE_PROBE))
        t0 = time.perf_counter()
        _round_trip(m, probe, probe.x, batch_size)
        rate = (time.perf_counter() - t0) / max(probe.size, 1)
    spent, done, cut = 0.0, 0, []
    for i, name in enumerate(names):
        fam = built[name]
        if plan.limited:
            r_now = spent / done if done else rate
            share = (plan.recon_deadline() - time.perf_counter()) / (len(names) - i)
            keep = min(fam.size, max(MIN_EXAMPLES, math.floor(share / max(r_now, 1e-9))))
            if keep < fam.size:
                cut.append(f"{name} {keep}/{fam.size}")
                fam = fam.head(keep)
        prog.part(f"{name}: round trips of {fam.size} examples ({i + 1}/{len(names)} families)")
        t0 = time.perf_counter()
        out[name] = (fam, _round_trip(m, fam, fam.x, batch_size), time.perf_counter() - t0)
        spent += out[name][2]
        done += fam.size
    if cut:
        plan.cut("round trips", "examples per family " + ", ".join(cut) + f" (at least {MIN_EXAMPLES} each)")
    return out


def _not_built(fam_name: str, kind: str, description: str, e: BaseException) -> FamilyResult:
    """The result of a family whose inputs could not be built (e.g. samples of a model whose
    forward raised on every data example, so its latent shape is unknown)."""
    from .reconstruction import message

    text = message(e)
    empty = torch.zeros(0, dtype=torch.float64)
    no = torch.zeros(0, dtype=torch.bool)
    rec = Reconstruction(empty, empty.clone(), empty.clone(), no, no.clone(), no.clone(), no.clone(), {text: 1},
                         error=no.clone(), message_kinds={text: "error"})
    v = FamilyVerdict(fam_name, COULD_NOT_RUN, 0, 0, 0, 0, 0, math.nan, math.nan, error=f"inputs not built: {text}")
    return FamilyResult(fam_name, kind, description, rec, {"l2": empty, "linf": empty.clone(), "rel": empty.clone()},
                        v)


def _family_result(fam: FamilyInput, trips: tuple, opts: dict, n_total: int | None = None) -> FamilyResult:
    """A family's result from its round trips, with the provisional verdict (the shadow comes later)."""
    x, rec, errors, outside, generation, raised, error, text = trips
    res = FamilyResult(fam.name, fam.kind, fam.description, rec, errors, None, None,
                       generation=generation, temperature=fam.temperature, clip=fam.clip)
    res._raw = dict(outside=outside, raised=raised, error=error, text=text, n_total=n_total)
    res._fam = fam
    _finish_verdict(res, opts)
    n = rec.n
    res._x = x
    res._valid = finite_rows(x, n) & rec.finite_forward & ~rec.outside_domain & ~raised & ~error
    if len(x.shape) == 4 and x.shape[0] > 0:
        k = min(PREVIEW, n)
        res.preview = {"x": x[:k].detach().double().cpu(),
                       "x_hat": None if rec.x_hat is None else rec.x_hat[:k].detach().double().cpu()}
    rec.z = rec.x_hat = None  # keep the report small
    return res


def _finish_verdict(r: FamilyResult, opts: dict) -> None:
    raw = r._raw
    r.verdict = family_verdict(r.name, r.errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                               outside_domain=raw["outside"], raised=raw["raised"], shadow_errors=r.shadow_errors,
                               shadow_ran=getattr(r, "_shadow_ran", None), error=raw["error"],
                               error_text=raw["text"])
    if raw.get("n_total") is not None and raw["n_total"] > r.recon.n:
        r.verdict.n_total = int(raw["n_total"])


def _failing(r: FamilyResult, opts: dict) -> Tensor:
    """Examples of a family that fail the tolerance (or are non-finite / raised a failure)."""
    e = r.errors[opts["criterion"]]
    raw = r._raw
    out = raw["outside"] if raw["outside"] is not None else torch.zeros_like(raw["error"])
    checked = ~out & ~raw["error"]
    return checked & (raw["raised"] | ~torch.isfinite(e) | (e > opts["tolerance"]))


def _subset(fam: FamilyInput, x: Tensor, idx: Tensor) -> tuple[FamilyInput, Tensor | None]:
    sub = FamilyInput(fam.name, fam.kind, fam.description, z=None if fam.z is None else fam.z[idx].double(),
                      temperature=fam.temperature, clip=fam.clip)
    return sub, (None if fam.kind == "latent" else x[idx].double())


def _fit(wanted: int, rate: float | None, deadline: float, floor: int = 0) -> int:
    """How many of ``wanted`` items of ``rate`` seconds each fit before ``deadline``."""
    if rate is None or not math.isfinite(deadline):
        return wanted
    left = deadline - time.perf_counter()
    return int(min(wanted, max(floor, math.floor(left / max(rate, 1e-9)))))


def _shadow_phase(fams, results: list[FamilyResult], sh: Invertible, opts: dict, plan: Budget,
                  notes: list[str]) -> None:
    """Float64 errors of every family: the failing examples first (their cause), then the others,
    as many as the budget allows (all of them without a budget)."""
    deadline = plan.deadline("shadow")
    t_start = time.perf_counter()
    todo = [(f, r) for f, r in zip(fams, results) if f is not None and r.recon.n]
    stats = {"n": 0, "seconds": 0.0, "errors": {}}
    for f, r in todo:
        n = r.recon.n
        r.shadow_errors = {k: torch.full((n,), math.nan, dtype=torch.float64) for k in ("l2", "linf", "rel")}
        r._shadow_ran = torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(opts["seed"] + 17)
    stages = []
    for f, r in todo:
        fail = _failing(r, opts) & ~r._raw["error"]
        rest = ~fail & ~r._raw["error"]
        perm = torch.randperm(r.recon.n, generator=g)
        stages.append((0, f, r, perm[fail[perm]]))
        stages.append((1, f, r, perm[rest[perm]]))
    stages.sort(key=lambda t: t[0])  # every family's failures before anybody's passes
    queue = deque(t for t in stages if t[3].numel())
    while queue:
        st, f, r, idx = queue.popleft()
        rate = stats["seconds"] / stats["n"] if stats["n"] else None
        if not plan.limited:
            k = idx.numel()
        elif rate is None:  # the first call measures the rate
            k = min(idx.numel(), MIN_EXAMPLES)
        else:
            k = _fit(idx.numel(), rate, deadline)
            if k <= 0:
                break
        pick = idx[:k]
        t0 = time.perf_counter()
        sub, x64 = _subset(f, r._x, pick)
        _, _, errs, _, _, _, err64, text = _round_trip(sh, sub, x64, opts["batch_size"])
        stats["seconds"] += time.perf_counter() - t0
        stats["n"] += k
        for key in r.shadow_errors:
            r.shadow_errors[key][pick] = errs[key]
        r._shadow_ran[pick] = ~err64
        if bool(err64.any()):
            stats["errors"].setdefault(text, []).append(f.name)
        if k < idx.numel() and rate is None:
            queue.appendleft((st, f, r, idx[k:]))
    for text, names in stats["errors"].items():
        notes.append(f"float64 shadow could not run some examples of {', '.join(names)}: {text}")
    short = [(r.name, int(r._shadow_ran.sum()), int((~r._raw["error"]).sum())) for _, r in todo]
    short = [t for t in short if t[1] < t[2]]
    if plan.limited and short:
        plan.cut("shadow", "float64 replay of " + ", ".join(f"{nm} {a}/{b}" for nm, a, b in short)
                 + " examples (failing examples first)")
    plan.done("shadow", time.perf_counter() - t_start)


def _repeated_phase(results: list[FamilyResult], m: Invertible, opts: dict, plan: Budget) -> None:
    deadline = plan.deadline("repeated")
    t_start = time.perf_counter()
    todo = [r for r in results if getattr(r, "_valid", None) is not None and bool(r._valid.any())]
    rate = None  # seconds per example and pass
    cut = []
    for i, r in enumerate(todo):
        idx = _select(r.errors["l2"], r._valid, opts["repeat_points"], opts["seed"] + i)
        if plan.limited:
            share = (deadline - time.perf_counter()) / (len(todo) - i)
            per = (rate if rate is not None else getattr(r, "seconds", 0.0) / max(r.recon.n, 1)) * opts["repeat"]
            k = min(idx.numel(), max(0, math.floor(share / max(per, 1e-9))))
            if k < idx.numel():
                cut.append(f"{r.name} {k}/{idx.numel()}")
            idx = idx[:k] if k < idx.numel() else idx
        if not idx.numel():
            continue
        t0 = time.perf_counter()
        rep = torch.full((r.recon.n, opts["repeat"]), math.nan, dtype=torch.float64)
        rep[idx] = repeated_passes(m, r._x[idx], opts["repeat"], batch_size=opts["batch_size"],
                                   deadline=deadline if plan.limited else None)
        r.repeated = rep
        dt = time.perf_counter() - t0
        rate = dt / (idx.numel() * opts["repeat"]) if rate is None else 0.5 * (rate + dt / (idx.numel() * opts["repeat"]))
    if cut:
        plan.cut("repeated", "points per family " + ", ".join(cut))
    plan.done("repeated", time.perf_counter() - t_start)


def _batched_spectra(results: list[FamilyResult], m: Invertible, sh: Invertible | None, opts: dict, plan: Budget,
                     notes: list[str]) -> None:
    """Spectra of every family in one batch (the cost is dominated by one backward pass per
    output dimension, nearly independent of the number of points); under a budget the method,
    the Lanczos steps and the points are chosen from a probe of one vector-Jacobian product."""
    deadline = plan.deadline("spectra")
    t_start = time.perf_counter()
    for i, r in enumerate(results):
        if getattr(r, "_valid", None) is not None and bool(r._valid.any()):
            r._spectra_idx = _select(r.errors["l2"], r._valid, opts["spectra_points"], opts["seed"] + i)
    todo = [r for r in results if getattr(r, "_spectra_idx", None) is not None and r._spectra_idx.numel()]
    if not todo:
        plan.done("spectra", 0.0)
        return
    target = sh if sh is not None else m
    asked = opts["spectra_method"]
    method, steps = asked, opts["lanczos_steps"]
    d = math.prod(todo[0]._x.shape[1:])
    if method == "auto":
        method = "exact" if d <= opts["exact_max_dim"] else "iterative"
    if plan.limited and asked != "exact":
        xs = torch.cat([r._x[r._spectra_idx].to(target.dtype) for r in todo], 0)
        j = min(SPECTRA_PROBE, xs.shape[0])
        with target.eval_mode():
            probe = probe_vjp_seconds(target, xs[:j])
        if probe is not None:  # seconds per point (costs grow at most linearly with the points)
            per = (probe[0] / j, probe[1] / j)
            method, steps, keep = _plan_spectra(method, d, steps, per, deadline - time.perf_counter(),
                                                [r._spectra_idx.numel() for r in todo])
            changes = []
            if method == "iterative" and d <= opts["exact_max_dim"] and asked == "auto":
                changes.append(f"Lanczos ({steps} steps) instead of exact Jacobians")
            elif method == "iterative" and steps < opts["lanczos_steps"]:
                changes.append(f"{steps} Lanczos steps instead of {opts['lanczos_steps']}")
            if keep < max(r._spectra_idx.numel() for r in todo):
                for r in todo:
                    r._spectra_idx = r._spectra_idx[:keep]
                changes.append(f"{keep} points per family instead of up to {opts['spectra_points']}")
            if changes:
                plan.cut("spectra", "; ".join(changes) + f" (per point: graphs {per[0]:.3g}s, one vector-Jacobian "
                                                         f"product {per[1]:.3g}s)")
    xs = torch.cat([r._x[r._spectra_idx].to(target.dtype) for r in todo], 0)
    idx = torch.cat([r._spectra_idx for r in todo])
    with target.eval_mode():
        allsp = spectra(target, xs, idx, method=method, steps=steps, exact_max_dim=opts["exact_max_dim"],
                        seed=opts["seed"], deadline=deadline if plan.limited and method == "iterative" else None)
    if allsp.steps_used is not None and plan.limited and min(s for s in allsp.steps_used if s) < steps:
        plan.cut("spectra", f"Lanczos stopped at its deadline after {allsp.steps_used[0]} (forward) and "
                            f"{allsp.steps_used[1]} (inverse) steps")
    if allsp.errors:
        notes.append("spectra could not be computed: " + "; ".join(allsp.errors))
    start = 0
    for r in todo:
        k = r._spectra_idx.numel()
        r.spectra = _slice_spectra(allsp, start, start + k)
        start += k
    plan.done("spectra", time.perf_counter() - t_start)


def _plan_spectra(method: str, d: int, steps: int, per: tuple[float, float], share: float, points: list[int]):
    """``(method, Lanczos steps, points per family)`` fitting ``share`` seconds, from the probe's
    seconds per point ``(t_graph, t_vjp)`` (building the graphs of forward and inverse, one
    vector-Jacobian product through each): exact Jacobians cost ``t_graph + d t_vjp`` per point,
    ``k`` Lanczos steps about ``2 t_graph + 3 k t_vjp`` (a Jacobian-vector product by double
    backward is two)."""
    t_graph, t_vjp = per
    total = sum(points)
    most = max(points)
    if method == "exact" and total * (t_graph + d * t_vjp) <= share:
        return "exact", steps, most
    k = steps
    while k > MIN_LANCZOS and total * (2 * t_graph + 3 * k * t_vjp) > share:
        k = max(MIN_LANCZOS, k // 2)
    cost = 2 * t_graph + 3 * k * t_vjp
    if total * cost <= share:
        return "iterative", k, most
    keep = max(1, math.floor(share / (cost * len(points))))
    return "iterative", k, min(keep, most)

def _slice_spectra(s: Spectra, a: int, b: int) -> Spectra:
    def cut(t):
        return None if t is None else t[a:b].clone()
    return Spectra(s.method, s.dtype, s.index[a:b].clone(), cut(s.fwd_smin), cut(s.fwd_smax), cut(s.inv_smin),
                   cut(s.inv_smax), cut(s.logdet_analytic), cut(s.logdet_numeric), steps=s.steps)


def _localization_groups(fams, results, m: Invertible, k: int):
    groups, owners = [], []
    for fam, r in zip(fams, results):
        if r.verdict.status == COULD_NOT_RUN or getattr(r, "_x", None) is None:
            continue
        if fam.kind == "latent":
            if fam.clip is not None:
                continue  # the clipped pass is not the model's inverse; see generation["clipped_entries"]
            # the failing latents first (their errors are inf), as for data: the first k codes of a
            # family that fails on a rare tail would trace only healthy examples
            idx = _worst(r.errors["l2"], ~r.recon.error, k)
            groups.append((None, fam.z[idx].to(m.dtype)))
        else:
            if not bool(r._valid.any()):
                continue
            idx = _worst(r.errors["l2"], r._valid, k)
            groups.append((r._x[idx], None))
        owners.append(r)
    return groups, owners


def _batched_localization(fams: list[FamilyInput], results: list[FamilyResult], m: Invertible, opts: dict,
                          notes: list[str], plan: Budget) -> None:
    deadline = plan.deadline("localization")
    t_start = time.perf_counter()
    k = opts["localize_points"]
    groups, owners = _localization_groups(fams, results, m, k)
    if not groups:
        plan.done("localization", 0.0)
        return
    path = m.layers
    check = next((x for x, _ in groups if x is not None), None)
    if check is not None:
        with torch.no_grad():
            why = path.verify(check, m.forward(check))
        if why:
            notes.append(f"no per-layer localisation through {path.description}: {why}")
            for r in owners:
                r.localization = Localization([], 0, "roundtrip", None, "", path=path.description,
                                              note=f"not localised: {why}")
            plan.done("localization", time.perf_counter() - t_start)
            return
    kw = dict(tolerance=opts["tolerance"], gain_threshold=opts["gain_threshold"], seed=opts["seed"])
    if plan.limited:
        # failing families first; a probe on one group gives the seconds per localised example
        order = sorted(range(len(owners)), key=lambda i: owners[i].verdict.status != NOT_INVERTIBLE)
        groups, owners = [groups[i] for i in order], [owners[i] for i in order]
        x0, z0 = groups[0]
        j = min(LOCALIZE_PROBE, (x0 if x0 is not None else z0).shape[0])
        t0 = time.perf_counter()
        localize_many(path, [(None if x0 is None else x0[:j], None if z0 is None else z0[:j])], **kw)
        rate = (time.perf_counter() - t0) / j
        per_group = _fit(k, rate * len(groups), deadline)
        if per_group >= 1:
            groups = [(None if x is None else x[:per_group], None if z is None else z[:per_group]) for x, z in groups]
            if per_group < k:
                plan.cut("localization", f"the worst {per_group} examples per family instead of {k}")
        else:
            n_groups = max(1, _fit(len(groups), rate, deadline))
            skipped = [r.name for r in owners[n_groups:]]
            groups = [(None if x is None else x[:1], None if z is None else z[:1]) for x, z in groups[:n_groups]]
            owners = owners[:n_groups]
            plan.cut("localization", f"one example per family, not localised: {', '.join(skipped) or 'none'}")
    locs = localize_many(path, groups, **kw, deadline=deadline if plan.limited else None)
    for r, loc in zip(owners, locs):
        r.localization = loc
        r.verdict.culprit, r.verdict.culprit_reason = loc.culprit, loc.reason
    plan.done("localization", time.perf_counter() - t_start)


def _forward_culprit(r: FamilyResult, m: Invertible, opts: dict) -> None:
    """Name the layer where the *forward* first turns non-finite, for a data family whose examples
    never reach the inverse (the per-layer localisation only walks examples with a finite ``z``)."""
    if r.kind != "data" or r.verdict.culprit is not None or m.layers is None:
        return
    x = getattr(r, "_x", None)
    rc = r.recon
    bad = (~rc.finite_forward & ~rc.outside_domain & ~rc.raised).nonzero().flatten()
    if x is None or not bad.numel():
        return
    xb = x[bad[: opts["localize_points"]]]
    t = m.layers.trace(x=xb)
    for rec in t.fwd:
        if not bool(rec.out_finite.all()):
            r.verdict.culprit = rec.name
            r.verdict.culprit_reason = (f"first non-finite output on the forward path "
                                        f"({int((~rec.out_finite).sum())} of {xb.shape[0]} traced examples)")
            return


def _culprit_from_messages(r: FamilyResult) -> None:
    """Name the layer that raised most often when the localisation found nothing (e.g. the forward
    refusing the model's own samples)."""
    if r.verdict.culprit is not None or not r.verdict.n_raised:
        return
    kinds = dict(r.recon.message_kinds)
    msgs = {k: v for k, v in r.recon.messages.items() if kinds.get(k) != "error"}
    for k, v in (r.generation or {}).get("messages", {}).items():
        if kinds.get(k) != "error":
            msgs[k] = msgs.get(k, 0) + v
    layered = [(v, k) for k, v in msgs.items() if k.startswith("[")]
    if layered:
        count, msg = max(layered)
        r.verdict.culprit = msg[1:msg.index("]")]
        r.verdict.culprit_reason = f"raised on {count} examples: {msg[msg.index(']') + 2:]}"


def _attack_options(kw: dict | None) -> dict:
    kw = {**DEFAULT_ATTACK, **(kw or {})}
    unknown = set(kw) - set(DEFAULT_ATTACK) - {"data_range"}
    if unknown:
        raise ConfigError(f"unknown attack option(s) {sorted(unknown)}; known: {sorted(DEFAULT_ATTACK)}, data_range")
    return kw


def _attack(m: Invertible, sh: Invertible | None, test: Tensor, x_int: Tensor | None, levels: int | None, kw: dict,
            opts: dict, timings: dict, notes: list[str], progress=None, plan: Budget | None = None
            ) -> dict[str, AttackOutcome]:
    plan = plan or Budget(None, [])
    deadline = plan.deadline("attack")
    t_start = time.perf_counter()
    k = min(int(kw["examples"]), test.shape[0])
    x0 = test[:k].to(m.dtype)
    xi = None if x_int is None else x_int[:k]
    rng = kw.get("data_range") or ((0.0, 1.0) if levels is not None else (float(test.min()), float(test.max())))
    out = {}
    cons = [c for c in kw["constraints"] if not (c == "cell" and levels is None)]
    if len(cons) < len(kw["constraints"]):
        notes.append("attack 'cell' skipped: the data are not discrete (no levels)")
    for ci, c in enumerate(cons):
        # this constraint's share of the attack's time: PGD 2/3, the random baseline 1/3
        left = (deadline - time.perf_counter()) / (len(cons) - ci)
        pgd_deadline = time.perf_counter() + (left * 2 / 3 if kw["baseline"] else left)
        if progress is not None:
            progress.part(f"PGD attack pgd:{c} ({k} examples, {kw['steps']} steps)")
        t0 = time.perf_counter()
        common = dict(constraint=c, x_int=xi, levels=levels, eps=kw["eps"], data_range=rng, widen=kw["widen"])
        pgd = pgd_attack(m, x0, steps=kw["steps"], step_size=kw["step_size"], random_start=kw["random_start"],
                         fixed_point_iterations=kw["fixed_point_iterations"], seed=kw["seed"],
                         deadline=pgd_deadline if plan.limited else None, **common)
        timings["attack"] += time.perf_counter() - t0
        if pgd.stopped:
            plan.cut("attack", f"pgd:{c} stopped after {pgd.evaluations - 1} of {kw['steps']} steps")
        points = pgd.evaluations if pgd.stopped else int(kw["steps"]) + 1
        base = None
        if kw["baseline"]:
            t0 = time.perf_counter()
            # the same number of points: PGD evaluates its start and one point per step
            base = random_search(m, x0, points=points, seed=kw["seed"],
                                 deadline=(time.perf_counter() + left / 3) if plan.limited else None, **common)
            timings["attack_baseline"] += time.perf_counter() - t0
            if base.stopped:
                plan.cut("attack", f"pgd:{c} random baseline stopped after {base.evaluations} points")
        name = f"pgd:{c}"
        take = _worst_of(pgd, base) if pgd.status != "outside_domain" else None
        x_adv = pgd.best_x
        if take is not None and bool(take.any()):
            x_adv = torch.where(take.view(-1, *([1] * (x0.dim() - 1))), base.best_x, pgd.best_x)
            notes.append(f"{name}: the random baseline found the worse point for {int(take.sum())} of {k} examples; "
                         f"the verdict judges the worse of the two searches")
        if pgd.status == "outside_domain":
            nan = torch.full((k,), math.nan, dtype=torch.float64)
            errors = {"l2": nan, "linf": nan.clone(), "rel": nan.clone()}
            v = family_verdict(name, errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                               outside_domain=torch.ones(k, dtype=torch.bool))
        else:
            with m.eval_mode():
                rec = reconstruct(m, x_adv)
            errors = _errors(rec)
            shadow_errors = shadow_ran = None
            if sh is not None:  # replay the adversarial points in float64: precision or the model?
                t0 = time.perf_counter()
                with sh.eval_mode():
                    rec64 = reconstruct(sh, x_adv.double(), keep=False)
                shadow_errors, shadow_ran = _errors(rec64), ~rec.error & ~rec64.error
                if bool(rec64.error.any()):
                    notes.append(f"float64 shadow could not run {int(rec64.error.sum())} examples of {name}: "
                                 f"{rec64.first_error()}")
                timings["shadow"] += time.perf_counter() - t0
            v = family_verdict(name, errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                               outside_domain=rec.outside_domain, raised=rec.failed_raise,
                               shadow_errors=shadow_errors, shadow_ran=shadow_ran, error=rec.error,
                               error_text=rec.first_error() or pgd.message)
        preview = None
        if x_adv.dim() == 4:
            j = min(PREVIEW, k)
            with torch.no_grad(), m.eval_mode():
                r = safe_apply(lambda t: m.inverse(m.forward(t)), x_adv[:j])
            preview = {"x": x0[:j].double().cpu(), "x_adv": x_adv[:j].double().cpu(),
                       "x_hat": None if r.out is None else r.out.double().cpu()}
        out[name] = AttackOutcome(c, pgd, base, errors, v, preview, take)
    plan.done("attack", time.perf_counter() - t_start)
    return out


def audit(model, data: Tensor | Any = None, *, inverse: Callable | None = None, levels: int | None = None,
          train: Tensor | None = None, families: Sequence[str] | str = DEFAULT_FAMILIES, n: int | None = None,
          tolerance: float = 1e-3, criterion: str = "l2", repeat: int = 5, repeat_points: int = 64,
          shadow: bool = True,
          spectra_points: int = 32, spectra_method: str = "auto", lanczos_steps: int = LANCZOS_STEPS,
          exact_max_dim: int = EXACT_MAX_DIM, localize: bool = True, localize_points: int = 32,
          gain_threshold: float = GAIN_THRESHOLD, attack: str | None = None, attack_kwargs: dict | None = None,
          temperatures: Sequence[float] = TEMPERATURES, clip_thresholds: Sequence[float] = CLIP_THRESHOLDS,
          batch_size: int = 512, seed: int = 0, dequantize_seed: int = 0, progress: bool | str = False,
          budget: float | None = DEFAULT_BUDGET, context: Tensor | None = None, train_context: Tensor | None = None):
    """Audit the invertibility of ``model`` on ``data`` and return an
    :class:`~stableflows.audit.report.AuditReport` (``.verdict``, ``.to_json()``, ``.to_html(path)``).

    Args:
        model: a stableflows Flow/Transform, a flow of normflows / zuko / FrEIA / nflows, a module
            following the layer protocol, or a pair ``(forward, inverse)`` of callables (or give
            ``inverse=``) (:mod:`.adapters`).
        data: held-out data ``(B, *shape)`` -- integer levels when ``levels`` is given (dequantised
            here with fixed noise, seed ``dequantize_seed``), model-space values otherwise -- or a
            stableflows ``Splits`` (its test split, levels and training split). None audits latent
            families only.
        families: names or groups (:mod:`.families`), a list or a comma-separated string.
        n: examples per family (default: as many as the test data).
        tolerance, criterion: a family is invertible when every example reconstructs finitely
            with ``criterion`` error (``"l2"``, ``"linf"``, ``"rel"``) ``<= tolerance``.
        repeat, repeat_points: forward/inverse passes of the error-growth curve (0 disables), on
            up to ``repeat_points`` examples per family (the worst half and a random rest).
        shadow: also run the float64 copy of the model.
        spectra_points, spectra_method, lanczos_steps, exact_max_dim: Jacobian spectra per family
            (``"auto"``: exact up to ``exact_max_dim`` dimensions, Lanczos above, and Lanczos where the
            budget cannot afford the exact Jacobians).
        localize, localize_points, gain_threshold: per-layer localisation on the worst examples.
        attack: None or ``"pgd"``; ``attack_kwargs`` override :data:`DEFAULT_ATTACK` (constraints,
            examples, steps, step_size, eps, widen, random_start, fixed_point_iterations, baseline,
            seed, data_range).
        temperatures, clip_thresholds: of the ``samples`` and ``clipped`` groups.
        progress: True (a line per part), ``"periodic"`` (a line every 30 s) or False; to stderr.
        budget: seconds for the whole audit (None: no limit). The round trips of every family are
            never cut; the float64 shadow, localisation, spectra, repeated passes and the attack
            share what is left (:mod:`.budget`) and the report says what was cut.
        context, train_context: of a conditional flow, one context row per example of ``data`` /
            ``train`` (a labelled ``Splits``: its one-hot labels); audited one context at a time
            (:mod:`.conditional`).
    """
    args = dict(locals())
    from ..transforms.base import requires_context
    from .report import AuditReport

    if context is not None or train_context is not None or (isinstance(model, torch.nn.Module) and requires_context(model)):
        from .conditional import audit_conditional  # a conditional flow: one audit per context, merged

        return audit_conditional(audit, **args)

    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if not tolerance > 0:
        raise ConfigError(f"tolerance must be > 0, got {tolerance}")
    if attack not in (None, "pgd"):
        raise ConfigError(f"unknown attack {attack!r}; choose None or 'pgd'")
    if budget is not None and not budget > 0:
        raise ConfigError(f"budget must be > 0 seconds (or None for no limit), got {budget}")
    t_start = time.perf_counter()
    prog = Progress(progress)
    timings: dict[str, float] = defaultdict(float)
    notes: list[str] = []
    m = as_invertible(model, inverse)
    notes += m.notes
    before = _fingerprint(m.module)
    test_int, train_int, levels = _prepare(data, levels, train)
    names = expand_families(families, temperatures=temperatures, clip_thresholds=clip_thresholds)
    if test_int is None and any(nm in ("test", "train") or not nm.startswith(("samples", "clipped")) for nm in names):
        raise ConfigError(f"families {names} need data; give data= or only samples/clipped families")
    attack_kw = None
    if attack == "pgd":
        if test_int is None:
            raise ConfigError("the PGD attack needs data")
        attack_kw = _attack_options(attack_kwargs)
    opts = dict(batch_size=batch_size, tolerance=tolerance, criterion=criterion, repeat=repeat,
                repeat_points=repeat_points,
                spectra_points=spectra_points, spectra_method=spectra_method, lanczos_steps=lanczos_steps,
                exact_max_dim=exact_max_dim, localize=localize, localize_points=localize_points,
                gain_threshold=gain_threshold, seed=seed)
    plan = Budget(budget, parts=[p for p, on in (("shadow", shadow), ("localization", localize),
                                                   ("spectra", spectra_points > 0), ("repeated", repeat > 0),
                                                   ("attack", attack == "pgd")) if on])
    results: dict[str, FamilyResult] = {}
    attacks: dict[str, AttackOutcome] = {}
    with m.eval_mode():
        test = None if test_int is None else _to_model_space(test_int, levels, dequantize_seed).to(m.dtype)
        tr = None if train_int is None else _to_model_space(train_int, levels, dequantize_seed + 1).to(m.dtype)
        if test is not None and m.latent_shape is None:
            with torch.no_grad():
                probe = safe_apply(m.forward, test[:batch_size], root=m.traceable)
            if probe.out is not None and not bool(probe.raised.all()):
                m.latent_shape = tuple(probe.out.shape[1:])
        sh = None
        if shadow:
            try:
                sh = m.shadow(torch.float64)
            except Exception as e:  # noqa: BLE001 - reported, the audit goes on without it
                notes.append(f"no float64 shadow: {type(e).__name__}: {e}")
            if sh is None and not any(x.startswith("no float64 shadow") for x in notes):
                notes.append("no float64 shadow for this model (give bound methods of an nn.Module to get one)")
        fams: list[FamilyInput | None] = []
        built: dict[str, FamilyInput] = {}
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            try:
                built[name] = build_family(name, m, test=test, train=tr, levels=levels, n=n, seed=seed + i)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a family whose inputs cannot be built could not run
                results[name] = _not_built(name, "latent" if name.startswith(("samples", "clipped")) else "data",
                                           name, e)
        timings["families"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        trips = _recon_phase(m, built, plan, batch_size, prog)
        timings["reconstruction"] += time.perf_counter() - t0
        for name in names:
            if name in built:
                fam, trip, seconds = trips[name]
                results[name] = _family_result(fam, trip, opts, n_total=built[name].size)
                results[name].seconds = seconds
                fams.append(fam)
            else:
                fams.append(None)
        results = {name: results[name] for name in names}
        plan.start_optional(time.perf_counter() - t_start)
        if sh is not None:
            prog.part("float64 shadow")
            t0 = time.perf_counter()
            with sh.eval_mode():
                _shadow_phase(fams, list(results.values()), sh, opts, plan, notes)
            timings["shadow"] += time.perf_counter() - t0
        for fam, r in zip(fams, results.values()):
            if fam is not None:
                _finish_verdict(r, opts)
        if localize:
            if m.layers is None:
                notes.append(f"no per-layer localisation: {m.layers_note}")
            else:
                prog.part(f"per-layer localisation ({m.layers.description})")
                t0 = time.perf_counter()
                _batched_localization([f for f in fams if f is not None],
                                      [r for f, r in zip(fams, results.values()) if f is not None], m, opts, notes,
                                      plan)
                for r in results.values():
                    _forward_culprit(r, m, opts)
                timings["localization"] += time.perf_counter() - t0
        for r in results.values():
            _culprit_from_messages(r)
        if spectra_points > 0:
            prog.part("Jacobian spectra")
            t0 = time.perf_counter()
            _batched_spectra(list(results.values()), m, sh, opts, plan, notes)
            timings["spectra"] += time.perf_counter() - t0
        if repeat > 0:
            prog.part("repeated forward/inverse passes")
            t0 = time.perf_counter()
            _repeated_phase(list(results.values()), m, opts, plan)
            timings["repeated"] += time.perf_counter() - t0
        for r in results.values():
            for attr in ("_x", "_valid", "_spectra_idx", "_raw", "_fam"):
                r.__dict__.pop(attr, None)
        if attack == "pgd":
            attacks = _attack(m, sh, test, test_int if levels is not None else None, levels, attack_kw, opts,
                              timings, notes, prog, plan)
    if before is not None and not torch.equal(before, _fingerprint(m.module)):
        notes.append("the model's parameters changed while it was audited (a data-dependent initialisation on its "
                     "first call, such as normflows' ActNorm?): initialise the model before auditing it")
    verdict = Verdict(tolerance, criterion, {k: r.verdict for k, r in results.items()})
    for k, a in attacks.items():
        verdict.families[k] = a.verdict
    timings["total"] = time.perf_counter() - t_start
    prog.done(f"done in {timings['total']:.1f}s: {verdict.headline()}")
    meta = dict(model=repr(m), kind=m.kind, dtype=str(m.dtype).replace("torch.", ""), shadow=sh is not None,
                levels=levels, n_test=None if test is None else int(test.shape[0]),
                event_shape=None if test is None else list(test.shape[1:]),
                latent_shape=list(m.latent_shape) if m.latent_shape else None, families=names,
                attack=attack, attack_kwargs=attack_kw,
                options={k: v for k, v in opts.items() if k != "batch_size"}, torch=torch.__version__,
                threads=torch.get_num_threads(), traceable=m.traceable is not None,
                localization=(m.layers.description if m.layers is not None else f"none: {m.layers_note}"),
                budget=plan.to_dict())
    return AuditReport(meta=meta, families=results, attacks=attacks, verdict=verdict, timings=dict(timings),
                       notes=notes)
