"""Invertibility audit: where, on what inputs and by how much a trained INN stops being invertible.

    from stableflows.audit import audit
    report = audit(flow, splits, attack="pgd")          # or audit((forward, inverse), x) / a peer flow
    print(report.verdict.table())
    report.to_json("out/report.json"); report.to_html("out/report.html")

See :mod:`.core` for what is measured, :mod:`.families` for the input families, :mod:`.attacks` for
the PGD attack and :mod:`.callback` for tracking invertibility during training.
"""
from .adapters import AdapterError, Invertible, as_invertible
from .attacks import AttackResult, constraint_box, pgd_attack, random_search
from .callback import InvertibilityTracker
from .core import DEFAULT_ATTACK, FamilyResult, audit
from .families import DEFAULT_FAMILIES, expand_families
from .localize import Localization, clip_activations, localize
from .reconstruction import Reconstruction, reconstruct, repeated_passes
from .report import AuditReport
from .spectra import Spectra, exact_singular_values, jacobians, lanczos_gram_extremes, spectra
from .verdict import FamilyVerdict, Verdict

__all__ = [
    "audit", "AuditReport", "Verdict", "FamilyVerdict", "FamilyResult", "DEFAULT_ATTACK", "DEFAULT_FAMILIES",
    "expand_families", "as_invertible", "Invertible", "AdapterError", "reconstruct", "repeated_passes",
    "Reconstruction", "spectra", "Spectra", "jacobians", "exact_singular_values", "lanczos_gram_extremes",
    "localize", "Localization", "clip_activations", "pgd_attack", "random_search", "constraint_box",
    "AttackResult", "InvertibilityTracker",
]
