"""Audit the invertibility of a trained flow on held-out data, samples, OOD inputs and PGD attacks.

Writes report.json (strict JSON: non-finite numbers as the strings "nan"/"inf") and a
self-contained report.html with plots to --report (default: RUN_DIR/audit), and prints a short
verdict table. A family is invertible when every example in the model's domain reconstructs
finitely with error <= --tolerance; with --fail-on-noninvertible the exit status is 1 when any
family (or attack) is not, so a CI job can gate a model on it.

Families: test, train, samples (T = 1, 0.7, 0), clipped (z = 0, activations clipped at 1000, 100,
10), noise (uniform, gaussian), constant, grayed, inverted, out_of_range, patches
(natural_patches), ood (all OOD families), all (default), or single names such as samples_t0.5.

Examples:
  stableflows audit runs/demo
  stableflows audit runs/demo/best.pt --families test,samples,noise --attack pgd --report out/
  stableflows audit runs/demo --attack pgd --attack-constraints cell --fail-on-noninvertible
"""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "audit"
HELP = "audit invertibility: reconstruction, spectra, per-layer localisation, PGD; JSON + HTML report"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .attacks import CONSTRAINTS, DEFAULT_EPS, DEFAULT_WIDEN
    from .core import DEFAULT_ATTACK

    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="dataset to audit on (default: the one the run was trained on)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="directory of local dataset files")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="split used as the held-out family 'test' (default: test)")
    parser.add_argument("--families", default="all", metavar="LIST",
                        help="comma-separated families or groups (default: all)")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="examples per family (default: the whole split)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="reconstruction tolerance (default: 1e-3)")
    parser.add_argument("--criterion", choices=("l2", "linf", "rel"), default="l2",
                        help="error compared with the tolerance (default: l2)")
    parser.add_argument("--repeat", type=int, default=5, metavar="K",
                        help="forward/inverse passes of the error-growth curve (default: 5; 0 disables)")
    parser.add_argument("--spectra-points", type=int, default=32, metavar="P",
                        help="points per family for Jacobian spectra (default: 32; 0 disables)")
    parser.add_argument("--spectra-method", choices=("auto", "exact", "iterative"), default="auto",
                        help="exact Jacobians, Lanczos, or auto by dimension (default: auto)")
    parser.add_argument("--temperatures", type=_floats, default=(1.0, 0.7, 0.0), metavar="T,...",
                        help="temperatures of the 'samples' group (default: 1,0.7,0)")
    parser.add_argument("--clip", type=_floats, default=(1000.0, 100.0, 10.0), metavar="C,...",
                        help="activation clipping thresholds of the 'clipped' group (default: 1000,100,10)")
    parser.add_argument("--no-shadow", action="store_true", help="skip the float64 shadow computation")
    parser.add_argument("--no-localize", action="store_true", help="skip the per-layer localisation")
    parser.add_argument("--attack", choices=("none", "pgd"), default="none", help="PGD attack (default: none)")
    parser.add_argument("--attack-constraints", default=",".join(CONSTRAINTS), metavar="LIST",
                        help=f"constraint sets among {', '.join(CONSTRAINTS)} (default: all)")
    parser.add_argument("--attack-examples", type=int, default=DEFAULT_ATTACK["examples"], metavar="N",
                        help=f"examples attacked (default: {DEFAULT_ATTACK['examples']})")
    parser.add_argument("--attack-steps", type=int, default=DEFAULT_ATTACK["steps"], metavar="N",
                        help=f"PGD steps, also the random-search budget (default: {DEFAULT_ATTACK['steps']})")
    parser.add_argument("--step-size", type=float, default=None, help="PGD step (default: 2.5 * radius / steps)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help=f"L-inf radius (default: {DEFAULT_EPS:.4g})")
    parser.add_argument("--widen", type=float, default=DEFAULT_WIDEN,
                        help=f"widening of the data range, fraction per side (default: {DEFAULT_WIDEN})")
    parser.add_argument("--fixed-point-iterations", type=int, default=None, metavar="K",
                        help="cap of residual blocks' fixed-point iterations inside the attack")
    parser.add_argument("--report", default=None, metavar="DIR", help="output directory (default: RUN_DIR/audit)")
    parser.add_argument("--fail-on-noninvertible", action="store_true",
                        help="exit with status 1 when any family is not invertible within the tolerance")
    parser.add_argument("--seed", type=int, default=0, help="seed of families, spectra points and attacks")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import ConfigError, RunConfig
    from ..data import load_dataset
    from .conditional import label_contexts
    from ..train.checkpoint import resolve_checkpoint
    from ..train.evaluate import load_flow
    from ..train.loop import resolve_device
    from .attacks import CONSTRAINTS
    from .core import audit

    for flag, value, low in (("--repeat", args.repeat, 0), ("--spectra-points", args.spectra_points, 0),
                             ("--attack-examples", args.attack_examples, 1), ("--attack-steps", args.attack_steps, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    constraints = tuple(c.strip() for c in args.attack_constraints.split(",") if c.strip())
    bad = [c for c in constraints if c not in CONSTRAINTS]
    if bad:
        raise ConfigError(f"unknown attack constraint(s) {bad}; choose among {', '.join(CONSTRAINTS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.run)
    flow, ckpt = load_flow(path, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    changes = {k: v for k, v in (("name", args.data), ("data_dir", args.data_dir)) if v is not None}
    data_cfg = cfg.replace("data", **changes).data if changes else cfg.data
    splits = load_dataset(data_cfg, seed=cfg.train.seed)
    held_out = getattr(splits, args.split).to(device)
    train = splits.train.to(device)
    args._started = True
    report = audit(
        flow, held_out, levels=splits.levels, train=train, families=args.families, n=args.n,
        tolerance=args.tolerance, criterion=args.criterion, repeat=args.repeat, shadow=not args.no_shadow,
        spectra_points=args.spectra_points, spectra_method=args.spectra_method, localize=not args.no_localize,
        attack=None if args.attack == "none" else "pgd",
        attack_kwargs=dict(constraints=constraints, examples=args.attack_examples, steps=args.attack_steps,
                           step_size=args.step_size, eps=args.eps, widen=args.widen,
                           fixed_point_iterations=args.fixed_point_iterations, seed=args.seed),
        temperatures=args.temperatures, clip_thresholds=args.clip, seed=args.seed,
        **label_contexts(flow, splits, args.split))  # a conditional flow (cinn): the labels as contexts
    report.meta.update(checkpoint=str(path), data=splits.name, split=args.split, step=ckpt.get("step"))
    out = Path(args.report) if args.report else (path.parent / "audit")
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    report.to_html(out / "report.html")
    print(report.summary())
    print(f"report: {out / 'report.json'}, {out / 'report.html'}")
    if args.fail_on_noninvertible and not report.verdict.invertible:
        return 1
    return 0
