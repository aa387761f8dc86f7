"""The whole out-of-distribution analysis of one flow (or an ensemble) on discrete image data.

:func:`analyze` scores the training split, the test split and every OOD family under the flow and
returns an :class:`OODResult` (JSON summary + per-example arrays for the plots of
:mod:`stableflows.ood.report`):

1. per-example bits/dim of every set (Nalisnick et al. 2019, paper 004, Fig. 2) and AUROC / AUPR /
   FPR@95 of bits/dim as an OOD score (:mod:`.scores`), OOD = positive, test split = negative;
2. ``log p(x) = log p(z) + logdet`` per example, per layer and per scale (Fig. 4; :mod:`.decompose`);
3. constant and random inputs (App. D) and graying (Fig. 6b) (:mod:`.probes`);
4. an ensemble ``p(x) = 1/M sum_m p_m(x)`` when several flows are given (App. E);
5. the second-order prediction of each likelihood gap next to the measured one (sec. 5, Eq. 4-6;
   :mod:`.second_order`);
6. better scores beside raw likelihood: typicality (batch sizes ``M``), complexity-corrected
   likelihood, latent-norm typicality, a likelihood ratio against a background model if given;
7. the invertibility of the flow on every set (:mod:`.invertibility`): a likelihood where the
   inverse has exploded is flagged meaningless.

Inputs: the discrete families of :mod:`stableflows.data.ood` are built on the level grid from the
test split and dequantised with the fixed noise of seed 0 (docs/METRICS.md bits/dim); ``gaussian`` and
``out_of_range`` are model-space families scored as given. A family named like a dataset
(``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``) is that dataset's test split, read from local
files (the paper's pairs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor, nn

from ..config import ConfigError, DataConfig
from ..data.ood import DISCRETE_FAMILIES, EXTRA_FAMILIES, FAMILY_DESCRIPTIONS, OOD_FAMILIES, discrete_ood_family, ood_family
from ..data.registry import ALIASES as DATASET_ALIASES
from ..metrics import nats_to_bpd
from . import scores as S
from .decompose import STATUS_OK, Terms, decompose, likelihood_terms
from .invertibility import INVERTIBLE_TOL, audit_verdicts, invertibility
from .probes import GRAY_FACTORS, bpd_of, constant_inputs, fixed_dequantize, graying_curve, random_inputs
from .second_order import HESSIAN_MAX_DIM, curvature, paper_eq6, second_order_prediction

__all__ = ["OODConfig", "OODResult", "SetData", "build_sets", "analyze", "DATASET_FAMILIES", "IN_SETS"]

DATASET_FAMILIES = ("mnist", "fashion-mnist", "cifar10", "svhn")
IN_SETS = ("train", "val", "test")
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class OODConfig:
    """Settings of :func:`analyze` (every size is a cap; ``None`` = use everything)."""

    families: tuple = OOD_FAMILIES  # OOD families of stableflows.data.ood and/or dataset names
    n: int | None = None  # examples per OOD family (default: the size of the test split)
    n_train: int | None = None  # training examples scored
    typicality_m: tuple = (1, 5, 25)  # batch sizes of the typicality test
    alpha: float = 0.01  # false-alarm rate of the typicality threshold
    bootstrap: int = 500  # bootstrap batches (typicality threshold and batch AUROC)
    gray_factors: tuple = GRAY_FACTORS
    decompose_n: int = 128  # examples per set in the per-layer decomposition
    second_order: bool = True
    check_invertibility: bool = True
    tol: float = INVERTIBLE_TOL
    seed: int = 0
    batch_size: int = 256
    data_dir: str | None = None  # local files of the dataset families


@dataclass
class SetData:
    """One scored set: model-space inputs ``v`` and, when on the level grid, integer levels ``x``."""

    name: str
    kind: str  # "train" | "val" | "test" | "ood"
    v: Tensor  # (N, *shape) float64
    x: Tensor | None  # (N, *shape) integer levels, or None for off-grid families
    description: str = ""


@dataclass
class OODResult:
    summary: dict  # JSON-serialisable
    arrays: dict = field(default_factory=dict)  # per-set per-example numpy arrays for the plots


# ----------------------------------------------------------------------------- inputs
_DESCRIPTIONS = {
    "uniform": "uniform levels (random images)", "gaussian": "N(0.5, 0.25^2) per entry, not clamped",
    "constant": "constant images", "grayed": "test images with contrast halved", "inverted": "L-1-x",
    "out_of_range": "test images scaled x2 about 0.5", "natural_patches": "natural-image patches",
}


def _dataset_family(name: str, splits, cfg: OODConfig, n: int) -> SetData:
    from ..data import load_dataset

    other = load_dataset(DataConfig(name=name, data_dir=cfg.data_dir, flatten=len(splits.shape) == 1), seed=cfg.seed)
    if tuple(other.shape) != tuple(splits.shape) or other.levels != splits.levels:
        raise ConfigError(f"OOD dataset {name} has shape {other.shape} and {other.levels} levels; the model's data "
                          f"{splits.name} has shape {splits.shape} and {splits.levels} levels")
    x = other.test[:n].double()
    return SetData(name, "ood", fixed_dequantize(x, splits.levels), x, f"{name} test split")


def build_sets(splits, cfg: OODConfig = OODConfig()) -> dict[str, SetData]:
    """The scored sets: ``train``, ``val``, ``test`` and each family of ``cfg.families``."""
    if splits.levels is None:
        raise ConfigError(f"the OOD analysis needs discrete data (bits/dim); {splits.name} is continuous")
    L = splits.levels
    sets: dict[str, SetData] = {}
    for part in IN_SETS:
        x = getattr(splits, part).double()
        if part == "train" and cfg.n_train is not None:
            x = x[:cfg.n_train]
        if x.shape[0]:
            sets[part] = SetData(part, part, fixed_dequantize(x, L), x, f"{splits.name} {part} split")
    test_x = splits.test.double()
    n = len(test_x) if cfg.n is None else int(cfg.n)
    for fam in cfg.families:
        if fam in sets:
            raise ConfigError(f"family name {fam!r} clashes with a split name")
        if fam in DATASET_FAMILIES or fam in DATASET_ALIASES:
            sets[fam] = _dataset_family(DATASET_ALIASES.get(fam, fam), splits, cfg, n)
        elif fam in DISCRETE_FAMILIES or fam in EXTRA_FAMILIES:
            m = min(n, len(test_x)) if fam in ("grayed", "grayed_mid", "inverted") else n
            x = discrete_ood_family(fam, test_x, m, levels=L, seed=cfg.seed)
            sets[fam] = SetData(fam, "ood", fixed_dequantize(x, L), x, _DESCRIPTIONS.get(fam) or FAMILY_DESCRIPTIONS[fam])
        elif fam in OOD_FAMILIES:
            m = min(n, len(test_x)) if fam == "out_of_range" else n
            v = ood_family(fam, sets["test"].v, m, seed=cfg.seed, levels=L).double()
            sets[fam] = SetData(fam, "ood", v, None, _DESCRIPTIONS.get(fam, fam))
        else:
            raise ConfigError(f"unknown OOD family {fam!r}; known: {', '.join(OOD_FAMILIES + EXTRA_FAMILIES + DATASET_FAMILIES)}")
    return sets


# ----------------------------------------------------------------------------- helpers
def _bpd(log_px: np.ndarray, d: int, levels: int) -> np.ndarray:
    return -(log_px - d * math.log(levels)) / (d * LOG2)


def _levels_of(s: SetData, levels: int) -> Tensor:
    """Integer levels of a set (off-grid families quantised ``floor(v L)`` clamped, for the compressor)."""
    if s.x is not None:
        return s.x
    v = torch.nan_to_num(s.v, nan=0.0, posinf=1.0, neginf=0.0)
    return torch.floor(v * levels).clamp(0, levels - 1)


def _per_dim(a: np.ndarray, d: int) -> np.ndarray:
    return a / d


def _typicality(bpd: dict, entropy: float, fams: list, cfg: OODConfig) -> dict:
    """Typicality test per batch size M: AUROC of the batch statistic (test batches vs family
    batches) and the detection rate at the threshold set on the validation split."""
    out: dict = {}
    val = bpd.get("val", bpd["test"])
    for m in cfg.typicality_m:
        thr = S.typicality_threshold(val, entropy, m, alpha=cfg.alpha, k=cfg.bootstrap, seed=cfg.seed)
        t_in = S.typicality_batches(bpd["test"], entropy, m, k=cfg.bootstrap, seed=cfg.seed + 1)
        row = {"threshold": thr, "false_alarm_test": float(np.mean(t_in > thr))}
        for f in fams:
            if not np.isfinite(bpd[f]).any():  # no likelihood at all: nothing to test
                row[f] = None
                continue
            t_out = S.typicality_batches(bpd[f], entropy, m, k=cfg.bootstrap, seed=cfg.seed + 2)
            row[f] = {**S.ood_metrics(t_in, t_out), "detection_rate": float(np.mean(t_out > thr))}
        out[f"M={m}"] = row
    return out


def has_likelihood(bpd: np.ndarray) -> bool:
    """Whether any example of a set has a finite likelihood (a set the model refuses entirely has
    none: no AUROC of it is reported)."""
    return bool(np.isfinite(bpd).any())


# ----------------------------------------------------------------------------- main
def analyze(flows: nn.Module | Sequence[nn.Module], splits, cfg: OODConfig = OODConfig(), *,
            background: nn.Module | None = None, sets: dict[str, SetData] | None = None,
            progress: bool | str = False) -> OODResult:
    """Run the OOD analysis of ``flows`` (one flow, or several: an ensemble whose first member is
    "the model") on ``splits`` (discrete data). ``background``: a flow trained on perturbed data for
    the likelihood ratio (Ren et al. 2019). ``sets`` overrides :func:`build_sets`. ``progress``:
    True (a line per step), ``"periodic"`` (a line every 30 s) or False; on stderr."""
    from ..audit.progress import Progress

    prog = Progress(progress, prefix="ood")
    flows = [flows] if isinstance(flows, nn.Module) else list(flows)
    if not flows:
        raise ConfigError("analyze needs at least one flow")
    L, shape = splits.levels, tuple(splits.shape)
    sets = build_sets(splits, cfg) if sets is None else sets
    d = int(np.prod(shape))
    fams = [k for k, s in sets.items() if s.kind == "ood"]
    model = flows[0]

    # 1. terms of every set under every member
    terms: list[dict[str, Terms]] = []
    for i, f in enumerate(flows):
        prog.part(f"likelihoods of {len(sets)} sets" + (f" (member {i + 1} of {len(flows)})" if len(flows) > 1 else ""))
        terms.append({k: likelihood_terms(f, s.v, batch_size=cfg.batch_size, keep_z=i == 0) for k, s in sets.items()})
    t0 = terms[0]
    bpd = {k: _bpd(t.log_px, d, L) for k, t in t0.items()}
    entropy = float(np.nanmean(bpd["train"]))
    arrays: dict = {"bpd": bpd,
                    "log_pz_per_dim": {k: _per_dim(t.log_pz, d) for k, t in t0.items()},
                    "logdet_per_dim": {k: _per_dim(t.logdet, d) for k, t in t0.items()}}
    summary: dict = {
        "data": {"name": splits.name, "shape": list(shape), "levels": L, "dim": d,
                 "families": fams, "sizes": {k: int(s.v.shape[0]) for k, s in sets.items()},
                 "descriptions": {k: s.description for k, s in sets.items()}},
        "model": _model_info(model, t0),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "entropy_bpd_train": entropy,
        "sets": {},
    }

    # 7. invertibility (first, so that likelihoods can be flagged)
    meaningless = {k: np.zeros(s.v.shape[0], dtype=bool) for k, s in sets.items()}
    inv_summary = {}
    if cfg.check_invertibility:
        prog.part("round trips of every set")
        for k, s in sets.items():
            r = invertibility(model, s.v, tol=cfg.tol, batch_size=cfg.batch_size)
            meaningless[k] = r["meaningless"]
            inv_summary[k] = r["summary"]
        prog.part("invertibility audit of the families")
        try:
            summary["audit"] = audit_verdicts(model, splits, fams, n=cfg.n, tol=cfg.tol, seed=cfg.seed)
        except Exception as e:  # noqa: BLE001 - the per-example flags above stand on their own
            summary["audit"] = {"error": f"{type(e).__name__}: {e}"}
    arrays["meaningless"] = meaningless
    for k, t in t0.items():
        summary["sets"][k] = {
            "kind": sets[k].kind,
            "bpd": S.summarize(bpd[k]),
            "log_pz_per_dim": S.summarize(t.log_pz / d),
            "logdet_per_dim": S.summarize(t.logdet / d),
            "status": {"ok": int(np.sum(t.status == STATUS_OK)), **t.n_bad},
            "messages": dict(list(t.messages.items())[:3]),
            "invertibility": inv_summary.get(k),
        }

    # 1, 6. scores
    summary["scores"] = _scores(sets, t0, bpd, entropy, fams, meaningless, terms, background, d, L, cfg, arrays)
    summary["typicality"] = _typicality(bpd, entropy, fams, cfg)
    summary["best_score"] = _best_scores(summary["scores"], summary["typicality"], fams)

    # 2. decomposition per layer / scale
    prog.part("decomposition per layer and scale")
    summary["decomposition"] = _decomposition(model, sets, t0, cfg)

    # 3. probes
    prog.part("constant and random inputs, graying")
    summary["probes"] = _probes(model, sets, shape, L, cfg, arrays)

    # 5. second-order analysis
    if cfg.second_order:
        prog.part("second-order analysis")
    summary["second_order"] = (_second_order(model, sets, t0, fams, cfg, summary["model"]["constant_volume"])
                               if cfg.second_order else None)

    # 4. ensemble
    if len(flows) > 1:
        summary["ensemble"] = _ensemble(terms, sets, fams, d, L, arrays)
    summary["findings"] = _findings(summary, fams)
    prog.done(f"done: {len(fams)} OOD families")
    return OODResult(summary=summary, arrays=arrays)


def _model_info(model: nn.Module, t0: dict) -> dict:
    cfg = getattr(model, "config", None)
    ld = np.concatenate([t.logdet[np.isfinite(t.logdet)] for t in t0.values()])
    spread = float(ld.max() - ld.min()) if ld.size else None
    return {"config": asdict(cfg) if cfg is not None else None,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "logdet_spread": spread,
            # log-det independent of x up to float rounding (CV-Glow)
            "constant_volume": bool(spread is not None and spread <= 1e-4 * max(1.0, float(np.abs(ld).max())))}


def _scores(sets, t0, bpd, entropy, fams, meaningless, terms, background, d, L, cfg, arrays) -> dict:
    in_ = "test"
    comp = {k: S.complexity_corrected(bpd[k], _levels_of(s, L), L) for k, s in sets.items()}
    lat = {k: S.latent_norm_scores(t.z) for k, t in t0.items()}
    flagged = {k: np.where(meaningless[k], np.inf, bpd[k]) for k in bpd}
    table: dict[str, dict] = {
        "likelihood (bpd)": bpd,
        "typicality M=1 |bpd - H|": {k: S.typicality_scores(b, entropy) for k, b in bpd.items()},
        "complexity-corrected bpd - L/D": comp,
        "latent norm |(|z|^2 - D)| / sqrt(2D)": lat,
        "likelihood, non-invertible flagged": flagged,
    }
    if background is not None:
        tb = {k: likelihood_terms(background, s.v, batch_size=cfg.batch_size) for k, s in sets.items()}
        table["likelihood ratio -(log p - log p_bg)"] = {k: S.likelihood_ratio(t0[k].log_px, tb[k].log_px) for k in sets}
    arrays["scores"] = table
    return {f: ({name: S.ood_metrics(sc[in_], sc[f]) for name, sc in table.items()} if has_likelihood(bpd[f])
                else None) for f in fams}


def _best_scores(scores: dict, typ: dict, fams: list) -> dict:
    out = {}
    for f in fams:
        if scores[f] is None:
            out[f] = None
            continue
        cands = {name: m["auroc"] for name, m in scores[f].items()}
        for mkey, row in typ.items():
            if mkey != "M=1" and row.get(f) is not None:
                cands[f"typicality {mkey} (batches)"] = row[f]["auroc"]
        best = max(cands, key=lambda k: cands[k])
        out[f] = {"score": best, "auroc": cands[best], "likelihood_auroc": scores[f]["likelihood (bpd)"]["auroc"]}
    return out


def _decomposition(model, sets, t0, cfg) -> dict:
    out = {}
    for k, s in sets.items():
        ok = np.nonzero(t0[k].status == STATUS_OK)[0][:cfg.decompose_n]
        if ok.size == 0:
            out[k] = None
            continue
        dec = decompose(model, s.v[torch.from_numpy(ok)])
        out[k] = {"n": int(ok.size), "max_abs_sum_error": float(np.max(np.abs(
                      dec.layer_logdet.sum(0) - dec.logdet))) if dec.layer_names else 0.0,
                  **dec.summary()}
    return out


def _probes(model, sets, shape, L, cfg, arrays) -> dict:
    lv, v_const = constant_inputs(shape, L)
    b_const = bpd_of(model, v_const, L, batch_size=cfg.batch_size)
    n_rand = sets["test"].v.shape[0] if cfg.n is None else int(cfg.n)
    b_rand = bpd_of(model, random_inputs(shape, n_rand, seed=cfg.seed), L, batch_size=cfg.batch_size)
    gray_sets = {"test": sets["test"].x}  # integer images: grayed towards the mid level, then dequantised
    for k in ("natural_patches",) + DATASET_FAMILIES:
        if k in sets and sets[k].x is not None:
            gray_sets[k] = sets[k].x
    gray = graying_curve(model, gray_sets, L, factors=cfg.gray_factors)
    arrays["constant_bpd"] = (lv, b_const)
    return {"constant": {"levels": lv.tolist(), "bpd": [float(b) if np.isfinite(b) else None for b in b_const],
                         "min_bpd": float(np.nanmin(b_const)) if np.isfinite(b_const).any() else None},
            "random": S.summarize(b_rand), "graying": gray}


def _second_order(model, sets, t0, fams, cfg, constant_volume: bool) -> dict:
    xp = sets["train"].v
    d = int(np.prod(xp.shape[1:]))
    if d > HESSIAN_MAX_DIM:
        return {"skipped": f"dimension {d} exceeds HESSIAN_MAX_DIM={HESSIAN_MAX_DIM}"}
    ok_p = t0["train"].status == STATUS_OK
    if not ok_p.any():
        return {"skipped": "no training example has a finite likelihood"}
    xp = xp[torch.from_numpy(ok_p)]
    try:
        curv = curvature(model, xp.double().mean(0))
    except Exception as e:  # noqa: BLE001 - e.g. the mean lies outside the model's domain
        return {"skipped": f"derivatives at the training mean failed: {type(e).__name__}: {e}"}
    out: dict = {"x0": "mean of the training split (model space)", "constant_volume": constant_volume,
                 "note": None if constant_volume else "not a constant-volume flow: the Gauss-Newton and paper Eq. 6 "
                 "forms omit the curvature of the log-det; Eq. 4 / 5 use the full Hessian", "families": {}}
    lp_train = float(np.mean(t0["train"].log_px[ok_p]))
    for f in ["test"] + fams:
        ok = t0[f].status == STATUS_OK
        if not ok.all():
            out["families"][f] = {"skipped": f"{int((~ok).sum())} examples without a finite likelihood"}
            continue
        measured = float(np.mean(t0[f].log_px)) - lp_train
        r = second_order_prediction(model, xp, sets[f].v, curv=curv, measured=measured)
        r["paper_eq6"] = None
        if constant_volume:
            try:
                r["paper_eq6"] = paper_eq6(model, xp, sets[f].v)["prediction"]
            except (ValueError, RuntimeError):
                pass
        out["families"][f] = r
    return out


def _ensemble(terms, sets, fams, d, L, arrays) -> dict:
    m = len(terms)
    ens = {k: logsumexp(np.stack([t[k].log_px for t in terms]), axis=0) - math.log(m) for k in sets}
    ens_bpd = {k: _bpd(v, d, L) for k, v in ens.items()}
    arrays["ensemble_bpd"] = ens_bpd
    members = [{f: (S.auroc(_bpd(t["test"].log_px, d, L), _bpd(t[f].log_px, d, L))
                    if has_likelihood(_bpd(t[f].log_px, d, L)) else None) for f in fams} for t in terms]
    return {"members": m,
            "bpd": {k: S.summarize(v) for k, v in ens_bpd.items()},
            "auroc": {f: S.auroc(ens_bpd["test"], ens_bpd[f]) if has_likelihood(ens_bpd[f]) else None for f in fams},
            "member_auroc": members,
            "member_test_bpd": [float(np.nanmean(_bpd(t["test"].log_px, d, L))) for t in terms]}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _no_likelihood(name: str, stat: dict, n: int) -> str:
    parts = []
    if stat.get("outside_domain"):
        parts.append(f"{stat['outside_domain']} outside the model's domain")
    if stat.get("error"):
        parts.append(f"{stat['error']} raised an error")
    if stat.get("nonfinite"):
        parts.append(f"{stat['nonfinite']} non-finite")
    return f"{name}: no likelihood ({', '.join(parts) or 'none finite'} of {n} inputs): no AUROC, no verdict"


def _findings(s: dict, fams: list) -> list[str]:
    """Plain-language statements of what the numbers show; a set without a likelihood gets neither
    an AUROC nor an "invertible", and the audit line names what it could not judge."""
    out = []
    test_bpd = s["sets"]["test"]["bpd"].get("mean")
    train_bpd = s["sets"]["train"]["bpd"].get("mean")
    out.append(f"mean bits/dim: train {_fmt(train_bpd)}, test {_fmt(test_bpd)}")
    for f in fams:
        stat = s["sets"][f]["status"]
        if s["scores"][f] is None:
            out.append(_no_likelihood(f, stat, s["sets"][f]["bpd"]["n"]))
            continue
        sc = s["scores"][f]["likelihood (bpd)"]
        fb = s["sets"][f]["bpd"].get("mean")
        inv = s["sets"][f]["invertibility"]
        msg = f"{f}: mean bpd {_fmt(fb)}; likelihood AUROC {sc['auroc']:.3f}"
        if sc["auroc"] < 0.5:
            msg += " (< 0.5: the model gives this OOD set HIGHER likelihood than the test split)"
        best = s["best_score"][f]
        msg += f"; best score {best['score']} with AUROC {best['auroc']:.3f}"
        if stat.get("outside_domain"):
            msg += (f"; {stat['outside_domain']} inputs outside the model's domain (no likelihood; counted as "
                    "detected by every score)")
        if inv and inv["n_meaningless"]:
            msg += (f"; inverse NOT stable on {inv['n_meaningless']}/{inv['n']} inputs "
                    f"(likelihood there is meaningless)")
        av = (s.get("audit") or {}).get(f)
        if isinstance(av, dict) and av.get("status") == "not invertible":
            msg += (f"; audit: NOT invertible ({av['n_fail']}/{av['n_checked']} fail, cause {av.get('cause') or '?'}"
                    + (f", first at {av['culprit']}" if av.get("culprit") else "") + ")")
        out.append(msg)
    au = s.get("audit") or {}
    if au and "error" not in au:
        by = {st: [k for k, v in au.items() if isinstance(v, dict) and v.get("status") == st]
              for st in ("invertible", "not invertible", "outside domain", "could not run")}
        parts = []
        if by["not invertible"]:
            parts.append(f"NOT invertible on {', '.join(by['not invertible'])}")
        if by["invertible"]:
            parts.append("invertible within tolerance on " + ("every family it could judge" if not by["not invertible"]
                                                              else "the others") + f" ({', '.join(by['invertible'])})")
        if by["outside domain"]:
            parts.append(f"no verdict on {', '.join(by['outside domain'])} (every input outside the model's domain)")
        if by["could not run"]:
            errs = {au[k].get("error") for k in by["could not run"]}
            parts.append(f"COULD NOT RUN {', '.join(by['could not run'])}: {'; '.join(e for e in errs if e)}")
        out.append("audit: " + "; ".join(parts))
    elif au:
        out.append(f"audit: could not run: {au['error']}")
    c = s["probes"]["constant"]
    if c["min_bpd"] is not None and test_bpd is not None:
        out.append(f"constant images: lowest bpd {c['min_bpd']:.3f} vs test {test_bpd:.3f}"
                   + (" (constant inputs are MORE likely than test data)" if c["min_bpd"] < test_bpd else ""))
    g = s["probes"]["graying"]
    t = g.get("test")
    if t and t["mean"][0] is not None and t["mean"][-1] is not None:
        out.append(f"graying the test split: bpd {t['mean'][0]:.3f} at factor {g['factors'][0]:g} -> "
                   f"{t['mean'][-1]:.3f} at factor {g['factors'][-1]:g}")
    so = s.get("second_order")
    if so and "families" in so:
        agree = [f for f, r in so["families"].items() if "sign_agrees" in r and r["sign_agrees"]["eq5"]]
        done = [f for f, r in so["families"].items() if "sign_agrees" in r]
        if done:
            out.append(f"second-order prediction (Eq. 5) has the sign of the measured gap for {len(agree)}/{len(done)} sets")
    if s["model"]["constant_volume"]:
        out.append("the log-det is the same for every input (constant-volume flow)")
    e = s.get("ensemble")
    if e:
        out.append("ensemble of %d: AUROC %s" % (e["members"], ", ".join(f"{f} {a:.3f}" for f, a in e["auroc"].items()
                                                                           if a is not None)))
    return out
