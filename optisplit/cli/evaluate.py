"""``optisplit evaluate``: predict latency, throughput and memory of given split plans."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from optisplit.cli._common import (
    add_calibration_flags,
    add_json_flag,
    calibration_backend,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from optisplit.errors import UsageError

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="predict latency, throughput and memory of split plans",
        description=(
            "Predict each plan with the cost model: latency (ms per request), throughput "
            "(requests/s and items/s), memory per device and feasibility, with the compute of "
            "every stage and the time of every transfer. A plan is written "
            "'DEVICE[START:END] -> DEVICE[START:END]' with half-open block indices "
            "(see 'optisplit blocks MODEL')."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model name (see 'optisplit models')")
    parser.add_argument("--testbed", required=True, help="testbed name or YAML file")
    parser.add_argument(
        "--plan",
        action="append",
        required=True,
        metavar="PLAN",
        help="a split plan, e.g. 'pi1[0:7] -> gpu[7:19]' (repeat for several)",
    )
    add_testbed_arguments(parser)
    add_calibration_flags(parser)
    add_json_flag(parser)
    parser.set_defaults(func=_evaluate)


def add_testbed_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch size, granularity, link conditions and the profiles root."""
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--granularity",
        choices=("coarse", "fine"),
        default="coarse",
        help="block granularity (default: %(default)s)",
    )
    parser.add_argument(
        "--condition",
        default=None,
        help="every link under a named condition: lan, wifi or constrained",
    )
    parser.add_argument(
        "--link-rtt-ms",
        type=float,
        default=None,
        help="set every link's RTT (ms), after --condition",
    )
    parser.add_argument(
        "--link-mbps",
        type=positive_float,
        default=None,
        help="set every link's bandwidth (Mbit/s), after --condition",
    )
    parser.add_argument(
        "--measured-links",
        action="store_true",
        help="use the links measured by 'optisplit probe-link' (profiles/links/<testbed>.json)",
    )
    parser.add_argument(
        "--profiles", default="profiles", help="profiles root (default: %(default)s)"
    )


def testbed_from_args(args: argparse.Namespace) -> Testbed:
    """The testbed named by ``--testbed``: measured links, then ``--condition``, then overrides."""
    from optisplit.testbed import apply_condition, load_testbed

    if args.link_rtt_ms is not None and not args.link_rtt_ms >= 0:
        raise UsageError(f"--link-rtt-ms must be a number >= 0, got {args.link_rtt_ms}")
    testbed = load_testbed(args.testbed, root=args.profiles)
    if getattr(args, "measured_links", False):
        from optisplit.probe import apply_link_measurements

        testbed = apply_link_measurements(testbed, root=args.profiles)
    if args.condition:
        testbed = apply_condition(testbed, args.condition)
    if args.link_rtt_ms is not None or args.link_mbps is not None:
        testbed = testbed.with_links(rtt_ms=args.link_rtt_ms, mbps=args.link_mbps)
    return testbed


def _evaluate(args: argparse.Namespace) -> int:
    from optisplit.cost import load_cost_model
    from optisplit.plan import Plan

    plans = [Plan.parse(text) for text in args.plan]
    model = load_cost_model(
        args.model,
        testbed_from_args(args),
        batch_size=args.batch_size,
        profiles_root=args.profiles,
        granularity=args.granularity,
        backend=calibration_backend(args),
    )
    evaluations = [model.evaluate(plan) for plan in plans]
    if args.json:
        print_json([e.to_dict() for e in evaluations])
        return 0
    rows = [
        [
            str(e.plan),
            e.latency_ms,
            e.throughput_rps,
            e.items_per_s,
            ", ".join(f"{d} {m / 2**20:.1f}" for d, m in e.memory_bytes.items()),
            "yes" if e.feasible else "NO",
            e.bound,
        ]
        for e in evaluations
    ]
    print_table(
        ["plan", "latency ms", "requests/s", "items/s", "memory MiB", "feasible", "bound by"],
        rows,
        title=f"{model.model} on {model.testbed.name} (batch {model.batch_size}, {model.granularity})",
    )
    return 0
