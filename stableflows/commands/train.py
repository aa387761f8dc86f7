"""Train a flow by maximum likelihood, or an invertible classifier / hybrid model (--objective);
outputs (config, metrics, checkpoints, figures) go to --out-dir (default: a new
runs/<model>-<data>-<UTC time>).

A directory that already holds a run is refused unless --resume (continue it) or --overwrite
(replace it; the earlier run is deleted only once the new one has written its first checkpoint).
Ctrl-C / SIGTERM finish the current step, save last.pt and exit with status 130; --resume then
continues exactly. In a terminal a progress bar shows the step at which the run will stop; when
stdout is not a terminal (a log file) one line is printed every --log-every seconds.

Examples:
  stableflows train --config configs/demo.toml
  stableflows train --model glow --data digits --hidden 64 --steps 2000 --time-budget 120 --out-dir runs/g
  stableflows train --out-dir runs/g --resume --steps 4000         # continue an earlier run
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
DENSITY_KEYS = ("bpd", "nats_per_dim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/last.pt: model, optimizer, EMA, RNG states and step are "
                             "restored, so the run follows the trajectory of an uninterrupted one; without "
                             "--config the stored config is used (flags still override it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out-dir (refused without this flag); the earlier run "
                             "is kept until the new one has written its first checkpoint")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..train.loop import train, validate_config

    base = None
    if args.resume:
        out_dir = getattr(args, "cfg.train.out_dir", None)
        if out_dir is None and args.config:
            from ..config import load_config

            out_dir = load_config(args.config).train.out_dir
        if out_dir is None:
            raise ConfigError("--resume needs --out-dir DIR: the run directory to continue")
        if not args.config:
            base = stored_config(out_dir)
    cfg = config_from_args(args, base)
    validate_config(cfg)

    def on_event(event: str, record: dict) -> None:
        if event == "start":
            args._started = True
            where = f"resuming {record['out_dir']} at step {record['step']}" if record.get("resumed") else \
                f"run directory: {record['out_dir']}"
            print(where, flush=True)

    result = train(cfg, resume=args.resume, overwrite=args.overwrite, callbacks=[on_event])
    if result.session_steps == 0:
        budget = f", --time-budget {cfg.train.time_budget:g} s" if cfg.train.time_budget is not None else ""
        print(f"already finished at step {result.steps} (--steps {cfg.train.steps}{budget}): nothing to train; "
              "raise --steps or --time-budget to continue")
    m = result.metric
    unit = {"bpd": "bits/dim, fixed dequantisation noise (seed 0)", "nll": "nats per example",
            "error": "classification error"}.get(m, "")
    print(f"test {m}: {result.test:.4f} {unit}; weights of step {result.best_step} "
          f"(best validation {m} {result.best_val:.4f})")
    pure_classifier = cfg.train.objective == "classification" and cfg.train.nf_weight == 0
    extra = {k: v for k, v in result.test_metrics.items() if k != m and not (pure_classifier and k in DENSITY_KEYS)}
    if extra:
        print("test " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()))
    checks = [r for r in result.history if r.get("kind") == "grad_check"]
    if checks:
        finite = [r for r in checks if not r["nonfinite"] and r["angle"] == r["angle"]]
        worst = (f"largest angle {max(r['angle'] for r in finite):.3g} deg" if finite else "no finite angle")
        print(f"gradient checks: {len(checks)} ({worst}; non-finite memory-saving gradients: "
              f"{len(checks) - len(finite)}), fallbacks to stored activations: {sum(r['fallback'] for r in checks)}")
    if result.session_steps:
        print(f"steps: {result.steps} in {result.train_time:.1f} s training + {result.eval_time:.1f} s evaluation "
              f"({result.steps_per_s:.2f} steps/s), parameters: {result.n_params}, "
              f"peak RSS: {result.peak_rss_mb:.0f} MiB")
    if result.nonfinite_steps:
        print(f"skipped non-finite steps: {result.nonfinite_steps}")
    for name, why in result.notes.items():
        print(f"{name}.png not written: {why}")
    print(f"outputs: {result.out_dir}/ ({', '.join(result.outputs)})")
    return 0
