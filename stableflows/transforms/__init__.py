"""Invertible layers. Every class follows the contract of :mod:`stableflows.transforms.base`."""
from .base import *  # noqa: F401,F403
