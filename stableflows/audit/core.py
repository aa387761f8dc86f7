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
from collections import defaultdict
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
from .reconstruction import Reconstruction, finite_rows, reconstruct, repeated_passes, safe_apply
from .spectra import EXACT_MAX_DIM, LANCZOS_STEPS, Spectra, spectra
from .verdict import CRITERIA, FamilyVerdict, Verdict, family_verdict

__all__ = ["audit", "FamilyResult", "AttackOutcome", "DEFAULT_ATTACK", "PREVIEW"]

DEFAULT_ATTACK = dict(constraints=CONSTRAINTS, examples=64, steps=50, step_size=None, eps=DEFAULT_EPS,
                      widen=DEFAULT_WIDEN, random_start=True, fixed_point_iterations=None, baseline=True, seed=0)
PREVIEW = 8  # images kept per family for the HTML report


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


@dataclass
class AttackOutcome:
    constraint: str
    pgd: Any  # AttackResult
    random: Any | None
    errors: dict
    verdict: FamilyVerdict
    preview: dict | None = None


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


def _errors(rec: Reconstruction, failed: Tensor | None = None) -> dict[str, Tensor]:
    """Errors with ``inf`` for every failed example (raised, or ``failed``)."""
    out = {"l2": rec.err_l2.clone(), "linf": rec.err_linf.clone(), "rel": rec.err_rel.clone()}
    bad = rec.raised & ~rec.outside_domain
    if failed is not None:
        bad = bad | failed
    for e in out.values():
        e[bad] = math.inf
    return out


def _generate(model: Invertible, z: Tensor, clip: float | None, batch_size: int):
    """``x = F^-1(z)`` (activations clipped at ``clip``): ``(x, failed (n,), info)``."""
    counts: dict = {}
    if clip is not None and model.traceable is not None:
        with clip_activations(model.traceable, clip) as counts, torch.no_grad():
            app = safe_apply(model.inverse, z, batch_size=batch_size, root=model.traceable)
    else:
        with torch.no_grad():
            app = safe_apply(model.inverse, z, batch_size=batch_size, root=model.traceable)
    n = z.shape[0]
    fin = finite_rows(app.out, n) & ~app.raised
    info = {"n": n, "nonfinite": int((~fin & ~app.raised).sum()), "raised": int(app.raised.sum()),
            "messages": dict(app.messages)}
    if clip is not None:
        info["clipped_entries"] = {k: v for k, v in counts.items() if v}
        if model.traceable is None:
            info["note"] = "clipping needs a stableflows model: generated without clipping"
    x = app.out if app.out is not None else torch.full((n, 1), math.nan, dtype=z.dtype)
    return x, ~fin, app.raised, info


def _round_trip(model: Invertible, fam: FamilyInput, x: Tensor | None, batch_size: int):
    """Reconstruction of a family with ``model``:
    ``(x, rec, errors, outside_domain, generation, raised)``."""
    if fam.kind == "latent":
        x, gen_failed, gen_raised, info = _generate(model, fam.z.to(model.dtype), fam.clip, batch_size)
        rec = reconstruct(model, torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), batch_size=batch_size)
        # the model's own outputs must map back: a refusal is a failure here, and a failed generation too
        raised = gen_raised | rec.raised
        rec.outside_domain = torch.zeros_like(rec.outside_domain)
        return x, rec, _errors(rec, gen_failed | raised), None, info, raised
    x = x.to(model.dtype)
    rec = reconstruct(model, x, batch_size=batch_size)
    return x, rec, _errors(rec), rec.outside_domain, None, rec.raised & ~rec.outside_domain


def _audit_family(fam: FamilyInput, m: Invertible, sh: Invertible | None, opts: dict, timings: dict,
                  index: int) -> FamilyResult:
    t0 = time.perf_counter()
    x, rec, errors, outside, generation, raised = _round_trip(m, fam, fam.x, opts["batch_size"])
    timings["reconstruction"] += time.perf_counter() - t0
    shadow_errors = None
    if sh is not None:
        t0 = time.perf_counter()
        fam64 = FamilyInput(fam.name, fam.kind, fam.description, z=None if fam.z is None else fam.z.double(),
                            clip=fam.clip)
        _, rec64, shadow_errors, _, _, _ = _round_trip(sh, fam64, None if fam.x is None else x.double(),
                                                       opts["batch_size"])
        timings["shadow"] += time.perf_counter() - t0
    verdict = family_verdict(fam.name, errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                             outside_domain=outside, raised=raised, shadow_errors=shadow_errors)
    res = FamilyResult(fam.name, fam.kind, fam.description, rec, errors, verdict, shadow_errors,
                       generation=generation, temperature=fam.temperature, clip=fam.clip)
    n = rec.n
    valid = finite_rows(x, n) & rec.finite_forward & ~rec.outside_domain & ~raised
    err = errors["l2"]
    if opts["repeat"] > 0 and bool(valid.any()):
        t0 = time.perf_counter()
        idx = _select(err, valid, opts["repeat_points"], opts["seed"] + index)
        rep = torch.full((n, opts["repeat"]), math.nan, dtype=torch.float64)
        rep[idx] = repeated_passes(m, x[idx], opts["repeat"], batch_size=opts["batch_size"])
        res.repeated = rep
        timings["repeated"] += time.perf_counter() - t0
    if opts["spectra_points"] > 0 and bool(valid.any()):
        res._spectra_idx = _select(err, valid, opts["spectra_points"], opts["seed"] + index)
    res._x = x
    res._valid = valid
    if len(x.shape) == 4 and x.shape[0] > 0:
        k = min(PREVIEW, n)
        res.preview = {"x": x[:k].detach().double().cpu(),
                       "x_hat": None if rec.x_hat is None else rec.x_hat[:k].detach().double().cpu()}
    rec.z = rec.x_hat = None  # keep the report small
    return res


def _batched_spectra(results: list[FamilyResult], m: Invertible, sh: Invertible | None, opts: dict) -> None:
    """Spectra of every family in one batch (the cost is dominated by one backward pass per
    output dimension, nearly independent of the number of points)."""
    todo = [r for r in results if getattr(r, "_spectra_idx", None) is not None and r._spectra_idx.numel()]
    if not todo:
        return
    target = sh if sh is not None else m
    xs = torch.cat([r._x[r._spectra_idx].to(target.dtype) for r in todo], 0)
    idx = torch.cat([r._spectra_idx for r in todo])
    with target.eval_mode():
        allsp = spectra(target, xs, idx, method=opts["spectra_method"], steps=opts["lanczos_steps"],
                        exact_max_dim=opts["exact_max_dim"], seed=opts["seed"])
    start = 0
    for r in todo:
        k = r._spectra_idx.numel()
        r.spectra = _slice_spectra(allsp, start, start + k)
        start += k


def _slice_spectra(s: Spectra, a: int, b: int) -> Spectra:
    def cut(t):
        return None if t is None else t[a:b].clone()
    return Spectra(s.method, s.dtype, s.index[a:b].clone(), cut(s.fwd_smin), cut(s.fwd_smax), cut(s.inv_smin),
                   cut(s.inv_smax), cut(s.logdet_analytic), cut(s.logdet_numeric))


def _batched_localization(fams: list[FamilyInput], results: list[FamilyResult], m: Invertible, opts: dict) -> None:
    groups, owners = [], []
    for fam, r in zip(fams, results):
        if fam.kind == "latent":
            if fam.clip is not None:
                continue  # the clipped pass is not the model's inverse; see generation["clipped_entries"]
            groups.append((None, fam.z[: opts["localize_points"]].to(m.dtype)))
        else:
            if not bool(r._valid.any()):
                continue
            idx = _worst(r.errors["l2"], r._valid, opts["localize_points"])
            groups.append((r._x[idx], None))
        owners.append(r)
    if not groups:
        return
    locs = localize_many(m.traceable, groups, tolerance=opts["tolerance"], gain_threshold=opts["gain_threshold"],
                         seed=opts["seed"])
    for r, loc in zip(owners, locs):
        r.localization = loc
        r.verdict.culprit, r.verdict.culprit_reason = loc.culprit, loc.reason


def _forward_culprit(r: FamilyResult, m: Invertible, opts: dict) -> None:
    """Name the layer where the *forward* first turns non-finite, for a data family whose examples
    never reach the inverse (the per-layer localisation only walks examples with a finite ``z``)."""
    if r.kind != "data" or r.verdict.culprit is not None or m.traceable is None:
        return
    x = getattr(r, "_x", None)
    bad = (~r.recon.finite_forward & ~r.recon.outside_domain & ~r.recon.raised).nonzero().flatten()
    if x is None or not bad.numel():
        return
    from ..transforms.base import trace
    from .localize import leaf_transforms

    names = {n for n, _ in leaf_transforms(m.traceable)}
    xb = x[bad[: opts["localize_points"]]]
    with torch.no_grad(), trace(m.traceable) as t:
        try:
            m.forward(xb)
        except Exception:  # noqa: BLE001 - the records up to the failing layer are what we need
            pass
    for rec in t.records:
        if rec.name in names and not bool(rec.out_finite.all()):
            r.verdict.culprit = rec.name
            r.verdict.culprit_reason = (f"first non-finite output on the forward path "
                                        f"({int((~rec.out_finite).sum())} of {xb.shape[0]} traced examples)")
            return


def _culprit_from_messages(r: FamilyResult) -> None:
    """Name the layer that raised most often when the localisation found nothing (e.g. the forward
    refusing the model's own samples)."""
    if r.verdict.culprit is not None or not r.verdict.n_raised:
        return
    msgs = dict(r.recon.messages)
    for k, v in (r.generation or {}).get("messages", {}).items():
        msgs[k] = msgs.get(k, 0) + v
    layered = [(v, k) for k, v in msgs.items() if k.startswith("[")]
    if layered:
        count, msg = max(layered)
        r.verdict.culprit = msg[1:msg.index("]")]
        r.verdict.culprit_reason = f"raised on {count} examples: {msg[msg.index(']') + 2:]}"


def _attack(m: Invertible, test: Tensor, x_int: Tensor | None, levels: int | None, kw: dict, opts: dict,
            timings: dict, notes: list[str]) -> dict[str, AttackOutcome]:
    kw = {**DEFAULT_ATTACK, **(kw or {})}
    unknown = set(kw) - set(DEFAULT_ATTACK) - {"data_range"}
    if unknown:
        raise ConfigError(f"unknown attack option(s) {sorted(unknown)}; known: {sorted(DEFAULT_ATTACK)}, data_range")
    k = min(int(kw["examples"]), test.shape[0])
    x0 = test[:k].to(m.dtype)
    xi = None if x_int is None else x_int[:k]
    rng = kw.get("data_range") or ((0.0, 1.0) if levels is not None else (float(test.min()), float(test.max())))
    out = {}
    for c in kw["constraints"]:
        if c == "cell" and levels is None:
            notes.append("attack 'cell' skipped: the data are not discrete (no levels)")
            continue
        t0 = time.perf_counter()
        common = dict(constraint=c, x_int=xi, levels=levels, eps=kw["eps"], data_range=rng, widen=kw["widen"])
        pgd = pgd_attack(m, x0, steps=kw["steps"], step_size=kw["step_size"], random_start=kw["random_start"],
                         fixed_point_iterations=kw["fixed_point_iterations"], seed=kw["seed"], **common)
        timings["attack"] += time.perf_counter() - t0
        base = None
        if kw["baseline"]:
            t0 = time.perf_counter()
            # the same budget: PGD evaluates its start and one point per step
            base = random_search(m, x0, points=pgd.evaluations or int(kw["steps"]) + 1, seed=kw["seed"], **common)
            timings["attack_baseline"] += time.perf_counter() - t0
        name = f"pgd:{c}"
        if pgd.status == "outside_domain":
            nan = torch.full((k,), math.nan, dtype=torch.float64)
            errors = {"l2": nan, "linf": nan.clone(), "rel": nan.clone()}
            v = family_verdict(name, errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                               outside_domain=torch.ones(k, dtype=torch.bool))
        else:
            with m.eval_mode():
                rec = reconstruct(m, pgd.best_x)
            errors = _errors(rec)
            v = family_verdict(name, errors, tolerance=opts["tolerance"], criterion=opts["criterion"],
                               outside_domain=rec.outside_domain, raised=rec.raised & ~rec.outside_domain)
        preview = None
        if pgd.best_x.dim() == 4:
            j = min(PREVIEW, k)
            with torch.no_grad(), m.eval_mode():
                r = safe_apply(lambda t: m.inverse(m.forward(t)), pgd.best_x[:j])
            preview = {"x": x0[:j].double().cpu(), "x_adv": pgd.best_x[:j].double().cpu(),
                       "x_hat": None if r.out is None else r.out.double().cpu()}
        out[name] = AttackOutcome(c, pgd, base, errors, v, preview)
    return out


def audit(model, data: Tensor | Any = None, *, inverse: Callable | None = None, levels: int | None = None,
          train: Tensor | None = None, families: Sequence[str] | str = DEFAULT_FAMILIES, n: int | None = None,
          tolerance: float = 1e-3, criterion: str = "l2", repeat: int = 5, repeat_points: int = 64,
          shadow: bool = True,
          spectra_points: int = 32, spectra_method: str = "auto", lanczos_steps: int = LANCZOS_STEPS,
          exact_max_dim: int = EXACT_MAX_DIM, localize: bool = True, localize_points: int = 32,
          gain_threshold: float = GAIN_THRESHOLD, attack: str | None = None, attack_kwargs: dict | None = None,
          temperatures: Sequence[float] = TEMPERATURES, clip_thresholds: Sequence[float] = CLIP_THRESHOLDS,
          batch_size: int = 512, seed: int = 0, dequantize_seed: int = 0, progress: bool = False,
          context: Tensor | None = None, train_context: Tensor | None = None):
    """Audit the invertibility of ``model`` on ``data`` and return an
    :class:`~stableflows.audit.report.AuditReport` (``.verdict``, ``.to_json()``, ``.to_html(path)``).

    Args:
        model: a stableflows Flow/Transform, a pair ``(forward, inverse)`` of callables (or give
            ``inverse=``), or a flow of normflows / zuko / FrEIA / nflows (:mod:`.adapters`).
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
            (``"auto"``: exact up to ``exact_max_dim`` dimensions, Lanczos above).
        localize, localize_points, gain_threshold: per-layer localisation on the worst examples.
        attack: None or ``"pgd"``; ``attack_kwargs`` override :data:`DEFAULT_ATTACK` (constraints,
            examples, steps, step_size, eps, widen, random_start, fixed_point_iterations, baseline,
            seed, data_range).
        temperatures, clip_thresholds: of the ``samples`` and ``clipped`` groups.
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
    t_start = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    notes: list[str] = []
    m = as_invertible(model, inverse)
    test_int, train_int, levels = _prepare(data, levels, train)
    names = expand_families(families, temperatures=temperatures, clip_thresholds=clip_thresholds)
    opts = dict(batch_size=batch_size, tolerance=tolerance, criterion=criterion, repeat=repeat,
                repeat_points=repeat_points,
                spectra_points=spectra_points, spectra_method=spectra_method, lanczos_steps=lanczos_steps,
                exact_max_dim=exact_max_dim, localize=localize, localize_points=localize_points,
                gain_threshold=gain_threshold, seed=seed)
    results: dict[str, FamilyResult] = {}
    attacks: dict[str, AttackOutcome] = {}
    with m.eval_mode():
        test = None if test_int is None else _to_model_space(test_int, levels, dequantize_seed).to(m.dtype)
        tr = None if train_int is None else _to_model_space(train_int, levels, dequantize_seed + 1).to(m.dtype)
        if test is not None and m.latent_shape is None:
            with torch.no_grad():
                z = safe_apply(m.forward, test[:batch_size]).out
            if z is not None:
                m.latent_shape = tuple(z.shape[1:])
        sh = None
        if shadow:
            try:
                sh = m.shadow(torch.float64)
            except Exception as e:  # noqa: BLE001 - reported, the audit goes on without it
                notes.append(f"no float64 shadow: {type(e).__name__}: {e}")
            if sh is None and not notes:
                notes.append("no float64 shadow for this model (give bound methods of an nn.Module to get one)")
        if test is None and any(nm in ("test", "train") or not nm.startswith(("samples", "clipped")) for nm in names):
            raise ConfigError(f"families {names} need data; give data= or only samples/clipped families")
        fams = []
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            fam = build_family(name, m, test=test, train=tr, levels=levels, n=n, seed=seed + i)
            timings["families"] += time.perf_counter() - t0
            if progress:
                print(f"audit: {name} ({fam.description})", flush=True)
            sh_ctx = sh.eval_mode() if sh is not None else _null()
            with sh_ctx:
                results[name] = _audit_family(fam, m, sh, opts, timings, i)
            fams.append(fam)
        t0 = time.perf_counter()
        _batched_spectra(list(results.values()), m, sh, opts)
        timings["spectra"] += time.perf_counter() - t0
        if localize and m.traceable is not None:
            t0 = time.perf_counter()
            _batched_localization(fams, list(results.values()), m, opts)
            timings["localization"] += time.perf_counter() - t0
        for r in results.values():
            if localize:
                _forward_culprit(r, m, opts)
            _culprit_from_messages(r)
            for attr in ("_x", "_valid", "_spectra_idx"):
                r.__dict__.pop(attr, None)
        if attack == "pgd":
            if test is None:
                raise ConfigError("the PGD attack needs data")
            if progress:
                print("audit: PGD attack", flush=True)
            attacks = _attack(m, test, test_int if levels is not None else None, levels, attack_kwargs, opts,
                              timings, notes)
    verdict = Verdict(tolerance, criterion, {k: r.verdict for k, r in results.items()})
    for k, a in attacks.items():
        verdict.families[k] = a.verdict
    timings["total"] = time.perf_counter() - t_start
    meta = dict(model=repr(m), kind=m.kind, dtype=str(m.dtype).replace("torch.", ""), shadow=sh is not None,
                levels=levels, n_test=None if test is None else int(test.shape[0]),
                event_shape=None if test is None else list(test.shape[1:]),
                latent_shape=list(m.latent_shape) if m.latent_shape else None, families=names,
                attack=attack, attack_kwargs={**DEFAULT_ATTACK, **(attack_kwargs or {})} if attack else None,
                options={k: v for k, v in opts.items() if k != "batch_size"}, torch=torch.__version__,
                threads=torch.get_num_threads(), traceable=m.traceable is not None)
    return AuditReport(meta=meta, families=results, attacks=attacks, verdict=verdict, timings=dict(timings),
                       notes=notes)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
