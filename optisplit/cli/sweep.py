"""``optisplit sweep``: how the front moves across network conditions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.cli._common import (
    add_calibration_flags,
    add_epsilon_flag,
    add_json_flag,
    add_window_flag,
    positive_int,
    print_json,
    print_table,
    progress,
)
from optisplit.errors import UsageError

if TYPE_CHECKING:
    from optisplit.plan import Plan
    from optisplit.sweep import Measure, Sweep
    from optisplit.testbed import Testbed

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="predict (and measure) the front under several network conditions",
        description=(
            "Search the front of MODEL on a testbed under each named network condition (every "
            "link takes the condition's RTT and bandwidth) and draw the fronts in one figure. "
            "The summary gives, per condition, the front size, its extremes and the share of "
            "the model's compute kept on the source device (mean over the front, and in the "
            "lowest-latency plan)."
        ),
    )
    parser.add_argument("model", help="model name (profiles must exist for the testbed)")
    parser.add_argument("--testbed", required=True, help="testbed name or YAML path")
    parser.add_argument(
        "--conditions",
        default="lan,wifi,constrained",
        help="comma-separated condition names (default: lan,wifi,constrained)",
    )
    parser.add_argument("--engine", default="exact", help="search engine (default: exact)")
    parser.add_argument("--budget", type=positive_int, default=None, help="evaluation budget")
    parser.add_argument("--seed", type=int, default=0, help="search seed (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size")
    parser.add_argument(
        "--profiles",
        default="profiles",
        help="profiles folder (devices/; testbeds/ too, else ./profiles/testbeds)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="also measure every front plan under each condition",
    )
    parser.add_argument(
        "--backend",
        choices=("socket", "rpc"),
        default="socket",
        help="runtime --validate measures on; predictions use its overheads as calibrated "
        "by 'optisplit calibrate', when stored (default: %(default)s)",
    )
    parser.add_argument(
        "--requests", type=positive_int, default=10, help="measured requests per plan"
    )
    parser.add_argument("--warmup", type=positive_int, default=2, help="warm-up requests per plan")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="with --validate: measure every plan N times, plans taking turns (see validate)",
    )
    add_window_flag(parser)
    parser.add_argument(
        "--skip-checks",
        action="store_true",
        help="with --validate on an emulated testbed: do not probe links and devices (busy hosts)",
    )
    parser.add_argument("--plot", default=None, help="figure path (default: studies/sweep-*.png)")
    add_epsilon_flag(parser)
    add_calibration_flags(parser, backend=False)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optisplit.report import plot_fronts
    from optisplit.sweep import front_points, run_sweep
    from optisplit.testbed import load_testbed, testbed_path

    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not conditions:
        raise UsageError("--conditions needs at least one condition name, e.g. lan,constrained")
    root = (
        args.profiles if testbed_path(args.testbed, root=args.profiles).is_file() else "profiles"
    )
    testbed = load_testbed(args.testbed, root=root)
    emulated: list[str] = []
    measure = _measure(args, emulated) if args.validate else None
    was_up = _is_up(testbed) if args.validate else True
    try:
        with progress("sweep", len(conditions), enabled=not args.json) as bar:
            started: list[str] = []

            def step(name: str) -> None:
                if started:
                    bar.advance()
                started.append(name)
                bar.describe(f"sweep: {name}")

            result = run_sweep(
                args.model,
                testbed,
                conditions,
                engine=args.engine,
                batch_size=args.batch_size,
                profiles_root=args.profiles,
                budget=args.budget,
                seed=args.seed,
                measure=measure,
                on_condition=step,
                backend=None if args.no_calibration else args.backend,
                epsilon=args.epsilon,
            )
    finally:
        if emulated and not was_up:
            from optisplit import emulate

            emulate.down(testbed.name)
    plot = Path(args.plot or f"studies/sweep-{args.model}-{testbed.name}.png")
    plot_fronts(
        {c.condition: front_points(c) for c in result.conditions},
        plot,
        title=f"{args.model} on {testbed.name}: front per network condition",
        measured={c.condition: front_points(c, measured=True) for c in result.conditions},
    )
    if args.json:
        print_json({**result.to_dict(), "plot": str(plot)})
    else:
        _print(result)
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def _measure(args: argparse.Namespace, emulated: list[str]) -> Measure:
    """Validation under each condition; an emulated testbed is rebuilt with that condition."""

    def measure(testbed: Testbed, condition: str, plans: Sequence[Plan]) -> list[dict[str, Any]]:
        from optisplit import emulate
        from optisplit.validate import validate_plans

        real = any(d.address for d in testbed.devices.values())
        if not real:
            emulate.up(testbed, check=not args.skip_checks)
            if testbed.name not in emulated:
                emulated.append(testbed.name)
        results: list[dict[str, Any]] = validate_plans(
            args.model,
            testbed,
            list(plans),
            backend=args.backend,
            batch_size=args.batch_size,
            requests=args.requests,
            warmup=args.warmup,
            rounds=args.rounds,
            window_s=args.window,
            profiles_root=args.profiles,
            calibrated=not args.no_calibration,
            out_dir=Path("studies") / f"sweep-{args.model}-{testbed.name}" / condition,
        )
        return results

    return measure


def _is_up(testbed: Testbed) -> bool:
    from optisplit import emulate

    return emulate.is_up(testbed)


def _print(result: Sweep) -> None:
    columns = [
        "condition",
        "rtt ms",
        "Mbit/s",
        "front",
        "min latency ms",
        "max req/s",
        "source share",
        "share @ min lat",
    ]
    rows: list[list[Any]] = []
    for cond in result.conditions:
        s = cond.summary()
        rows.append(
            [
                s["condition"],
                s["rtt_ms"],
                s["mbps"],
                s["front_size"],
                _dash(s["min_latency_ms"]),
                _dash(s["max_throughput_rps"]),
                _dash(s["source_share_mean"]),
                _dash(s["source_share_at_min_latency"]),
            ]
        )
    measured = any(c.comparison for c in result.conditions)
    if measured:
        columns += ["latency MAPE %", "throughput MAPE %"]
        for row, cond in zip(rows, result.conditions):
            s = cond.summary()
            row += [_dash(s["latency_mape"]), _dash(s["throughput_mape"])]
    print_table(
        columns, rows, title=f"{result.model} on {result.testbed} (source {result.source})"
    )
    for cond in result.conditions:
        print_table(
            ["plan", "latency ms", "req/s", "source share"],
            [
                [str(e.plan), e.latency_ms, e.throughput_rps, share]
                for e, share in zip(cond.front, cond.source_shares)
            ],
            title=f"front under {cond.condition}",
        )


def _dash(value: Any) -> Any:
    return "-" if value is None else value
