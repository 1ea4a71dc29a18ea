"""``optisplit profile``: time every block of a model on this host (or inside an emulated device)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from optisplit.cli._common import (
    add_json_flag,
    non_negative_float,
    non_negative_int,
    positive_int,
    print_json,
    print_table,
    progress,
)
from optisplit.errors import OptisplitError, UsageError

if TYPE_CHECKING:
    from optisplit.profile import BlockProfile

__all__ = ["register"]

DEFAULT_ROOT = "profiles"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from optisplit.profiler import (
        DEFAULT_MAX_SECONDS,
        DEFAULT_REPEATS,
        DEFAULT_WARMUP,
        MIN_REPEATS,
    )

    parser = subparsers.add_parser(
        "profile",
        help="time every block of a model on this device and write its profile",
        description=(
            "Per block the median, p10 and p90 time, its time as the first block of a stage "
            "(after a rest, on a fresh input; 'start ms' is what that adds), output bytes, "
            "parameter bytes and peak extra memory, plus the whole model timed in one piece "
            "(block and whole-model rounds interleaved). Writes "
            "ROOT/devices/DEVICE/MODEL-bBATCH.json (-fine before .json at fine granularity) "
            "and the same table as .csv. With --testbed, runs "
            "inside DEVICE's emulated sandbox (CPU quota, cores) when that testbed is up."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="zoo model name (see 'optisplit models')")
    parser.add_argument("--device", required=True, help="device name the profile is for")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="default: 1")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (default: 1)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=DEFAULT_WARMUP, help="untimed rounds"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=DEFAULT_REPEATS, help="timed rounds"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=(
            f"stop the timed rounds after this many seconds, once {MIN_REPEATS} have run "
            f"(default: {DEFAULT_MAX_SECONDS:g}; 0: run every round)"
        ),
    )
    parser.add_argument(
        "--spread",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="spread the timed rounds evenly over this many seconds, idle in between: medians "
        "of the device over that span, not of one moment (shared hosts and warming devices "
        "drift; default 0: back to back)",
    )
    parser.add_argument(
        "--granularity", choices=("coarse", "fine"), default="coarse", help="default: coarse"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help=(
            "wall: elapsed time, CPU-quota throttling included (default); cpu: this thread's "
            "CPU time (1 thread only), steady on a host shared with other work"
        ),
    )
    parser.add_argument(
        "--out", default=DEFAULT_ROOT, metavar="ROOT", help="profiles root (default: profiles)"
    )
    parser.add_argument(
        "--module", default=None, metavar="PKG.MOD:FACTORY", help="profile a user model"
    )
    parser.add_argument("--weights", default=None, help="local state-dict file (default: seeded)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    parser.add_argument(
        "--testbed", default=None, help="measure inside this testbed's emulated DEVICE"
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.testbed is not None:
        code = _run_in_sandbox(args)
        if code is not None:
            return code
    target = _target(args)
    from optisplit.pace import anchor_from_env, pace_from_env
    from optisplit.profile import save_profile
    from optisplit.profiler import profile_model

    with progress(f"profiling {args.model}", args.warmup + args.repeats) as bar:
        result = profile_model(
            args.model,
            device=args.device,
            batch_size=args.batch_size,
            granularity=args.granularity,
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            clock=args.clock,
            module=args.module,
            weights=args.weights,
            seed=args.seed,
            on_progress=lambda done, total: bar.advance(),
            max_seconds=args.max_seconds if args.max_seconds > 0 else None,
            spread_s=args.spread,
            pace=pace_from_env(),  # set when run as a paced device of an emulated testbed
            anchor_ms=anchor_from_env(),  # and the speed it keeps to (anchored pacing)
        )
    path = save_profile(result, target)
    if args.json:
        print_json({**result.to_dict(), "path": str(path)})
    else:
        _print_profile(result, path)
    return 0


def _target(args: argparse.Namespace) -> Path:
    """The profile path, checked writable before any measuring."""
    from optisplit.profile import profile_path

    target = profile_path(args.out, args.device, args.model, args.batch_size, args.granularity)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptisplitError(f"cannot write {target}: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK):
        raise OptisplitError(f"cannot write {target}: folder is not writable")
    return target


def _run_in_sandbox(args: argparse.Namespace) -> int | None:
    """Re-run this command inside the device's sandbox; None when the testbed is not up."""
    from optisplit.testbed import load_testbed

    testbed = load_testbed(args.testbed)
    if args.device not in testbed.devices:
        names = ", ".join(sorted(testbed.devices))
        raise UsageError(f"device {args.device!r} is not in testbed {testbed.name} ({names})")
    try:
        from optisplit import emulate
    except ImportError:
        emulate = None  # type: ignore[assignment]
    if emulate is None:
        return None
    if not emulate.is_up(testbed):
        pace = testbed.devices[args.device].pace
        limits = "without the device's CPU limits" if pace is None else f"paced at {pace}"
        print(
            f"optisplit: warning: testbed {testbed.name} is not up; profiling on this host "
            f"{limits}",
            file=sys.stderr,
        )
        if pace is None:
            return None
    argv = [sys.executable, "-m", "optisplit", *_inner_argv(args)]
    command = emulate.wrap_command(testbed, args.device, argv)
    return subprocess.run(command, check=False).returncode


def _inner_argv(args: argparse.Namespace) -> list[str]:
    argv = ["profile", args.model, "--device", args.device]
    argv += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    argv += ["--granularity", args.granularity, "--out", str(Path(args.out).resolve())]
    argv += ["--seed", str(args.seed), "--clock", args.clock]
    argv += ["--max-seconds", str(args.max_seconds), "--spread", str(args.spread)]
    if args.module:
        argv += ["--module", args.module]
    if args.weights:
        argv += ["--weights", str(Path(args.weights).resolve())]
    if args.json:
        argv.append("--json")
    return argv


def _print_profile(result: BlockProfile, path: Path) -> None:
    rows = [
        [
            b.index,
            b.name,
            b.time_ms,
            b.time_p10_ms,
            b.time_p90_ms,
            b.entry_cost_ms,
            b.out_bytes,
            b.mem_bytes,
        ]
        for b in result.blocks
    ]
    title = (
        f"{result.model} on {result.device} (batch {result.batch_size}, "
        f"{result.threads} thread(s), {result.granularity})"
    )
    # start ms: what the block adds when it starts a stage (entry_ms - time_ms)
    columns = ["block", "name", "ms", "p10 ms", "p90 ms", "start ms", "out bytes", "mem bytes"]
    print_table(columns, rows, title=title)
    ratio = result.sum_ms / result.whole_ms if result.whole_ms > 0 else float("nan")
    print(
        f"sum of blocks {result.sum_ms:.3f} ms, whole model {result.whole_ms:.3f} ms "
        f"(ratio {ratio:.3f}); wrote {path}"
    )
