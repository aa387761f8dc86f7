"""Time of a full invertibility audit of a digits model (issue 4): the 360 test examples, every
family, PGD with 50 steps on 64 examples (three constraint sets, each with its random-search
baseline), exact Jacobian spectra on 32 points per family, float64 shadow, 5 repeated passes,
per-layer localisation. Target: under 2 minutes on 2 threads.

    python -m benchmarks.audit_speed                      # trains the demo Glow briefly first
    python -m benchmarks.audit_speed --run runs/demo      # audits an existing run
    python -m benchmarks.audit_speed --json runs/bench/audit_speed.json

Training time is not counted. Prints the time of each part of the audit and the verdict table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 120.0
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def _train_demo(steps: int, out_dir: Path, hidden: int | None, threads: int) -> Path:
    from stableflows.config import load_config
    from stableflows.train import train

    cfg = load_config(DEMO_CONFIG)
    if hidden is not None:
        cfg = cfg.replace("model", hidden=hidden)
    cfg = cfg.replace("train", steps=steps, time_budget=None, eval_every=steps, out_dir=str(out_dir), progress=False,
                      threads=threads)
    train(cfg)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run directory or checkpoint (default: train the demo model)")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the demo model (default: 300)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden width of the demo Glow trained here (default: configs/demo.toml, 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the timings here")
    p.add_argument("--html", default=None, help="also write the HTML report here (not timed)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from stableflows.audit import audit
    from stableflows.config import RunConfig
    from stableflows.data import load_dataset
    from stableflows.train import load_flow

    tmp = None
    run = args.run
    if run is None:
        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        run = _train_demo(args.train_steps, Path(tmp.name) / "demo", args.hidden, args.threads)
        print(f"trained the demo Glow for {args.train_steps} steps in {time.perf_counter() - t0:.1f}s (not counted)",
              flush=True)
    flow, ckpt = load_flow(run)
    cfg = RunConfig.from_dict(ckpt["config"])
    splits = load_dataset(cfg.data, seed=cfg.train.seed)
    n_params = sum(p.numel() for p in flow.parameters())
    print(f"model {cfg.model.model} hidden={cfg.model.hidden} levels={cfg.model.levels} "
          f"steps_per_level={cfg.model.steps_per_level} ({n_params} parameters); {len(splits.test)} test examples; "
          f"{torch.get_num_threads()} threads", flush=True)
    try:
        print(f"load average before the audit: {' '.join(f'{v:.2f}' for v in __import__('os').getloadavg())}",
              flush=True)
    except OSError:
        pass

    t0 = time.perf_counter()
    report = audit(flow, splits.test, levels=splits.levels, train=splits.train, families="all", attack="pgd",
                   attack_kwargs=dict(examples=64, steps=50), spectra_points=32, spectra_method="exact")
    wall = time.perf_counter() - t0
    print(report.verdict.table())
    print("\npart                 seconds")
    for k, v in report.timings.items():
        print(f"{k:<20} {v:8.2f}")
    ok = wall < TARGET_SECONDS
    try:
        print(f"load average after the audit: {' '.join(f'{v:.2f}' for v in __import__('os').getloadavg())}")
    except OSError:
        pass
    print(f"\nfull audit: {wall:.1f}s ({'within' if ok else 'OVER'} the {TARGET_SECONDS:.0f}s target)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"wall_s": wall, "target_s": TARGET_SECONDS, "timings": report.timings,
                                               "threads": torch.get_num_threads(), "n_params": n_params}, indent=2))
    if args.html:
        report.to_html(args.html)
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
