"""Out-of-distribution behaviour of likelihood models (Nalisnick et al. 2019, paper 004).

>>> from stableflows.ood import analyze, OODConfig, write_report   # doctest: +SKIP
>>> result = analyze(flow, splits, OODConfig(families=("uniform", "constant")))
>>> write_report(result, "out/")                                     # ood.json + ood.html

Modules: :mod:`.scores` (AUROC / AUPR, typicality, complexity, likelihood ratio),
:mod:`.decompose` (log p(z) + log-det per example, layer and scale), :mod:`.probes` (constant /
random inputs, graying), :mod:`.second_order` (sec. 5, Eq. 4-6), :mod:`.invertibility` (round-trip
flags and audit verdicts), :mod:`.background` (likelihood-ratio background data), :mod:`.analysis`
(everything together), :mod:`.report` (JSON + HTML), :mod:`.cli` (``stableflows ood``).

The names below are imported lazily, so that ``stableflows.ood.cli`` (the command's ``--help``)
does not load torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "analysis": ("analyze", "OODConfig", "OODResult", "SetData", "build_sets", "DATASET_FAMILIES"),
    "report": ("write_report",),
    "decompose": ("likelihood_terms", "Terms", "decompose", "Decomposition", "scale_layout"),
    "invertibility": ("invertibility", "audit_verdicts", "INVERTIBLE_TOL"),
    "probes": ("constant_inputs", "random_inputs", "graying_curve", "GRAY_FACTORS"),
    "scores": ("auroc", "average_precision", "fpr_at_tpr", "ood_metrics", "typicality_scores", "typicality_batches",
               "typicality_threshold", "complexity_corrected", "likelihood_ratio", "latent_norm_scores"),
    "second_order": ("curvature", "second_order_prediction", "paper_eq6"),
    "background": ("perturb", "perturbed_splits"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
