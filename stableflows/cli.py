"""The ``stableflows`` command line: ``stableflows COMMAND [options]``.

Subcommands live in :mod:`stableflows.commands` (one module each: ``add_arguments`` + ``run``).
Exit status (:mod:`stableflows.exitcodes`): 0 ``OK``; 1 ``NOT_INVERTIBLE`` (a verdict of ``audit`` /
``ood``); 2 ``USAGE``, a usage or configuration error detected before any work (unknown option, bad
value, unreadable config, missing or corrupt data / checkpoint, an out-dir that is in use, holds
another run or is not writable); 3 ``COULD_NOT_RUN``, a fault after the work started (training
diverged, a write failed: the disk is full ...); 130 ``INTERRUPTED`` (SIGINT / SIGTERM; ``train``
saves ``last.pt`` first). Every one of these is reported in one line on stderr; notes (e.g. a
checkpoint of an older format loaded without checksums) are one line each too.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from . import __version__
from .commands import available
from .exitcodes import COULD_NOT_RUN, INTERRUPTED, OK, USAGE

__all__ = ["build_parser", "main"]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in command docstrings as written."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line plus a pointer to --help (the full usage of train is long)."""

    def error(self, message: str):
        self.exit(USAGE, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stableflows", formatter_class=_Formatter,
        description="Invertible neural networks that stay invertible: train, evaluate and sample flows.",
        epilog="Run 'stableflows COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"stableflows {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in available().items():
        sp = sub.add_parser(name, help=getattr(mod, "HELP", None), description=mod.__doc__,
                            formatter_class=_Formatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run, _parser=sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (never raises SystemExit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed by argparse
        return int(e.code) if isinstance(e.code, int) else USAGE
    with warnings.catch_warnings():
        warnings.showwarning = _note_printer(args.command)
        try:
            return int(args._run(args) or OK)
        except KeyboardInterrupt as e:  # train saved last.pt first and says so
            print(f"stableflows {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
            return INTERRUPTED
        except Exception as e:  # noqa: BLE001 - mapped to an exit status with a one-line message
            return _report(args, e)


def _note_printer(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"stableflows {command}: note: {message}", file=sys.stderr)

    return show


def _report(args: argparse.Namespace, e: Exception) -> int:
    from .config import ConfigError
    from .train.loop import TrainingDiverged
    from .train.rundir import RunDirError
    from .transforms.base import StableflowsError

    started = getattr(args, "_started", False)
    if isinstance(e, TrainingDiverged) or (started and isinstance(e, (StableflowsError, OSError))):
        print(f"stableflows {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return COULD_NOT_RUN
    if isinstance(e, (StableflowsError, ValueError, OSError)):
        hint = (f"\nRun 'stableflows {args.command} --help' for the options."
                if isinstance(e, ConfigError) and not isinstance(e, RunDirError) else "")
        print(f"stableflows {args.command}: error: {e}{hint}", file=sys.stderr)
        return USAGE
    raise e


if __name__ == "__main__":
    sys.exit(main())
