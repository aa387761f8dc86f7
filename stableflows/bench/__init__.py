"""Benchmarks against the flow libraries users would otherwise pick (``stableflows bench``).

* :mod:`.contender` -- :class:`Contender`, the uniform view of a model of any library;
* :mod:`.models` -- stableflows' contenders and the registry of every model (``available()``);
* :mod:`.peers` -- adapters building comparable models of normflows, zuko, FrEIA and nflows;
* :mod:`.harness` -- train and measure one model under a wall-clock budget (one process);
* :mod:`.session` -- every model in its own process, then JSON + Markdown reports;
* :mod:`.flops` -- FLOPs of a training step and the rate of a large matmul (the physical limit).

    from stableflows.bench import BenchSettings, run_session
    report, where = run_session(["stableflows-glow", "zuko-nsf"], BenchSettings(budget=10))
"""
from .contender import Contender, count_params, match_hidden
from .harness import BenchSettings, run_one
from .models import available, build
from .session import run_session

__all__ = ["Contender", "count_params", "match_hidden", "BenchSettings", "run_one", "available", "build",
           "run_session"]
