"""The ``optisplit`` command line: one thin module per command group, registered below.

Each command module exposes ``register(subparsers)``, adding its parsers with
``set_defaults(func=handler)``; a handler takes the parsed namespace and returns an exit code.
Command modules import torch and other heavy packages inside their handlers only, so that
``optisplit --help`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from optisplit.errors import OptisplitError

__all__ = ["main"]

# Command modules in the order their commands appear in --help.
_COMMAND_MODULES = (
    "optisplit.cli.demo",
    "optisplit.cli.models",
    "optisplit.cli.blocks",
    "optisplit.cli.profile",
    "optisplit.cli.probe",
    "optisplit.cli.calibrate",
    "optisplit.cli.evaluate",
    "optisplit.cli.search",
    "optisplit.cli.studies",
    "optisplit.cli.worker",
    "optisplit.cli.validate",
    "optisplit.cli.compare",
    "optisplit.cli.sweep",
    "optisplit.cli.testbed",
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="optisplit",
        description=(
            "Where should this network be split, and on which devices? Trace a model into "
            "blocks, profile them, predict the latency-throughput Pareto front of multi-device "
            "split plans, validate it on a real or emulated testbed, and compare."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"optisplit {version('optisplit')}"
    except PackageNotFoundError:
        return "optisplit (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage error, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except OptisplitError as exc:
        if args.debug:
            raise
        print(f"optisplit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("optisplit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. '| head'): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
