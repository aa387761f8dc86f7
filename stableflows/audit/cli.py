"""Audit the invertibility of a flow on held-out data, samples, OOD inputs and PGD attacks.

The flow is a stableflows run (a run directory or a checkpoint), or any flow given by
--model-spec MODULE:CALLABLE (a function returning a flow of stableflows, normflows, zuko, FrEIA,
nflows, a module following the layer protocol, or a (forward, inverse) pair) with --weights
STATE_DICT and --data (a dataset name or a tensor file).

Writes report.json (strict JSON: non-finite numbers as the strings "nan"/"inf") and a
self-contained report.html with plots into a new directory per invocation (default:
RUN_DIR/audit/<checkpoint>-<time>, or audit/<spec>-<time> for --model-spec; an explicit --report
directory is replaced with a notice), and prints the verdict table. A family is invertible when
every example in the model's domain reconstructs finitely with error <= --tolerance.

Exit status: 0 ok; 1 with --fail-on-noninvertible when a family (or attack) is not invertible; 2 for
a usage error (unknown family or option, unreadable model, weights or data); 3 when the audit could
not run a family (the model or an adapter raised an exception that is not a verdict: its text is
the first line printed). A CI job can gate a model on it.

Time: --budget SECONDS (default 90) is spread over the parts; the round trips of every family
always run (at least 32 examples each), the rest is cut to fit and the report says what was cut.

Families: test, train, samples (T = 1, 0.7, 0), clipped (z = 0, activations clipped at 1000, 100,
10), noise (uniform, gaussian), constant, grayed, inverted, out_of_range, patches
(natural_patches), ood (all OOD families), all (default), or single names such as samples_t0.5.

Examples:
  stableflows audit runs/demo
  stableflows audit runs/demo/best.pt --families test,samples,noise --attack pgd --report out/
  stableflows audit runs/demo --attack pgd --attack-constraints cell --fail-on-noninvertible
  stableflows audit --model-spec my_package.flows:build_flow --weights flow.pt --data digits --flatten
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "audit"
HELP = "audit invertibility: reconstruction, spectra, per-layer localisation, PGD; JSON + HTML report"
DEFAULT_BUDGET = 90.0  # seconds; stableflows.audit.budget.DEFAULT_BUDGET (not imported: --help stays torch-free)
REPORT_FILES = ("report.json", "report.html")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _budget(text: str) -> float | None:
    if text.strip().lower() in ("none", "0", "off", "inf"):
        return None
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected seconds (or 'none'), got {text!r}") from e
    if not v > 0:
        raise argparse.ArgumentTypeError(f"the budget must be > 0 seconds (or 'none'), got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    constraints = ("cell", "linf", "range")  # stableflows.audit.attacks.CONSTRAINTS
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", nargs="?", default=None,
                        help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--model-spec", default=None, metavar="MODULE:CALLABLE",
                        help="audit the flow returned by CALLABLE() (MODULE importable from here, or PATH.py): a "
                             "flow of stableflows / normflows / zuko / FrEIA / nflows, a layer-protocol module, or "
                             "a (forward, inverse) pair; needs --data")
    parser.add_argument("--weights", default=None, metavar="STATE_DICT",
                        help="with --model-spec: a state_dict (torch.save) loaded strictly into the flow")
    parser.add_argument("--data", default=None, metavar="NAME_OR_FILE",
                        help="dataset to audit on (default: the run's); with --model-spec a dataset name or a "
                             "tensor file (.pt / .npy) of examples (B, *shape)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="directory of local dataset files")
    parser.add_argument("--flatten", action="store_true",
                        help="with --model-spec and a dataset: images as vectors (B, D)")
    parser.add_argument("--levels", type=int, default=None, metavar="L",
                        help="with --model-spec and a tensor file: its values are integer levels 0..L-1 "
                             "(dequantised by the audit); default: model-space values as given")
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
                        help="exact Jacobians, Lanczos, or auto by dimension and budget (default: auto)")
    parser.add_argument("--temperatures", type=_floats, default=(1.0, 0.7, 0.0), metavar="T,...",
                        help="temperatures of the 'samples' group (default: 1,0.7,0)")
    parser.add_argument("--clip", type=_floats, default=(1000.0, 100.0, 10.0), metavar="C,...",
                        help="activation clipping thresholds of the 'clipped' group (default: 1000,100,10)")
    parser.add_argument("--no-shadow", action="store_true", help="skip the float64 shadow computation")
    parser.add_argument("--no-localize", action="store_true", help="skip the per-layer localisation")
    parser.add_argument("--attack", choices=("none", "pgd"), default="none",
                        help="PGD attack beside a random search of the same budget; the verdict judges the worse "
                             "point of the two per example (default: none)")
    parser.add_argument("--attack-constraints", default=",".join(constraints), metavar="LIST",
                        help=f"constraint sets among {', '.join(constraints)} (default: all)")
    parser.add_argument("--attack-examples", type=int, default=64, metavar="N",
                        help="examples attacked (default: 64)")
    parser.add_argument("--attack-steps", type=int, default=50, metavar="N",
                        help="PGD steps, also the random-search budget (default: 50)")
    parser.add_argument("--step-size", type=float, default=None, help="PGD step (default: 2.5 * radius / steps)")
    parser.add_argument("--eps", type=float, default=2.0 / 255, help="L-inf radius (default: 2/255 = 0.007843)")
    parser.add_argument("--widen", type=float, default=0.2,
                        help="widening of the data range, fraction per side (default: 0.2)")
    parser.add_argument("--fixed-point-iterations", type=int, default=None, metavar="K",
                        help="cap of residual blocks' fixed-point iterations inside the attack")
    parser.add_argument("--budget", type=_budget, default=DEFAULT_BUDGET, metavar="SECONDS",
                        help=f"time for the whole audit, spread over its parts (default: {DEFAULT_BUDGET:g}; "
                             "'none': no limit)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="output directory (default: a new RUN_DIR/audit/<checkpoint>-<time>)")
    parser.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="progress lines on stderr (default: on; in a terminal a line per part, "
                             "otherwise one every 30 s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    parser.add_argument("--fail-on-noninvertible", action="store_true",
                        help="exit with status 1 when any family is not invertible within the tolerance")
    parser.add_argument("--seed", type=int, default=0, help="seed of families, spectra points and attacks")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def _check_options(args) -> tuple:
    from ..config import ConfigError
    from .attacks import CONSTRAINTS
    from .families import expand_families

    for flag, value, low in (("--repeat", args.repeat, 0), ("--spectra-points", args.spectra_points, 0),
                             ("--attack-examples", args.attack_examples, 1), ("--attack-steps", args.attack_steps, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
    constraints = tuple(c.strip() for c in args.attack_constraints.split(",") if c.strip())
    bad = [c for c in constraints if c not in CONSTRAINTS]
    if bad:
        raise ConfigError(f"unknown attack constraint(s) {bad}; choose among {', '.join(CONSTRAINTS)}")
    expand_families(args.families, temperatures=args.temperatures, clip_thresholds=args.clip)  # unknown names
    if args.model_spec is None and args.run is None:
        raise ConfigError("give a run directory / checkpoint, or --model-spec MODULE:CALLABLE with --data")
    if args.model_spec is not None and args.run is not None:
        raise ConfigError("give either a run directory / checkpoint or --model-spec, not both")
    if args.model_spec is None:
        for flag, v in (("--weights", args.weights), ("--levels", args.levels)):
            if v is not None:
                raise ConfigError(f"{flag} goes with --model-spec (a run's checkpoint holds its weights and levels)")
    elif args.data is None:
        raise ConfigError("--model-spec needs --data (a dataset name or a tensor file of examples)")
    return constraints


def _load_run(args, device):
    from ..config import RunConfig
    from ..data import load_dataset
    from ..train.checkpoint import resolve_checkpoint
    from ..train.evaluate import load_flow
    from .conditional import label_contexts

    path = resolve_checkpoint(args.run)
    flow, ckpt = load_flow(path, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    changes = {k: v for k, v in (("name", args.data), ("data_dir", args.data_dir)) if v is not None}
    data_cfg = cfg.replace("data", **changes).data if changes else cfg.data
    splits = load_dataset(data_cfg, seed=cfg.train.seed)
    meta = dict(checkpoint=str(path), data=splits.name, split=args.split, step=ckpt.get("step"))
    args._contexts = label_contexts(flow, splits, args.split)  # a conditional flow (cinn): the labels as contexts
    return flow, getattr(splits, args.split), splits.train, splits.levels, meta, path.parent / "audit", path.stem


def _load_spec(args, device):
    from ..config import ConfigError, DataConfig
    from ..data import load_dataset
    from ..data.registry import ALIASES, DATASETS
    from .spec import load_spec, load_tensor_data, load_weights, spec_label

    model, module = load_spec(args.model_spec)
    if args.weights is not None:
        load_weights(module, args.weights, map_location=device)
    if module is not None:
        module.to(device).eval()
    name = ALIASES.get(args.data, args.data)
    if name in DATASETS:
        splits = load_dataset(DataConfig(name=name, data_dir=args.data_dir, flatten=args.flatten))
        held, train, levels, data = getattr(splits, args.split), splits.train, splits.levels, splits.name
        if args.levels is not None and args.levels != levels:
            raise ConfigError(f"--levels {args.levels} contradicts dataset {name}'s {levels} levels")
    else:
        held, train, levels, data = load_tensor_data(args.data), None, args.levels, args.data
    meta = dict(model_spec=args.model_spec, weights=args.weights, data=data, split=args.split)
    return model, held, train, levels, meta, Path("audit"), spec_label(args.model_spec)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..exitcodes import COULD_NOT_RUN, NOT_INVERTIBLE, OK
    from ..train.loop import resolve_device
    from .core import audit
    from .progress import progress_mode
    from .report import earlier_report, new_report_dir

    constraints = _check_options(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    flow, held_out, train, levels, meta, parent, label = (_load_spec if args.model_spec else _load_run)(args, device)
    held_out = held_out.to(device)
    train = None if train is None else train.to(device)
    args._started = True
    report = audit(
        flow, held_out, levels=levels, train=train, families=args.families, n=args.n,
        tolerance=args.tolerance, criterion=args.criterion, repeat=args.repeat, shadow=not args.no_shadow,
        spectra_points=args.spectra_points, spectra_method=args.spectra_method, localize=not args.no_localize,
        attack=None if args.attack == "none" else "pgd",
        attack_kwargs=dict(constraints=constraints, examples=args.attack_examples, steps=args.attack_steps,
                           step_size=args.step_size, eps=args.eps, widen=args.widen,
                           fixed_point_iterations=args.fixed_point_iterations, seed=args.seed),
        temperatures=args.temperatures, clip_thresholds=args.clip, seed=args.seed, budget=args.budget,
        progress=progress_mode(args.progress), **getattr(args, "_contexts", {}))
    report.meta.update(meta)
    if args.report:
        out = Path(args.report)
        old = earlier_report(out, REPORT_FILES)
        if old:
            print(f"stableflows audit: note: replacing {', '.join(old)} of an earlier audit in {out}", file=sys.stderr)
    else:
        out = new_report_dir(parent, label)
    report.to_json(out / "report.json")
    report.to_html(out / "report.html")
    print(report.summary())
    print(f"report: {out / 'report.json'}, {out / 'report.html'}")
    if report.verdict.could_not_run:
        return COULD_NOT_RUN
    if args.fail_on_noninvertible and report.verdict.invertible is False:
        return NOT_INVERTIBLE
    return OK
