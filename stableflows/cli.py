"""The ``stableflows`` command line: ``stableflows COMMAND [options]``.

Subcommands live in :mod:`stableflows.commands` (one module each: ``add_arguments`` + ``run``).
Exit status: 0 on success; 2 for a usage error or bad input detected before training starts
(unknown option, bad value, unreadable config, missing or corrupt data / checkpoint); 1 for a
failure after training started (e.g. :class:`~stableflows.train.loop.TrainingDiverged`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .commands import available

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in command docstrings as written."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line plus a pointer to --help (the full usage of train is long)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options.\n")


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
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args._run(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("stableflows: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - mapped to an exit status with a one-line message
        return _report(args, e)


def _report(args: argparse.Namespace, e: Exception) -> int:
    from .train.loop import TrainingDiverged
    from .transforms.base import StableflowsError

    started = getattr(args, "_started", False)
    bad_input = isinstance(e, (StableflowsError, ValueError, FileNotFoundError)) and not isinstance(e, TrainingDiverged)
    if bad_input and not started:
        print(f"stableflows {args.command}: error: {e}\nRun 'stableflows {args.command} --help' for the options.",
              file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, StableflowsError):
        print(f"stableflows {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    raise e


if __name__ == "__main__":
    sys.exit(main())
