"""Train a flow by maximum likelihood, or an invertible classifier / hybrid model (--objective);
outputs (metrics, checkpoints, figures) go to --out-dir.

Examples:
  stableflows train --config configs/demo.toml
  stableflows train --model glow --data digits --hidden 64 --steps 2000 --time-budget 120
  stableflows train --out-dir runs/demo --resume --steps 4000     # continue an earlier run
  stableflows train --config configs/classifier_digits_fd.toml    # classifier, FD regulariser, memory saving
  stableflows train --model classifier --objective classification --data digits --memory-saving \
      --fd-forward 1e-3 --fd-inverse 1e-3 --angle-every 50 --fallback
  stableflows train --model hybrid --objective hybrid --block coupling --lam 0.015625 --data digits
"""
from __future__ import annotations

import argparse

from .options import add_config_arguments, config_from_args, stored_config

NAME = "train"
HELP = ("train a flow (maximum likelihood) or an invertible classifier / hybrid model (EMA, validation-selected "
        "weights, atomic checkpoints)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/last.pt: model, optimizer, EMA, RNG states and step are "
                             "restored, so the run follows the trajectory of an uninterrupted one; without "
                             "--config the stored config is used (flags still override it)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train, validate_config

    base = None
    if args.resume and not args.config:
        out_dir = getattr(args, "cfg.train.out_dir", None)
        if out_dir is None:
            from ..config import TrainConfig

            out_dir = TrainConfig().out_dir
        base = stored_config(out_dir)
    cfg = config_from_args(args, base)
    validate_config(cfg)

    def mark_started(event: str, record: dict) -> None:
        if event == "start":
            args._started = True

    result = train(cfg, resume=args.resume, callbacks=[mark_started])
    m = result.metric
    unit = {"bpd": "bits/dim, fixed dequantisation noise (seed 0)", "nll": "nats per example",
            "error": "classification error"}.get(m, "")
    print(f"test {m}: {result.test:.4f} {unit}; weights of step {result.best_step} "
          f"(best validation {m} {result.best_val:.4f})")
    extra = {k: v for k, v in result.test_metrics.items() if k != m}
    if extra:
        print("test " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()))
    checks = [r for r in result.history if r.get("kind") == "grad_check"]
    if checks:
        finite = [r for r in checks if not r["nonfinite"] and r["angle"] == r["angle"]]
        worst = (f"largest angle {max(r['angle'] for r in finite):.3g} deg" if finite else "no finite angle")
        print(f"gradient checks: {len(checks)} ({worst}; non-finite memory-saving gradients: "
              f"{len(checks) - len(finite)}), fallbacks to stored activations: {sum(r['fallback'] for r in checks)}")
    print(f"steps: {result.steps} in {result.train_time:.1f} s training + {result.eval_time:.1f} s evaluation "
          f"({result.steps_per_s:.2f} steps/s), parameters: {result.n_params}, peak RSS: {result.peak_rss_mb:.0f} MiB")
    if result.nonfinite_steps:
        print(f"skipped non-finite steps: {result.nonfinite_steps}")
    print(f"outputs: {result.out_dir}/ (metrics.jsonl, metrics.json, best.pt, last.pt, samples.png, curve.png)")
    return 0
