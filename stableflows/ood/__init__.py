"""Out-of-distribution behaviour of likelihood models (Nalisnick et al. 2019, paper 004).

>>> from stableflows.ood import analyze, OODConfig, write_report   # doctest: +SKIP
>>> result = analyze(flow, splits, OODConfig(families=("uniform", "constant")))
>>> write_report(result, "out/")                                     # ood.json + ood.html

Modules: :mod:`.scores` (AUROC / AUPR, typicality, complexity, likelihood ratio),
:mod:`.decompose` (log p(z) + log-det per example, layer and scale), :mod:`.probes` (constant /
random inputs, graying), :mod:`.second_order` (sec. 5, Eq. 4-6), :mod:`.invertibility` (round-trip
flags), :mod:`.analysis` (everything together), :mod:`.report` (JSON + HTML), :mod:`.cli`
(``stableflows ood``).
"""
from .analysis import DATASET_FAMILIES, OODConfig, OODResult, SetData, analyze, build_sets
from .background import perturb, perturbed_splits
from .decompose import Decomposition, Terms, decompose, likelihood_terms, scale_layout
from .invertibility import INVERTIBLE_TOL, invertibility
from .probes import GRAY_FACTORS, constant_inputs, graying_curve, random_inputs
from .report import write_report
from .scores import (auroc, average_precision, complexity_corrected, fpr_at_tpr, latent_norm_scores,
                     likelihood_ratio, ood_metrics, typicality_batches, typicality_scores, typicality_threshold)
from .second_order import curvature, paper_eq6, second_order_prediction

__all__ = [
    "analyze", "OODConfig", "OODResult", "SetData", "build_sets", "DATASET_FAMILIES", "write_report",
    "likelihood_terms", "Terms", "decompose", "Decomposition", "scale_layout",
    "invertibility", "INVERTIBLE_TOL",
    "constant_inputs", "random_inputs", "graying_curve", "GRAY_FACTORS",
    "auroc", "average_precision", "fpr_at_tpr", "ood_metrics", "typicality_scores", "typicality_batches",
    "typicality_threshold", "complexity_corrected", "likelihood_ratio", "latent_norm_scores",
    "curvature", "second_order_prediction", "paper_eq6", "perturb", "perturbed_splits",
]
