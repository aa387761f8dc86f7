"""``stableflows audit``: the command lives with the audit package (:mod:`stableflows.audit.cli`)."""
from ..audit.cli import HELP, NAME, __doc__, add_arguments, run  # noqa: F401
