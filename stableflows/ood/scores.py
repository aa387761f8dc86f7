"""OOD scores and their evaluation: AUROC, AUPR, FPR at 95 % TPR, and scores better than raw likelihood.

Convention: a *score* is larger for inputs that look more out-of-distribution (e.g. bits/dim), and
the OOD examples are the positive class. AUROC < 0.5 therefore means the model gives the OOD set a
*higher* likelihood than the in-distribution set (Nalisnick et al. 2019, paper 004, Fig. 2).

* :func:`auroc` -- the Mann-Whitney statistic ``P(s_ood > s_in) + P(s_ood = s_in) / 2`` from average
  ranks (ties counted half), equal to scikit-learn's ``roc_auc_score``.
* :func:`average_precision` -- ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds taken in
  decreasing order (scikit-learn's ``average_precision_score``, no interpolation).
* :func:`typicality_scores` -- the typicality test of Nalisnick, Matsukawa, Teh & Lakshminarayanan
  (2019b, "Detecting out-of-distribution inputs to deep generative models using typicality"):
  ``eps(x_1..M) = | mean_m -log p(x_m) - H_hat |`` with ``H_hat`` the training-set mean of
  ``-log p``; an in-distribution batch is *typical*, neither much more nor much less likely.
* :func:`complexity_corrected` -- Serra et al. (2020, "Input complexity and out-of-distribution
  detection with likelihood-based generative models"): ``S(x) = bits(x) - L(x)`` with ``L`` the
  length in bits of a lossless compression of the integer image (zlib here).
* :func:`likelihood_ratio` -- Ren et al. (2019): ``log p_model(x) - log p_background(x)`` with a
  background model trained on perturbed inputs; returned as an OOD score ``-LLR``.
* :func:`latent_norm_scores` -- typicality of the latent code: ``| ||z||^2 - D | / sqrt(2 D)``
  (``||z||^2 ~ chi^2_D`` under the model).

Non-finite scores (a likelihood the model could not evaluate, e.g. an input outside the domain of
a logit pre-transform) are mapped to ``+inf``: a rejected input counts as detected. Their number is
reported by :func:`ood_metrics`.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = [
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "ood_metrics",
    "as_ood_scores",
    "typicality_scores",
    "typicality_batches",
    "typicality_threshold",
    "complexity_bits",
    "complexity_corrected",
    "likelihood_ratio",
    "latent_norm_scores",
    "TPR_LEVEL",
    "ZLIB_LEVEL",
    "DEFAULT_BOOTSTRAP",
    "summarize",
]

TPR_LEVEL = 0.95  # FPR is reported at this true-positive rate (OOD detected)
ZLIB_LEVEL = 9  # compression level of the complexity estimate
DEFAULT_BOOTSTRAP = 1000  # bootstrap batches of the typicality threshold / batch AUROC


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def as_ood_scores(x) -> np.ndarray:
    """1-D float64 array with NaN and -inf mapped to +inf (an unevaluable input counts as detected)."""
    a = _np(x).copy()
    a[~np.isfinite(a) & ~(a == np.inf)] = np.inf
    return a


def _check_pair(s_in, s_ood) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_ood_scores(s_in), as_ood_scores(s_ood)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"AUROC/AUPR need examples of both classes, got {a.size} in-distribution and {b.size} OOD")
    return a, b


def auroc(s_in, s_ood) -> float:
    """Area under the ROC curve with OOD as the positive class: ``P(s_ood > s_in) + P(tie) / 2``.

    From average ranks (Mann-Whitney): ``(R_ood - n_ood (n_ood + 1) / 2) / (n_ood n_in)``.
    """
    a, b = _check_pair(s_in, s_ood)
    ranks = rankdata(np.concatenate([a, b]), method="average")  # +inf ties rank together
    r_ood = ranks[a.size:].sum()
    return float((r_ood - b.size * (b.size + 1) / 2.0) / (a.size * b.size))


def average_precision(s_in, s_ood) -> float:
    """Average precision with OOD as the positive class (area under the precision-recall curve,
    step-wise: ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds in decreasing order)."""
    a, b = _check_pair(s_in, s_ood)
    scores = np.concatenate([a, b])
    labels = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    tp, fp = np.cumsum(labels), np.cumsum(1.0 - labels)
    # keep the last index of each run of equal scores (one point per distinct threshold)
    last = np.r_[np.nonzero(scores[1:] != scores[:-1])[0], scores.size - 1]
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / b.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(s_in, s_ood, tpr: float = TPR_LEVEL) -> float:
    """Fraction of in-distribution examples flagged (``s >= thr``) at the largest threshold ``thr`` that
    still detects at least ``tpr`` of the OOD set (``thr`` = the ``ceil(tpr n_ood)``-th largest OOD score)."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    a, b = _check_pair(s_in, s_ood)
    k = math.ceil(tpr * b.size)
    thr = np.sort(b)[::-1][k - 1]
    return float(np.mean(a >= thr))


def ood_metrics(s_in, s_ood) -> dict:
    """AUROC, AUPR with OOD positive (``aupr_out``) and with in-distribution positive (``aupr_in``,
    scores negated), FPR at 95 % TPR and the number of non-finite scores on each side."""
    a, b = _check_pair(s_in, s_ood)
    return {
        "auroc": auroc(a, b),
        "aupr_out": average_precision(a, b),
        "aupr_in": average_precision(-b, -a),
        "fpr_at_95tpr": fpr_at_tpr(a, b),
        "n_in": int(a.size),
        "n_ood": int(b.size),
        "nonfinite_in": int(np.sum(~np.isfinite(_np(s_in)))),
        "nonfinite_ood": int(np.sum(~np.isfinite(_np(s_ood)))),
    }


# ----------------------------------------------------------------------------- typicality
def typicality_scores(nll, entropy: float) -> np.ndarray:
    """Per-example typicality score ``| nll(x) - H_hat |`` (the test with batch size M = 1)."""
    return np.abs(as_ood_scores(nll) - float(entropy))


def typicality_batches(nll, entropy: float, m: int, *, k: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """``k`` bootstrap batches of size ``m`` drawn with replacement from ``nll``; returns the batch
    statistics ``| mean_batch nll - H_hat |`` (shape ``(k,)``)."""
    if m < 1 or k < 1:
        raise ValueError(f"typicality batches need m >= 1 and k >= 1, got m={m}, k={k}")
    a = as_ood_scores(nll)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(k, m))
    with np.errstate(invalid="ignore"):
        return np.abs(a[idx].mean(axis=1) - float(entropy))


def typicality_threshold(nll_val, entropy: float, m: int, *, alpha: float = 0.01, k: int = DEFAULT_BOOTSTRAP,
                         seed: int = 0) -> float:
    """``eps_alpha^M``: the ``1 - alpha`` quantile of bootstrap batch statistics on held-out
    in-distribution data (Nalisnick et al. 2019b, Alg. 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return float(np.quantile(typicality_batches(nll_val, entropy, m, k=k, seed=seed), 1.0 - alpha))


# ----------------------------------------------------------------------------- complexity
def complexity_bits(x_int, levels: int) -> np.ndarray:
    """Length in bits of ``zlib.compress`` of each integer image (values ``0..levels-1`` as one byte
    per entry, rescaled to 0..255), per dimension. ``x_int``: ``(B, *shape)`` integer levels."""
    a = _np_batch(x_int)
    if not levels >= 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    q = np.clip(np.round(a * (255.0 / (levels - 1))), 0, 255).astype(np.uint8)
    d = q.shape[1]
    return np.array([8.0 * len(zlib.compress(row.tobytes(), ZLIB_LEVEL)) / d for row in q])


def _np_batch(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().double().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def complexity_corrected(bpd, x_int, levels: int) -> np.ndarray:
    """Serra et al. (2020) score ``S(x) = bpd(x) - L(x) / D`` (bits per dimension), larger = more OOD."""
    return as_ood_scores(bpd) - complexity_bits(x_int, levels)


# ----------------------------------------------------------------------------- ratios, latents
def likelihood_ratio(log_p_model, log_p_background) -> np.ndarray:
    """OOD score ``-(log p_model - log p_background)`` (Ren et al. 2019): inputs whose likelihood
    is explained by background statistics score high."""
    return as_ood_scores(-(_np(log_p_model) - _np(log_p_background)))


def latent_norm_scores(z) -> np.ndarray:
    """``| ||z||^2 - D | / sqrt(2 D)``: distance of ``||z||^2`` from the mean of ``chi^2_D`` in
    standard deviations. ``z``: ``(B, D)`` latents (non-finite rows score ``+inf``)."""
    a = _np_batch(z)
    d = a.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.abs((a ** 2).sum(axis=1) - d) / math.sqrt(2.0 * d)
    return as_ood_scores(s)


def summarize(values: Sequence[float]) -> dict:
    """Mean, std, quantiles and non-finite count of a set of per-example values (JSON-friendly)."""
    a = _np(values)
    fin = a[np.isfinite(a)]
    out = {"n": int(a.size), "nonfinite": int(a.size - fin.size)}
    if fin.size:
        q = np.quantile(fin, [0.05, 0.25, 0.5, 0.75, 0.95])
        out.update(mean=float(fin.mean()), std=float(fin.std()), min=float(fin.min()), max=float(fin.max()),
                   q05=float(q[0]), q25=float(q[1]), median=float(q[2]), q75=float(q[3]), q95=float(q[4]))
    return out
