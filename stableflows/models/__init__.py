"""Model factories: keyword-only arguments, each returns a ready :class:`Flow` (or classifier)."""
from .flow import Flow, standard_normal_log_prob
from .factories import cv_glow, glow, nice, realnvp
from .registry import MODELS, build_model, register_model
from .residual import iresnet, resflow
from .classifier import classifier, hybrid
from .conditional import cinn, make_conditional, one_hot

__all__ = ["Flow", "standard_normal_log_prob", "glow", "realnvp", "nice", "cv_glow", "resflow", "iresnet",
           "classifier", "hybrid", "cinn", "make_conditional", "one_hot", "MODELS", "build_model", "register_model"]
