"""stableflows: invertible neural networks that stay invertible.

Build (``stableflows.transforms``, ``stableflows.models``), train (``stableflows.train``),
audit (``stableflows.audit``) and reproduce (``stableflows.experiments``). The layer contract is
documented in :mod:`stableflows.transforms.base`.
"""
__version__ = "0.1.0"
