"""``optisplit compare``: predicted vs measured for the validated plans of a study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from optisplit.cli._common import add_json_flag, print_json, print_table

if TYPE_CHECKING:
    from optisplit.compare import Comparison

__all__ = ["register"]

DEFAULT_STUDIES_DIR = "studies"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare predicted and measured objectives of a study's validated plans",
        description=(
            "Per plan the predicted and measured latency and throughput with their errors; "
            "latency and throughput MAPE (percent); Spearman rank correlation per objective; "
            "hypervolume of the predicted and measured fronts on one reference point "
            "(1.1 x the largest latency, 0 requests/s); precision and recall of the predicted "
            "front against the measured one. Writes an overlay plot and a markdown report "
            "(default: studies/<study>/compare-<backend>.png and .md)."
        ),
    )
    parser.add_argument("--study", required=True, help="study name (see 'optisplit studies')")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite)")
    parser.add_argument(
        "--backend",
        choices=("socket", "rpc", "inprocess"),
        default=None,
        help="which measurements to compare (default: the only one, socket first if several)",
    )
    parser.add_argument("--plot", default=None, help="overlay plot path (.png, .svg, .pdf)")
    parser.add_argument("--report", default=None, help="markdown report path")
    parser.add_argument(
        "--out-dir",
        default=DEFAULT_STUDIES_DIR,
        help="folder under which studies/<study>/ reports go by default (default: studies)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optisplit.compare import compare_study
    from optisplit.report import plot_comparison, write_comparison_report
    from optisplit.store import load_study

    study = load_study(args.study, args.storage)
    comparison = compare_study(study, backend=args.backend)
    folder = Path(args.out_dir) / args.study
    plot = Path(args.plot) if args.plot else folder / f"compare-{comparison.backend}.png"
    report = Path(args.report) if args.report else folder / f"compare-{comparison.backend}.md"
    plot_comparison(comparison, plot)
    write_comparison_report(comparison, report, plot_path=plot)
    if args.json:
        document = comparison.to_dict()
        document["plot"] = str(plot)
        document["report"] = str(report)
        print_json(document)
        return 0
    _print(comparison)
    print(f"plot: {plot}\nreport: {report}", file=sys.stderr)
    return 0


def _print(comparison: Comparison) -> None:
    rows = [
        [
            p.plan,
            p.predicted_latency_ms,
            _or_dash(p.measured_latency_ms),
            _or_dash(p.latency_error_pct),
            p.predicted_throughput_rps,
            _or_dash(p.measured_throughput_rps),
            _or_dash(p.throughput_error_pct),
            ("P" if p.on_predicted_front else "") + ("M" if p.on_measured_front else ""),
            p.error or "",
        ]
        for p in comparison.plans
    ]
    print_table(
        [
            "plan",
            "pred ms",
            "meas ms",
            "err %",
            "pred req/s",
            "meas req/s",
            "err %",
            "front",
            "error",
        ],
        rows,
        title=f"{comparison.study}: predicted vs measured ({comparison.backend})",
    )
    summary = [
        ["latency MAPE %", _or_dash(comparison.latency_mape)],
        ["throughput MAPE %", _or_dash(comparison.throughput_mape)],
        ["latency Spearman", _or_dash(comparison.latency_spearman)],
        ["throughput Spearman", _or_dash(comparison.throughput_spearman)],
        ["hypervolume predicted", _or_dash(comparison.hv_predicted)],
        ["hypervolume measured", _or_dash(comparison.hv_measured)],
        ["front precision", _or_dash(comparison.front_precision)],
        ["front recall", _or_dash(comparison.front_recall)],
        ["stages slower while streaming % (median)", _or_dash(comparison.stream_slowdown_pct)],
    ]
    repeat = comparison.repeatability
    if repeat:
        summary += [
            [
                f"round-to-round latency MAPE % ({repeat['rounds']} rounds)",
                _or_dash(repeat["latency_mape"]),
            ],
            ["round-to-round throughput MAPE %", _or_dash(repeat["throughput_mape"])],
            ["round-to-round latency Spearman", _or_dash(repeat["latency_spearman"])],
            ["round-to-round throughput Spearman", _or_dash(repeat["throughput_spearman"])],
        ]
    print_table(["figure", "value"], summary)


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value
