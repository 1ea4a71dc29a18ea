"""Shared command-line pieces: argument types, JSON output, tables and progress bars (rich)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "add_calibration_flags",
    "add_json_flag",
    "calibration_backend",
    "interrupt_on_sigterm",
    "non_negative_int",
    "plan_progress",
    "positive_float",
    "positive_int",
    "print_json",
    "print_table",
    "progress",
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


WINDOW_S = 2.0
"""Default length of a throughput measurement, in seconds (``--window``)."""


def add_window_flag(parser: argparse.ArgumentParser) -> None:
    """``--window SECONDS``: how long each throughput measurement lasts at least."""
    parser.add_argument(
        "--window",
        type=non_negative_float,
        default=WINDOW_S,
        metavar="SECONDS",
        help="keep each throughput measurement going for at least this long, sending more "
        "requests than --requests when needed: a fraction of a second is at the mercy of one "
        f"hiccup of a host (default {WINDOW_S:g}; 0: exactly --requests)",
    )


def add_epsilon_flag(parser: argparse.ArgumentParser) -> None:
    """``--epsilon``: thin the predicted front to plans the cost model can tell apart."""
    from optisplit.pareto import DEFAULT_EPSILON

    parser.add_argument(
        "--epsilon",
        type=non_negative_float,
        default=DEFAULT_EPSILON,
        metavar="E",
        help=(
            "keep the fewest front plans that stand for the whole front within this relative "
            "margin in latency and throughput: plans closer than the cost model's accuracy "
            "are shown as one (default: %(default)s; 0 keeps every plan of the front)"
        ),
    )


def add_calibration_flags(parser: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """``--backend`` (unless the command has its own) and ``--no-calibration``: which runtime's
    calibrated overheads (``optisplit calibrate``) predictions use, if any."""
    if backend:
        parser.add_argument(
            "--backend",
            choices=("socket", "rpc"),
            default="socket",
            help="runtime the plans are for: predictions use its overheads as calibrated on "
            "this testbed by 'optisplit calibrate', when stored (default: %(default)s)",
        )
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="predict with the default overheads even where a calibration is stored",
    )


def calibration_backend(args: argparse.Namespace) -> str | None:
    """The backend whose calibration predictions use (None: the default overheads)."""
    backend = getattr(args, "backend", None)
    if args.no_calibration or backend not in ("socket", "rpc"):
        return None
    return str(backend)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so that deployments clean up as on Ctrl-C."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable JSON on stdout instead of a table",
    )


def print_json(document: Any) -> None:
    """Print ``document`` as JSON on stdout (the only thing printed there with --json)."""
    json.dump(document, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None
) -> None:
    """Print a table on stdout (rich), right-aligning numbers."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, col in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) for r in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    Console(soft_wrap=True).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


@contextmanager
def progress(description: str, total: int | None, *, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields an object with ``advance(n=1)`` and ``describe(text)``.

    Disabled (silent) when ``enabled`` is false or stderr is not a terminal and no total is known.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield _Handle(bar, task)


class _Handle:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar = bar
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        self._bar.update(self._task, description=text)


@contextmanager
def plan_progress(*, enabled: bool = True) -> Iterator[Any]:
    """Yields a ``validate_plans`` progress callback: one bar per plan, opened as it deploys."""
    stack = contextlib.ExitStack()
    state: dict[str, Any] = {}

    def on_progress(plan: str, phase: str, done: int, total: int) -> None:
        if phase == "deploy":
            stack.close()
            state["bar"] = stack.enter_context(progress(plan, None, enabled=enabled))
            state["bar"].describe(f"{plan}: deploying")
        elif phase in ("latency", "throughput") and "bar" in state:
            state["bar"].describe(f"{plan}: {phase} {done}/{total}")
            state["bar"].advance()
        elif phase == "done":
            stack.close()
            state.pop("bar", None)

    with stack:
        yield on_progress
