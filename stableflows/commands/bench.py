"""Benchmark stableflows against other flow libraries on the digits task or Fashion-MNIST (one process per model).

Every model trains with the same recipe (batch 64, AdamW 1e-3, warm-up, clipping, EMA, validation
selection) for a fixed wall-clock budget, then is measured: parameters, steps/s, test bits/dim
(validation-selected and end of budget), peak memory, reconstruction error on test data and on
noise / constant / out-of-range inputs, % non-finite, time of one inverse pass, and the FLOP rate
of a training step as a fraction of a large matmul's. Then the Glow-like models are timed once more,
together in one process in interleaved rounds (median ms per step; this paired timing decides the
Glow speed target). Peer libraries (normflows, zuko, FrEIA, nflows) are included when they import.

Examples:
  stableflows bench                                    # every available model, 120 s each
  stableflows bench --budget 10 --models stableflows-glow,zuko-nsf
  stableflows bench --data fashion-mnist --budget 600     # 28x28, Debian's dataset-fashion-mnist files
  stableflows bench --list
"""
from __future__ import annotations

import argparse

from ..bench.contender import LOGIT_ALPHA, TASKS

NAME = "bench"
HELP = "benchmark stableflows' flows against normflows / zuko / FrEIA / nflows (JSON + Markdown table)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.harness import BenchSettings

    d = BenchSettings()
    parser.add_argument("--models", default="all", metavar="NAMES",
                        help="comma-separated model names (see --list), or 'all' (default)")
    parser.add_argument("--list", action="store_true", help="list the available models and exit")
    parser.add_argument("--data", default=d.data, choices=sorted(TASKS) + ["fmnist"],
                        help="the task: digits (8x8, 17 levels; embedded) or fashion-mnist (28x28, 256 levels; "
                             f"local files, see `make data`) (default: {d.data})")
    parser.add_argument("--budget", type=float, default=d.budget, metavar="SECONDS",
                        help=f"seconds of training per model (default: {d.budget:g})")
    parser.add_argument("--measure-budget", type=float, default=None, metavar="SECONDS",
                        help="seconds per model for the reconstruction round trips after training, shared by the "
                             "test and OOD sets (default: the training budget); a set whose share runs out is "
                             "reported on the inputs measured so far")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                        help=f"training batch (default: {d.batch_size})")
    parser.add_argument("--threads", type=int, default=d.threads, metavar="N",
                        help=f"CPU threads of every model's process (default: {d.threads})")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                        help=f"steps between validation evaluations (default: {d.eval_every})")
    parser.add_argument("--seed", type=int, default=d.seed, metavar="N", help=f"seed (default: {d.seed})")
    parser.add_argument("--preprocess", choices=("logit", "none"), default=d.preprocess,
                        help=f"pre-transform of every model: stableflows' Logit({LOGIT_ALPHA}), whose log-det counts, or none "
                             f"(default: {d.preprocess})")
    parser.add_argument("--no-match-params", dest="match_params", action="store_false",
                        help="use every model's own default width instead of matching its parameter count to "
                             "stableflows' Glow")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip the FLOP count and the matmul reference")
    parser.add_argument("--paired-rounds", type=int, default=d.paired_rounds, metavar="N",
                        help="interleaved rounds of the paired step timing of the Glow-like models in one process, "
                             f"which decides the Glow speed target; 0 skips it (default: {d.paired_rounds})")
    parser.add_argument("--device", default=d.device, metavar="DEVICE", help=f"cpu | cuda (default: {d.device})")
    parser.add_argument("--out-dir", default="runs/bench", metavar="DIR",
                        help="where <UTC time>/bench.{json,md} and latest.{json,md} are written (default: runs/bench)")


def run(args: argparse.Namespace) -> int:
    from ..bench.harness import BenchSettings
    from ..bench.models import available
    from ..bench.session import run_session

    table = available()
    if args.list:
        import warnings

        for name, build in table.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = build(None, "logit")
            print(f"{name:22s} {c.family:14s} {c.description}")
        return 0
    names = list(table) if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown or unavailable model(s) {', '.join(unknown)}; available: {', '.join(table)}")
    settings = BenchSettings(budget=args.budget, batch_size=args.batch_size, threads=args.threads,
                             eval_every=args.eval_every, seed=args.seed, preprocess=args.preprocess,
                             match_params=args.match_params, device=args.device, flops=args.flops,
                             paired_rounds=args.paired_rounds, data=args.data, measure_budget=args.measure_budget)
    args._started = True
    session, where = run_session(names, settings, args.out_dir)
    print(f"report: {where}/bench.md (and {args.out_dir}/latest.md)")
    failed = [r["name"] for r in session["results"] if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed and len(failed) == len(names) else 0
