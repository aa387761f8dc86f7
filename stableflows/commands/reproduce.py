"""Reproduce a table or figure of the papers behind stableflows, at this machine's scale.

Tables (JSON + Markdown) and plots are written under ``--out`` (default ``runs/reproduce/NAME``).
``--quick`` runs a reduced setting (seconds to a minute) for smoke tests.

Examples:
  stableflows reproduce --list
  stableflows reproduce glow-design-choices
  stableflows reproduce supervised-table --quick
  stableflows reproduce supervised-table --data cifar10 --data-dir DIR --paper   # the authors' settings, GPU

``--data``, ``--data-dir`` and ``--paper`` reach the experiments that take them (an experiment that
does not is refused with the list of its options).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "reproduce"
HELP = "reproduce a paper table or figure (tables and plots under runs/reproduce/NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/reproduce/NAME)")
    parser.add_argument("--quick", action="store_true", help="reduced setting for a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's choice)")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="data set of experiments that take one (default: the experiment's, digits), e.g. "
                             "cifar10 from local files")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="directory of local data files (never downloaded)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's settings instead of this machine's (experiments that have them; GPU scale)")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..experiments import registry

    experiments = registry()
    if args.list or not args.name:
        for name, fn in experiments.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"{name:28s} {doc[0] if doc else ''}")
        return 0 if args.list else 2
    if args.name not in experiments:
        print(f"error: unknown experiment {args.name!r}; choose one of: {', '.join(experiments)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import inspect

    fn = experiments[args.name]
    given = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir), ("paper", args.paper or None))
             if v is not None}
    takes = inspect.signature(fn).parameters
    refused = [k for k in given if k not in takes]
    if refused:
        opts = ", ".join("--" + k.replace("_", "-") for k in ("data", "data_dir", "paper") if k in takes) or "none"
        print(f"error: experiment {args.name!r} does not take {', '.join('--' + k.replace('_', '-') for k in refused)} "
              f"(its data options: {opts})", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "reproduce" / args.name)
    out.mkdir(parents=True, exist_ok=True)
    summary = fn(out, quick=args.quick, seed=args.seed, **given)
    print(json.dumps(summary, indent=2, default=str))
    print(f"tables and plots in {out}")
    return 0
