"""Every option of a run checked before any work: finite numbers in their ranges, known names.

:func:`validate_config` raises one :class:`~stableflows.config.ConfigError` listing every problem.
Two generic rules cover every field, also ones added later: a float option must be finite (``inf``
and ``nan`` are never meaningful settings) and an integer option must be >= 0. The specific rules
below add the ranges. Model-family details (e.g. ``coeff < 1`` of residual flows) are checked
again by the factories.
"""
from __future__ import annotations

import dataclasses
import math

from ..config import DEFAULT_LOGIT_ALPHA, ConfigError, RunConfig

__all__ = ["validate_config", "OBJECTIVE_CHOICES", "SUPERVISED", "SUPERVISED_ONLY", "MAX_SEED"]

OBJECTIVE_CHOICES = ("likelihood", "classification", "hybrid")  # train.objective
SUPERVISED = ("classification", "hybrid")
# options of the supervised objectives (with their "off" values): set with objective = likelihood -> error
SUPERVISED_ONLY = {"fd_forward": 0.0, "fd_inverse": 0.0, "nf_weight": 0.0, "label_smoothing": 0.0}
MAX_SEED = 2**32 - 1  # numpy / scikit-learn accept seeds in [0, 2**32)
POSITIVE_INTS = {  # integer options that must be >= 1 (the others must be >= 0)
    "model": ("hidden", "levels", "steps_per_level", "n_series_terms", "n_classes", "head_hidden", "n_samples",
              "mlp_layers", "max_power_iter", "inverse_max_iter"),
    "data": ("n_toy",),
    "train": ("steps", "batch_size", "eval_every", "fd_every", "threads"),
}


def _generic(cfg: RunConfig) -> list[str]:
    """Finite floats and non-negative integers in every section."""
    problems = []
    for section in ("model", "data", "train"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{section}.{f.name} must be a finite number, got {v}")
            elif isinstance(v, int):
                low = 1 if f.name in POSITIVE_INTS.get(section, ()) else 0
                if v < low:
                    problems.append(f"{section}.{f.name} must be >= {low}, got {v}")
    return problems


def _given(value, check) -> bool:
    """``check(value)``, or True for an option left unset (None: the model's own default)."""
    return value is None or bool(check(value))


def validate_config(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range model / data / training option."""
    t, d, m = cfg.train, cfg.data, cfg.model
    rules = [
        (t.time_budget is None or t.time_budget > 0, f"train.time_budget must be > 0 seconds, got {t.time_budget}"),
        (_given(t.lr, lambda v: v > 0), f"train.lr must be a positive number, got {t.lr}"),
        (_given(t.weight_decay, lambda v: v >= 0), f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (_given(t.grad_clip, lambda v: v >= 0), f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}"),
        (_given(t.ema_decay, lambda v: 0 <= v < 1), f"train.ema_decay must lie in [0, 1), got {t.ema_decay}"),
        (_given(t.seed, lambda v: v <= MAX_SEED), f"train.seed must lie in [0, 2**32), got {t.seed}"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
         f"train.device must be auto, cpu or cuda[:i], got {t.device!r}"),
        (t.out_dir is None or (isinstance(t.out_dir, str) and t.out_dir.strip() != ""),
         "train.out_dir must be a non-empty path (or none for runs/<model>-<data>-<time>)"),
        (_given(d.val_size, lambda v: 0 < v < 1), f"data.val_size must lie in (0, 1), got {d.val_size}"),
        (t.objective in OBJECTIVE_CHOICES,
         f"train.objective must be one of {', '.join(OBJECTIVE_CHOICES)}, got {t.objective!r}"),
        (_given(t.fd_forward, lambda v: v >= 0), f"train.fd_forward must be >= 0 (0 disables), got {t.fd_forward}"),
        (_given(t.fd_inverse, lambda v: v >= 0), f"train.fd_inverse must be >= 0 (0 disables), got {t.fd_inverse}"),
        (_given(t.fd_eps, lambda v: v > 0), f"train.fd_eps must be > 0, got {t.fd_eps}"),
        (_given(t.nf_weight, lambda v: v >= 0), f"train.nf_weight must be >= 0 (0 disables), got {t.nf_weight}"),
        (_given(t.label_smoothing, lambda v: 0 <= v < 1), f"train.label_smoothing must lie in [0, 1), got {t.label_smoothing}"),
        (_given(t.max_angle, lambda v: 0 < v <= 180), f"train.max_angle must lie in (0, 180] degrees, got {t.max_angle}"),
        (_given(t.max_rel_error, lambda v: v > 0), f"train.max_rel_error must be > 0, got {t.max_rel_error}"),
        (_given(getattr(t, "log_every", None), lambda v: v > 0), f"train.log_every must be > 0 seconds, got {getattr(t, 'log_every', None)}"),
        (_given(m.logit_alpha, lambda v: 0 <= v < 0.5),
         f"model.logit_alpha must lie in [0, 0.5) (0 disables), got {m.logit_alpha}"),
        (_given(m.coeff, lambda v: v > 0), f"model.coeff must be > 0, got {m.coeff}"),
        (_given(m.lam, lambda v: v >= 0), f"model.lam must be >= 0, got {m.lam}"),
        (_given(m.p, lambda v: v >= 0), f"model.p must be >= 0 (0: the estimator's default), got {m.p}"),
        (_given(m.n_classes, lambda v: v >= 2), f"model.n_classes must be >= 2, got {m.n_classes}"),
        *[(_given(getattr(m, k, None), lambda v: v >= 0), f"model.{k} must be >= 0, got {getattr(m, k, None)}")
          for k in ("power_atol", "power_rtol", "inverse_atol", "inverse_rtol")],
        (not (t.objective == "hybrid" and (t.nf_weight or 0) > 0),
         "train.nf_weight applies to the classification objective; the hybrid objective already contains "
         "log p(x): weigh it with model.lam"),
    ]
    if t.objective == "likelihood":
        rules += [(getattr(t, k) == off, f"train.{k} applies to the classification and hybrid objectives only "
                                         f"(train.objective is likelihood)") for k, off in SUPERVISED_ONLY.items()]
    alpha = m.logit_alpha if m.logit_alpha is not None else (0.0 if m.model == "classifier" else DEFAULT_LOGIT_ALPHA)
    if t.objective in SUPERVISED and (t.fd_forward or 0) > 0 and alpha > 0:
        rules.append((False, f"train.fd_forward perturbs the input by eps = {t.fd_eps} in a random direction, "
                             f"which can leave the domain of the logit pre-transform (model.logit_alpha = "
                             f"{alpha:g}, inputs near [0, 1]): set model.logit_alpha = 0 "
                             "(--logit-alpha 0)"))
    if ((t.angle_every or 0) > 0 or t.fallback) and not m.memory_saving:
        rules.append((False, "train.angle_every / train.fallback check memory-saving gradients: set "
                             "model.memory_saving = true"))
    problems = _generic(cfg)
    seen = {p.split(" ", 1)[0] for p in problems}  # one message per option
    problems += [msg for ok, msg in rules if not ok and msg.split(" ", 1)[0] not in seen]
    if problems:
        raise ConfigError("invalid options: " + "; ".join(problems))
