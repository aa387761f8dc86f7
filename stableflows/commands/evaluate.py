"""Evaluate the selected weights of a run on its test split (or validation split).

The metric is bits/dim with the fixed dequantisation noise of seed 0 (docs/METRICS.md) for discrete data,
mean negative log-likelihood in nats for continuous data; for a run trained with the classification
or hybrid objective, the classification error, accuracy, cross-entropy and bits/dim. Given a run directory, best.pt (the
validation-selected EMA weights) is used; given a checkpoint file, that file (EMA weights of a
last.pt). The result is printed and written next to the checkpoint as
eval-<checkpoint>-step<N>-<split>.json (e.g. eval-best-step400-test.json), so reports of different
checkpoints or splits never overwrite each other; an existing --out FILE is refused unless --overwrite.

Examples:
  stableflows eval runs/demo
  stableflows eval runs/demo/last.pt --split val
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "eval"
HELP = ("evaluate a run's selected weights: test bits/dim with fixed noise (seed 0); accuracy too for "
        "classifiers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="split to evaluate (default: test)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="directory of local dataset files, if it moved since training")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=512, metavar="N",
                        help="examples per forward pass; does not change the result (default: 512)")
    parser.add_argument("--out", default=None, metavar="FILE.json",
                        help="where to write the result (default: eval-<checkpoint>-step<N>-<split>.json next to "
                             "the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, RunConfig
    from ..data import load_dataset
    from ..train.evaluate import EVAL_SEED, evaluate, load_flow, metric_name
    from ..train.loop import resolve_device
    from ..train.checkpoint import atomic_write_text, resolve_checkpoint

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out} exists: pass --overwrite to replace it, or choose another file")
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.run)
    flow, ckpt = load_flow(path, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    if args.data_dir is not None:
        cfg = cfg.replace("data", data_dir=args.data_dir)
    splits = load_dataset(cfg.data, seed=cfg.train.seed)
    x = getattr(splits, args.split)
    extra: dict = {}
    if cfg.train.objective in ("classification", "hybrid"):  # accuracy, error, cross-entropy and bits/dim
        from ..train.supervised import evaluate_classifier

        y = getattr(splits, f"y_{args.split}")
        if y is None or not callable(getattr(flow, "features", None)):
            raise ConfigError(f"checkpoint {path} was trained with objective {cfg.train.objective}, but "
                              f"{'the data have no labels' if y is None else 'the model has no head'}")
        extra = evaluate_classifier(flow, x, y, splits.levels, batch_size=args.batch_size)
        m = "error"
        value = extra.pop("error")
    else:
        value = evaluate(flow, x, splits.levels, batch_size=args.batch_size)
        m = metric_name(splits.levels)
    result = {"checkpoint": str(path), "split": args.split, "metric": m, m: value, **extra, "n": int(x.shape[0]),
              "step": ckpt.get("step"), "data": splits.name, "eval_seed": EVAL_SEED}
    out = Path(args.out) if args.out else path.parent / f"eval-{path.stem}-step{ckpt.get('step')}-{args.split}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    more = "".join(f", {k} {v:.4f}" for k, v in extra.items())
    print(f"{args.split} {m}: {value:.4f}{more} ({path}, step {ckpt.get('step')}, {x.shape[0]} examples, "
          f"fixed noise seed {EVAL_SEED}) -> {out}")
    return 0
