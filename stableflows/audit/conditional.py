"""The audit of a conditional flow (cINN): one audit per context, merged into one report.

A conditional flow is a family of bijections ``x -> F(x; c)``, one per context ``c``; it is
invertible where every one of them is. :func:`audit_conditional` (reached through
``audit(flow, x, context=c)``) groups the examples by their context row, and for each distinct
context ``c_j`` audits the unconditional map ``F(.; c_j)`` (:func:`~stableflows.transforms.base.bind_context`)
on every family: data families (``test``, ``train``, the OOD families derived from the data) on the
examples whose context is ``c_j``, latent families (``samples``, ``clipped``) generating
``x = F^-1(z; c_j)``, so the contexts of the samples are drawn from the data. Every check of the
unconditional audit (round trips, float64 shadow, repeated passes, spectra, per-layer localisation,
PGD) runs on each map as it is.

The report has one family per (family, context): ``"test | class 3"`` (a one-hot context is named
by its class, others ``"context j"``, their values in ``meta["contexts"]``); the verdict is the
merged one. ``n`` (examples per family, default all) is shared among the contexts in proportion to
their examples, so a latent family draws one sample per audited data example, with its context;
the per-family point budgets (``repeat_points``, ``spectra_points``, ``localize_points``, the
attack's ``examples``, the time ``budget``) are split evenly, so the audit costs about what the
unconditional one does. At most :data:`MAX_CONTEXTS`
distinct contexts are audited (chosen at random with ``seed`` when there are more, e.g. a
continuous context with one value per example); the report's notes say how many examples that left out.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..transforms.base import ContextError, bind_context, check_context, context_shape_of

__all__ = ["audit_conditional", "context_groups", "label_contexts", "MAX_CONTEXTS"]

MAX_CONTEXTS = 16  # distinct contexts audited at most (class-conditional digits: 10)
SHARED = ("repeat_points", "spectra_points", "localize_points")  # per-family point budgets split over contexts


def _class_of(c: Tensor) -> int:
    """The class of a one-hot row, else -1."""
    flat = c.reshape(-1)
    ones = flat == 1
    if flat.numel() > 1 and int(ones.sum()) == 1 and bool(((flat == 0) | ones).all()):
        return int(ones.nonzero()[0, 0])
    return -1


def _label(c: Tensor, j: int) -> str:
    """``"class k"`` for a one-hot row, else ``"context j"``."""
    k = _class_of(c)
    return f"class {k}" if k >= 0 else f"context {j}"


def label_contexts(flow, splits, split: str = "test") -> dict:
    """``{"context": ..., "train_context": ...}`` (one-hot labels of ``split`` and of the training
    split) for a conditional flow, ``{}`` for any other model: the extra arguments of ``audit``."""
    cs = context_shape_of(flow) if isinstance(flow, torch.nn.Module) else None
    if cs is None:
        return {}
    out = {"context": _labels_as_context(getattr(splits, f"y_{split}", None), cs, f"{split} split")}
    if splits.y_train is not None:
        out["train_context"] = _labels_as_context(splits.y_train, cs, "training split")
    return out


def context_groups(context: Tensor, max_contexts: int = MAX_CONTEXTS, seed: int = 0) -> tuple[Tensor, list[Tensor], int]:
    """``(distinct rows (G, *cs), row indices of each, number of rows left out)``: the examples grouped
    by their context row, at most ``max_contexts`` groups (a seeded random choice, in order)."""
    values, inverse = torch.unique(context.reshape(context.shape[0], -1), dim=0, return_inverse=True)
    keep = torch.arange(values.shape[0])
    if values.shape[0] > max_contexts:
        keep = torch.sort(torch.randperm(values.shape[0], generator=torch.Generator().manual_seed(seed))[:max_contexts]).values
    groups = [(inverse == g).nonzero().flatten() for g in keep.tolist()]
    order = sorted(range(len(groups)), key=lambda i: (_class_of(values[keep[i]]), int(groups[i][0])))
    keep, groups = keep[order], [groups[i] for i in order]
    left = context.shape[0] - sum(int(g.numel()) for g in groups)
    return values[keep].reshape(-1, *context.shape[1:]), groups, left


def _rows_like(context: Tensor, values: Tensor) -> list[Tensor]:
    """Per value row, the indices of the rows of ``context`` equal to it."""
    flat = context.reshape(context.shape[0], -1)
    return [(flat == v.reshape(1, -1)).all(dim=1).nonzero().flatten() for v in values]


def _labels_as_context(y: Tensor | None, cs: tuple[int, ...], what: str) -> Tensor:
    from ..models.conditional import one_hot

    if y is None:
        raise ContextError(f"the flow is conditional and the data have no labels: give context= for the {what}")
    if len(cs) != 1:
        raise ContextError(f"the flow's contexts have shape {cs}, not one-hot labels: give context= for the {what}")
    return one_hot(y, cs[0])


def _sub_options(options: dict, groups: int, n_rows: int | None, n: int | None, total: int | None) -> dict:
    """The options of one context's audit: budgets shared among ``groups`` contexts."""
    out = dict(options)
    for k in SHARED:
        if out.get(k):
            out[k] = max(1, math.ceil(out[k] / groups))
    if out.get("budget") is not None:
        out["budget"] = out["budget"] / groups
    if out.get("attack_kwargs") is not None or out.get("attack"):
        kw = dict(out.get("attack_kwargs") or {})
        if "examples" in kw:
            kw["examples"] = max(1, math.ceil(kw["examples"] / groups))
        out["attack_kwargs"] = kw or None
    if n_rows is None:  # no data: the contexts to sample under share n
        out["n"] = None if n is None else max(1, math.ceil(n / groups))
    else:  # n (default: every example) in proportion to the examples of each context
        out["n"] = n_rows if n is None or n >= total else max(1, math.ceil(n * n_rows / total))
    return out


def _rename(obj, name: str):
    if hasattr(obj, "name"):
        obj.name = name
    v = getattr(obj, "verdict", None)
    if v is not None and hasattr(v, "name"):
        v.name = name
    return obj


def audit_conditional(audit, model, data=None, context: Tensor | None = None, *, train_context: Tensor | None = None,
                      **options: Any):
    """:func:`stableflows.audit.audit` of a conditional flow (module docstring): ``context``
    ``(B, *context_shape)`` holds one row per example of ``data`` (for ``data`` None: the contexts to
    sample under); with a labelled ``Splits`` and one-hot contexts it defaults to the labels, as does
    ``train_context`` for the training split. ``audit`` is the unconditional audit function."""
    from .report import AuditReport

    cs = context_shape_of(model) if isinstance(model, torch.nn.Module) else None
    if cs is None:
        raise ContextError(f"a context was given, but {type(model).__name__} is not a conditional stableflows flow")
    if options.get("inverse") is not None:
        raise ConfigError("a conditional flow is audited as a stableflows model: inverse= does not apply")
    options.pop("inverse", None)
    levels, train = options.pop("levels", None), options.pop("train", None)
    test = data
    if data is not None and hasattr(data, "test") and hasattr(data, "levels"):  # stableflows.data.Splits
        if levels is not None and levels != data.levels:
            raise ConfigError(f"levels={levels} contradicts the dataset's {data.levels}")
        test, levels = data.test, data.levels
        if train is None:
            train = data.train
            if train_context is None and data.y_train is not None:
                train_context = _labels_as_context(data.y_train, cs, "training split")
            elif train_context is None:
                train = None  # no labels: the training split cannot be grouped by context
        if context is None:
            context = _labels_as_context(data.y_test, cs, "test split")
    if context is None:
        raise ContextError(f"the flow is conditional: give context= of shape (batch, {', '.join(map(str, cs))}), one "
                           "row per example of the data (or the contexts to sample under when data is None)")
    if test is not None and not torch.is_tensor(test):
        raise ConfigError(f"data must be a tensor (B, *shape) or a stableflows Splits, got {type(test).__name__}")
    check_context(context, cs, test.shape[0] if test is not None else context.shape[0])
    context = context.detach().cpu()
    if train is not None:
        if train_context is None:
            raise ContextError("the flow is conditional: give train_context= (one context row per training example) "
                               "with train=")
        check_context(train_context, cs, train.shape[0], what="train_context")
        train_context = train_context.detach().cpu()
    values, groups, left = context_groups(context, seed=options.get("seed", 0))
    train_rows = _rows_like(train_context, values) if train is not None else None
    families = options.pop("families")
    n = options.pop("n", None)
    reports, labels = [], []
    for j, (c, idx) in enumerate(zip(values, groups)):
        label = _label(c, j)
        sub = _sub_options(options, len(groups), int(idx.numel()) if test is not None else None, n,
                           test.shape[0] if test is not None else None)
        sub["seed"] = options.get("seed", 0) + j
        tr = train[train_rows[j].to(train.device)] if train_rows is not None else None
        x = test[idx.to(test.device)] if test is not None else None
        if options.get("progress"):
            print(f"audit: {label} ({j + 1} of {len(groups)} contexts)", file=sys.stderr, flush=True)
        with bind_context(model, c):
            reports.append(audit(model, x, levels=levels, train=tr if tr is not None and tr.shape[0] else None,
                                 families=families, n=sub.pop("n"), **sub))
        labels.append(label)
    return _merge(AuditReport, reports, labels, values, cs, left, context.shape[0])


def _merge(AuditReport, reports, labels, values, cs, left: int, total: int):
    families, attacks, verdicts, notes = {}, {}, {}, []
    timings: dict[str, float] = {}
    for k in reports[0].verdict.families:  # family-major: "test | class 0", "test | class 1", ...
        for rep, label in zip(reports, labels):
            if k in rep.verdict.families:
                verdicts[f"{k} | {label}"] = _rename(rep.verdict.families[k], f"{k} | {label}")
    for rep, label in zip(reports, labels):
        for k, v in rep.verdict.families.items():  # families only some contexts had
            verdicts.setdefault(f"{k} | {label}", _rename(v, f"{k} | {label}"))
    for k in verdicts:
        name, label = k.split(" | ")
        rep = reports[labels.index(label)]
        if name in rep.families:
            families[k] = _rename(rep.families[name], k)
        elif name in rep.attacks:
            attacks[k] = _rename(rep.attacks[name], k)
    for rep, label in zip(reports, labels):
        for t, s in rep.timings.items():
            timings[t] = timings.get(t, 0.0) + float(s)
        notes += [f"[{label}] {m}" for m in rep.notes]
    if left:
        notes.insert(0, f"{len(reports)} distinct contexts audited (at most {MAX_CONTEXTS}); the {left} of {total} "
                        "examples with other contexts were not audited")
    meta = dict(reports[0].meta)
    meta.update(conditional=True, context_shape=list(cs), contexts=labels, context_values=values.tolist(),
                n_test=sum(int(r.meta.get("n_test") or 0) for r in reports) or None)
    verdict = dataclasses.replace(reports[0].verdict, families=verdicts)
    return AuditReport(meta=meta, families=families, attacks=attacks, verdict=verdict, timings=timings, notes=notes)
