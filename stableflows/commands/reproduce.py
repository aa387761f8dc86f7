"""Reproduce a table or figure of the papers behind stableflows, at this machine's scale.

Tables (JSON + Markdown) and plots are written under ``--out`` (default ``runs/reproduce/NAME``).
``--quick`` runs a reduced setting (seconds to a minute) for smoke tests. ``--seeds 0,1,2`` runs
the experiment once per seed (under ``OUT/seed_K``) and writes ``seeds.md`` / ``seeds.json``: every
row's figures as mean +- std over seeds, and each of the paper's "A beats B" claims as the paired
per-seed difference with its spread. ``--reuse`` takes a seed's finished ``summary.json`` instead of
running it again.

While an experiment runs it prints its progress: a line per training phase every
``--progress-every`` seconds (step, metric, ETA; redrawn in place on a terminal) and a heartbeat
when a phase without training steps (an audit, an attack) takes longer. At the end it prints the
experiment's table and the path of the full results.

Examples:
  stableflows reproduce --list
  stableflows reproduce glow-design-choices
  stableflows reproduce supervised-table --seeds 0,1,2
  stableflows reproduce supervised-table --quick
  stableflows reproduce hybrid-table --data fashion-mnist        # /usr/share/datasets/fashion-mnist
  stableflows reproduce supervised-table --data cifar10 --data-dir DIR --paper   # the authors' settings, GPU

``--data``, ``--data-dir`` and ``--paper`` reach the experiments that take them (an experiment that
does not is refused with the list of its options).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import threading
import time
from pathlib import Path

from ..exitcodes import COULD_NOT_RUN, INTERRUPTED, OK, USAGE

NAME = "reproduce"
HELP = "reproduce a paper table or figure (tables and plots under runs/reproduce/NAME)"
HEARTBEAT_FACTOR = 2.0  # a heartbeat after this many progress intervals without any output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/reproduce/NAME)")
    parser.add_argument("--quick", action="store_true", help="reduced setting for a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="comma-separated seeds, e.g. 0,1,2: one run per seed under OUT/seed_K, then the table "
                             "of mean +- std over seeds and the paired differences of the paper's claims (seeds.md)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --seeds: take a seed's existing OUT/seed_K/summary.json instead of running it")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's choice)")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between progress lines while training (default 30; 0 silences them)")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="data set of experiments that take one (default: the experiment's, digits), e.g. "
                             "fashion-mnist (read from /usr/share/datasets/fashion-mnist) or cifar10 from local files")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="directory of local data files (never downloaded)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's settings instead of this machine's (experiments that have them; GPU scale)")


def _seeds(text: str | None, seed: int) -> list[int] | None:
    if text is None:
        return None
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds needs distinct integers, got {text!r}")
    return out


class _Heartbeat:
    """Prints ``still running ...`` when nothing was printed for a while (audits, attacks)."""

    def __init__(self, name: str, every: float):
        self.name, self.every = name, every
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _run(self):
        from ..experiments._common import PROGRESS

        while not self._stop.wait(self.every):
            if time.monotonic() - PROGRESS.last_output >= HEARTBEAT_FACTOR * self.every:
                PROGRESS.emit(f"[{self.name}] still running ({PROGRESS.describe()}), "
                              f"{_duration(time.monotonic() - self.t0)} elapsed")


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


LIST_WIDTH = 110  # characters of an experiment's description in --list


def _first_sentence(fn) -> str:
    """The docstring's first paragraph on one line, cut to :data:`LIST_WIDTH` characters."""
    para = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")
    return para if len(para) <= LIST_WIDTH else para[:LIST_WIDTH - 3].rstrip() + "..."


def _table_text(out: Path) -> str | None:
    for name in ("seeds.md", "table.md"):
        if (out / name).is_file():
            return (out / name).read_text()
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import ConfigError
    from ..data.errors import DatasetFormatError, DatasetNotFound
    from ..experiments import registry, reports
    from ..experiments._common import PROGRESS, run_seeds

    experiments = registry()
    if args.list or not args.name:
        for name, fn in experiments.items():
            print(f"{name:28s} {_first_sentence(fn)}")
        return OK if args.list else USAGE
    if args.name not in experiments:
        print(f"error: unknown experiment {args.name!r}; choose one of: {', '.join(experiments)}", file=sys.stderr)
        return USAGE
    try:
        seeds = _seeds(getattr(args, "seeds", None), args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    fn = experiments[args.name]
    given = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir), ("paper", args.paper or None))
             if v is not None}
    takes = inspect.signature(fn).parameters
    refused = [k for k in given if k not in takes]
    if refused:
        opts = ", ".join("--" + k.replace("_", "-") for k in ("data", "data_dir", "paper") if k in takes) or "none"
        print(f"error: experiment {args.name!r} does not take {', '.join('--' + k.replace('_', '-') for k in refused)} "
              f"(its data options: {opts})", file=sys.stderr)
        return USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / "reproduce" / args.name)
    out.mkdir(parents=True, exist_ok=True)
    every = float(getattr(args, "progress_every", 30.0) or 0.0)
    PROGRESS.configure(every=every, prefix=args.name)
    t0 = time.monotonic()
    try:
        with _Heartbeat(args.name, every):
            if seeds is None:
                PROGRESS.emit(f"[{args.name}] seed {args.seed}{' (quick)' if args.quick else ''}: results under {out}")
                fn(out, quick=args.quick, seed=args.seed, **given)
            else:
                run_seeds(fn, args.name, out, seeds, report=reports().get(args.name), quick=args.quick,
                          reuse=getattr(args, "reuse", False), **given)
    except (ConfigError, DatasetNotFound, DatasetFormatError) as e:
        print(f"error: {args.name}: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished parts are under {out}", file=sys.stderr)
        return INTERRUPTED
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {args.name} could not run: {type(e).__name__}: {e}", file=sys.stderr)
        return COULD_NOT_RUN
    table = _table_text(out)
    print(f"\n[{args.name}] done in {_duration(time.monotonic() - t0)}")
    if table:
        print(table.rstrip())
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"\nfull results: {out}/ ({', '.join(files)})")
    return OK
