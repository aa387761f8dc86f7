"""``stableflows ood``: the command lives with the OOD package (:mod:`stableflows.ood.cli`)."""
from ..ood.cli import HELP, NAME, __doc__, add_arguments, run  # noqa: F401
