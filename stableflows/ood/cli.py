"""``stableflows ood``: out-of-distribution likelihood analysis of a trained flow.

Scores the training split, the test split and each OOD family under the run's selected weights
and writes ood.json and a self-contained ood.html: bits/dim histograms with AUROC / AUPR, the
decomposition log p(x) = log p(z) + logdet per layer and scale, constant / random inputs, graying,
the second-order prediction of each likelihood gap, better OOD scores (typicality test,
complexity-corrected likelihood, latent norm, likelihood ratio with --background), ensembles
(--ensemble) and, per family, whether the flow is still invertible there (a likelihood where the
inverse has exploded is flagged meaningless). A set the model refuses entirely (every input outside
its domain) has no likelihood: it gets no AUROC and no verdict.

Each invocation writes into a new directory (default RUN/ood/<checkpoint>-<time>); an explicit
--report directory is replaced with a notice. Exit status: 0 ok; 1 with --fail-on-noninvertible when
the audit finds a family not invertible; 2 for a usage error (unknown family or option, missing
files); 3 when the invertibility audit could not run a family (its error is printed).

Examples:
  stableflows ood runs/glow --in digits --ood uniform,constant,natural_patches --report runs/glow/ood
  stableflows ood runs/fmnist --in fashion-mnist --ood mnist --data-dir ~/data --report out/
  stableflows ood runs/a --ensemble runs/b,runs/c --report out/
"""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "ood"
HELP = "out-of-distribution likelihood analysis: bpd histograms, AUROC, decomposition, typicality, audit flags"


def _csv(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(s))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--in", dest="in_data", default=None, metavar="DATASET",
                        help="in-distribution dataset; must be the one the model was trained on (default: the run's)")
    parser.add_argument("--ood", default=None, metavar="FAMILY,...",
                        help="OOD families: uniform, gaussian, constant, grayed, inverted, out_of_range, "
                             "natural_patches, grayed_mid, digits28 (28x28), or a dataset with local files (mnist, fashion-mnist, cifar10, svhn); "
                             "default: the seven generated families")
    parser.add_argument("--report", default=None, metavar="OUT_DIR",
                        help="directory for ood.json and ood.html (default: a new RUN/ood/<checkpoint>-<time>)")
    parser.add_argument("--ensemble", default=None, metavar="RUN,...",
                        help="further runs trained on the same data: report the ensemble p = mean_m p_m")
    parser.add_argument("--background", default=None, metavar="RUN",
                        help="a run trained on perturbed data: adds the likelihood-ratio score (Ren et al. 2019)")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="examples per OOD family (default: the size of the test split)")
    parser.add_argument("--n-train", type=int, default=None, metavar="N",
                        help="training examples scored (default: all)")
    parser.add_argument("--typicality-m", type=_ints, default=(1, 5, 25), metavar="M,...",
                        help="batch sizes of the typicality test (default: 1,5,25)")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="false-alarm rate of the typicality threshold (default: 0.01)")
    parser.add_argument("--bootstrap", type=int, default=500, metavar="K",
                        help="bootstrap batches of the typicality test (default: 500)")
    parser.add_argument("--no-second-order", action="store_true", help="skip the second-order analysis")
    parser.add_argument("--no-invertibility", action="store_true",
                        help="skip the round-trip check of every family")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="directory of local dataset files (in-distribution data and dataset families)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated OOD families (default: 0)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N",
                        help="examples per forward pass; does not change the result (default: 256)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--fail-on-noninvertible", action="store_true",
                        help="exit with status 1 when the audit finds a family not invertible within the tolerance")
    parser.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="progress lines on stderr (default: on; in a terminal a line per step, "
                             "otherwise one every 30 s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")


REPORT_FILES = ("ood.json", "ood.html")


def _exit_status(summary: dict, fail_on_noninvertible: bool) -> int:
    from ..exitcodes import COULD_NOT_RUN, NOT_INVERTIBLE, OK

    au = summary.get("audit") or {}
    if "error" in au or any(isinstance(v, dict) and v.get("status") == "could not run" for v in au.values()):
        return COULD_NOT_RUN
    if fail_on_noninvertible and any(isinstance(v, dict) and v.get("status") == "not invertible" for v in au.values()):
        return NOT_INVERTIBLE
    return OK


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, RunConfig
    from ..data import load_dataset
    from ..train.evaluate import load_flow
    from ..train.loop import resolve_device
    from .analysis import OODConfig, analyze
    from .report import write_report

    for name, v, lo in (("--n", args.n, 1), ("--n-train", args.n_train, 1), ("--bootstrap", args.bootstrap, 1),
                        ("--batch-size", args.batch_size, 1)):
        if v is not None and v < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {v}")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if not args.typicality_m or min(args.typicality_m) < 1:
        raise ConfigError(f"--typicality-m needs positive batch sizes, got {args.typicality_m}")
    device = resolve_device(args.device)
    flow, ckpt = load_flow(args.run, map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    if args.in_data is not None and args.in_data != cfg.data.name:
        raise ConfigError(f"--in {args.in_data}: the model was trained on {cfg.data.name}")
    if args.data_dir is not None:
        cfg = cfg.replace("data", data_dir=args.data_dir)
    splits = load_dataset(cfg.data, seed=cfg.train.seed)
    members = [flow] + [load_flow(r, map_location=device)[0] for r in _csv(args.ensemble or "")]
    background = load_flow(args.background, map_location=device)[0] if args.background else None
    for i, m in enumerate(members[1:] + ([background] if background is not None else [])):
        if tuple(m.shape) != tuple(flow.shape):
            raise ConfigError(f"model {i + 1} has event shape {m.shape}, the analysed model {flow.shape}")
    ocfg = OODConfig(**({"families": tuple(_csv(args.ood))} if args.ood else {}), n=args.n, n_train=args.n_train,
                     typicality_m=tuple(args.typicality_m), alpha=args.alpha, bootstrap=args.bootstrap,
                     second_order=not args.no_second_order, check_invertibility=not args.no_invertibility,
                     seed=args.seed, batch_size=args.batch_size, data_dir=cfg.data.data_dir)
    from .analysis import build_sets

    sets = build_sets(splits, ocfg)  # bad family names / missing files are usage errors
    import sys

    from ..audit.progress import progress_mode
    from ..audit.report import earlier_report, new_report_dir
    from ..train.checkpoint import resolve_checkpoint

    ckpt_path = resolve_checkpoint(args.run)
    args._started = True
    result = analyze(members, splits, ocfg, background=background, sets=sets, progress=progress_mode(args.progress))
    result.summary["checkpoint"] = str(ckpt_path)
    if args.report:
        out = Path(args.report)
        old = earlier_report(out, REPORT_FILES)
        if old:
            print(f"stableflows ood: note: replacing {', '.join(old)} of an earlier analysis in {out}", file=sys.stderr)
    else:
        out = new_report_dir(ckpt_path.parent / "ood", ckpt_path.stem)
    paths = write_report(result, out, title=f"OOD analysis of {args.run}")
    for line in result.summary["findings"]:
        print(line)
    print(f"report: {paths['html']} and {paths['json']}")
    return _exit_status(result.summary, args.fail_on_noninvertible)
