"""``optisplit demo``: the whole pipeline on the local emulated testbed, in a few minutes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from optisplit.cli._common import (
    add_epsilon_flag,
    add_json_flag,
    add_window_flag,
    non_negative_float,
    positive_int,
    print_json,
    print_table,
    progress,
)

if TYPE_CHECKING:
    from optisplit.demo import DemoResult

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="emulated testbed -> profiles -> exact front -> validation -> comparison report",
        description=(
            "Bring up the local emulated testbed (two devices of different speed joined by a "
            "shaped link; plain loopback processes with a warning when not root), profile the "
            "model on each device inside its sandbox, calibrate the runtime's overheads "
            "('optisplit calibrate'), search the exact front into a new study, "
            "validate every front plan, compare predicted with measured, and write the report "
            "and plot under OUT/<study>/. Ctrl-C at any point leaves nothing behind."
        ),
    )
    parser.add_argument("--model", default="resnet18", help="model (default: resnet18)")
    parser.add_argument("--backend", choices=("socket", "rpc"), default="socket")
    parser.add_argument("--testbed", default="local", help="testbed (default: local)")
    parser.add_argument("--out", default="studies", help="reports folder (default: studies)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite)")
    parser.add_argument("--study", default=None, help="study name (default: demo-<...>-<time>)")
    parser.add_argument("--profiles", default="profiles", help="profiles folder")
    parser.add_argument(
        "--requests", type=positive_int, default=10, help="measured requests per plan"
    )
    parser.add_argument("--warmup", type=positive_int, default=2, help="warm-up requests per plan")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="measure every plan this many times, plans taking turns (default 2; see validate)",
    )
    add_window_flag(parser)
    parser.add_argument(
        "--repeats", type=positive_int, default=15, help="timed rounds per block when profiling"
    )
    parser.add_argument(
        "--spread",
        type=non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="spread each device's profile over this many seconds (default 10; see "
        "'optisplit profile --help')",
    )
    add_epsilon_flag(parser)
    parser.add_argument(
        "--reprofile", action="store_true", help="measure profiles even when they exist"
    )
    parser.add_argument(
        "--skip-checks",
        action="store_true",
        help="do not probe the emulated links and devices against their spec (busy hosts)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optisplit.demo import STEPS, run_demo

    with progress("demo", len(STEPS), enabled=not args.json) as bar:
        started: list[str] = []

        def on_step(step: str, detail: str) -> None:
            if step not in started:
                if started:
                    bar.advance()
                started.append(step)
            bar.describe(detail)

        result = run_demo(
            model=args.model,
            backend=args.backend,
            out_dir=args.out,
            storage=args.storage,
            testbed=args.testbed,
            profiles_root=args.profiles,
            requests=args.requests,
            warmup=args.warmup,
            rounds=args.rounds,
            window_s=args.window,
            profile_repeats=args.repeats,
            profile_spread_s=args.spread,
            reprofile=args.reprofile,
            epsilon=args.epsilon,
            study_name=args.study,
            check=not args.skip_checks,
            on_step=on_step,
        )
    if args.json:
        print_json(result.to_dict())
        return 0
    _print(result)
    return 0


def _print(result: DemoResult) -> None:
    from optisplit.demo import DRIFT_WARN

    c = result.comparison
    rows = [
        [
            p.plan,
            p.predicted_latency_ms,
            p.measured_latency_ms if p.measured_latency_ms is not None else "-",
            p.predicted_throughput_rps,
            p.measured_throughput_rps if p.measured_throughput_rps is not None else "-",
            p.error or ("outputs match" if p.outputs_match else "outputs differ"),
        ]
        for p in c.plans
    ]
    where = "emulated" if result.emulated else "loopback, not emulated"
    print_table(
        ["plan", "pred ms", "meas ms", "pred req/s", "meas req/s", "check"],
        rows,
        title=f"{result.model} on {result.testbed} ({where}), {result.backend} backend",
    )
    figures = [
        ("latency MAPE", _pct(c.latency_mape)),
        ("throughput MAPE", _pct(c.throughput_mape)),
        (
            "Spearman latency / throughput",
            f"{_num(c.latency_spearman)} / {_num(c.throughput_spearman)}",
        ),
        ("front precision / recall", f"{_num(c.front_precision)} / {_num(c.front_recall)}"),
    ]
    if len(result.front) < result.exact_front_size:
        figures.insert(
            0,
            (
                "plans validated",
                f"{len(result.front)}, standing for the {result.exact_front_size} of the exact "
                f"front within {result.epsilon:.0%} (--epsilon)",
            ),
        )
    if c.repeatability:  # the same figures between measuring rounds: the noise floor
        r = c.repeatability
        figures += [
            (
                "round to round: MAPE latency / throughput",
                f"{_pct(r['latency_mape'])} / {_pct(r['throughput_mape'])}",
            ),
            (
                "round to round: Spearman latency / throughput",
                f"{_num(r['latency_spearman'])} / {_num(r['throughput_spearman'])}",
            ),
        ]
    o = result.overheads
    if o:
        figures.append(
            (
                "runtime overheads" + ("" if result.calibrated else " (defaults, not calibrated)"),
                f"message {o['message_ms']:.2f} ms, "
                f"hand-off {o['handoff_ms']:.2f} ms + {o['handoff_ms_per_mb']:.2f} ms/MB, "
                f"queue {o['queue_ms']:.2f} ms per stage, "
                f"per request {o['request_ms']:.2f} ms, client {o['client_ms']:.2f} ms, "
                f"forwarder {o['forward_ms']:.2f} ms + {o['forward_ms_per_mb']:.2f} ms/MB, "
                f"waiting {o['client_wait_share']:.1%} (client) / "
                f"{o['worker_wait_share']:.1%} (worker) of a core",
            )
        )
    drift = result.compute_drift
    if drift is not None:
        figures.append(("stages' compute against their profiles", f"{drift:+.1%}"))
    if c.stream_slowdown_pct is not None:
        figures.append(
            (
                "stages slower while requests streamed than one at a time",
                f"{c.stream_slowdown_pct:+.1f} % (median over the plans of their slowest stage)",
            )
        )
    for label, value in figures:
        print(f"{label}: {value}")
    if drift is not None and abs(drift) > DRIFT_WARN:
        print(
            f"warning: the stages computed {abs(drift):.0%} "
            f"{'slower' if drift > 0 else 'faster'} than their profiles said: this host's "
            "speed changed between profiling and validation, and the errors above show it; "
            "run the demo again with --reprofile",
            file=sys.stderr,
        )
    print(f"\nreport: {result.report}\nplot:   {result.plot}")
    print(f"study:  {result.study} in {result.storage}")
    print(f"open the dashboard: optisplit dashboard --storage {result.storage}")
    total = sum(result.seconds.values())
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(f"took {total:.0f} s ({steps})", file=sys.stderr)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
