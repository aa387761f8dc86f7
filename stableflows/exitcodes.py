"""Exit statuses of the ``stableflows`` command line, one meaning each (a CI job can branch on them).

=====  ==================  ===========================================================================
code   name                meaning
=====  ==================  ===========================================================================
0      ``OK``              the command did what was asked (an audit found the model invertible)
1      ``NOT_INVERTIBLE``  a verdict: ``audit`` / ``ood`` with ``--fail-on-noninvertible`` found a
                           family that does not reconstruct within tolerance
2      ``USAGE``           usage or configuration error detected before any work: unknown option or
                           name, bad value, unreadable config, missing or corrupt data / checkpoint
3      ``COULD_NOT_RUN``   the work started but could not be completed: training diverged, the model
                           or an adapter raised, a file system fault during the run
130    ``INTERRUPTED``     stopped by SIGINT / SIGTERM (state saved where the command can save it)
=====  ==================  ===========================================================================
"""
from __future__ import annotations

__all__ = ["OK", "NOT_INVERTIBLE", "USAGE", "COULD_NOT_RUN", "INTERRUPTED"]

OK = 0
NOT_INVERTIBLE = 1
USAGE = 2
COULD_NOT_RUN = 3
INTERRUPTED = 130
