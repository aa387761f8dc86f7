"""Model factories: keyword-only arguments, each returns a ready :class:`Flow`."""
from .flow import Flow, standard_normal_log_prob
from .factories import cv_glow, glow, nice, realnvp
from .registry import MODELS, build_model, register_model

__all__ = ["Flow", "standard_normal_log_prob", "glow", "realnvp", "nice", "cv_glow", "MODELS", "build_model",
           "register_model"]
