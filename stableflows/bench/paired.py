"""Paired step timing: several contenders in one process, timed in interleaved rounds.

The per-model processes of a session run one after the other, minutes apart; on a shared machine
their steps/s differ by up to ~10 % from one run to the next (2026-11-23: FrEIA AllInOne 13.0 steps/s in
one session, 11.4 and 11.8 in the next, the same code). For a speed *ratio*, every model here takes
the same harness step (:meth:`stableflows.bench.harness._Run.train_step`: batch, forward, backward,
clipping, fused AdamW, EMA) in rounds ``A B C ... A B C ...``; each round times ``steps`` steps per
model, so slow phases of the machine hit every model alike. Reported per model: the median over
rounds of the milliseconds per step, and its ratio to the first model's.

Run in its own process by the session (``python -m stableflows.bench.paired NAMES --out FILE``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Any, Sequence

import torch

from .harness import BenchSettings, _json_safe, _Run

__all__ = ["paired_step_times", "PAIRED_ROUNDS", "PAIRED_STEPS", "PAIRED_WARMUP", "main"]

PAIRED_ROUNDS = BenchSettings().paired_rounds  # interleaved rounds
PAIRED_STEPS = 20  # timed steps per model and round
PAIRED_WARMUP = 10  # untimed steps per model first (allocator, lazy state)


def paired_step_times(names: Sequence[str], settings: BenchSettings | None = None, *, target_params: int | None = None,
                      rounds: int = PAIRED_ROUNDS, steps: int = PAIRED_STEPS, warmup: int = PAIRED_WARMUP,
                      splits=None, contenders: dict | None = None) -> dict[str, Any]:
    """Median ms per training step of each of ``names`` over ``rounds`` interleaved rounds.

    ``contenders`` (name -> :class:`~.contender.Contender`) replaces the registry (tests).
    Returns ``{"rounds", "steps", "models": [{"name", "params", "ms_per_step", "rounds_ms",
    "ratio_to_first"}]}`` where ``ratio_to_first`` = first model's ms / this model's ms (> 1: the
    first model is slower)."""
    from ..config import DataConfig
    from ..data import load_dataset
    from ..train.distributed import resolve_device
    from .contender import TASKS
    from .models import build, reference_params

    if len(names) < 1 or rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError("need at least one model, rounds >= 1, steps >= 1, warmup >= 0")
    s = settings or BenchSettings()
    task = TASKS[s.data]
    torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    splits = splits if splits is not None else load_dataset(DataConfig(name=task.data), seed=s.seed)
    if target_params is None and s.match_params and contenders is None:
        target_params = reference_params(s.preprocess, task.shape)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            torch.manual_seed(s.seed)
            c = contenders[name] if contenders is not None else build(
                name, match=target_params if s.match_params else None, preprocess=s.preprocess, shape=task.shape)
            runs[name] = _Run(c, splits, s, device)
            for _ in range(warmup):
                runs[name].train_step()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for name in names:
                t0 = time.perf_counter()
                for _ in range(steps):
                    runs[name].train_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(1e3 * (time.perf_counter() - t0) / steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    first = med[names[0]]
    return {"rounds": rounds, "steps": steps, "threads": torch.get_num_threads(), "device": str(device),
            "models": [{"name": n, "params": runs[n].c.n_params, "ms_per_step": med[n], "rounds_ms": times[n],
                        "skipped_steps": runs[n].skipped, "ratio_to_first": first / med[n]} for n in names]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stableflows.bench.paired")
    p.add_argument("names", help="comma-separated contenders; ratios are to the first")
    p.add_argument("--settings", default="{}", help="BenchSettings as JSON")
    p.add_argument("--target-params", type=int, default=None)
    p.add_argument("--rounds", type=int, default=PAIRED_ROUNDS)
    p.add_argument("--steps", type=int, default=PAIRED_STEPS)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        rec = paired_step_times(a.names.split(","), BenchSettings.from_dict(json.loads(a.settings)),
                                target_params=a.target_params, rounds=a.rounds, steps=a.steps)
    except Exception as e:  # noqa: BLE001 - the session records the failure and goes on
        rec = {"error": f"{type(e).__name__}: {e}"[:500]}
    with open(a.out, "w") as f:
        json.dump(_json_safe(rec), f, indent=1)
    return 0 if "error" not in rec else 1


if __name__ == "__main__":
    sys.exit(main())
