"""Reproduce a table or figure of the papers behind stableflows, at this machine's scale.

Tables (JSON + Markdown) and plots are written under ``--out`` (default ``runs/reproduce/NAME``).
``--quick`` runs a reduced setting (seconds to a minute) for smoke tests.

Examples:
  stableflows reproduce --list
  stableflows reproduce glow-design-choices
  stableflows reproduce supervised-table --quick
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
    out = Path(args.out or Path("runs") / "reproduce" / args.name)
    out.mkdir(parents=True, exist_ok=True)
    summary = experiments[args.name](out, quick=args.quick, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    print(f"tables and plots in {out}")
    return 0
