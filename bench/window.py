"""Throughput window: how much a plan's measured throughput varies with the measurement's length.

Measures the same plans again and again on an emulated testbed, alternating the throughput
window (``optisplit validate --window``): ``0`` (exactly ``--requests`` requests, a fraction of a
second) against ``2`` seconds, and prints each plan's values, mean and coefficient of variation
per window. Needs root (the testbed is brought up, and down again if it was not up).

    .venv/bin/python bench/window.py [--testbed local3] [--model mobilenet_v2] [--backend socket]
        [--windows 0,2] [--repeats 5] [--requests 20] [--plan P ...]

Writes bench/results/window.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

from optisplit import emulate  # noqa: E402
from optisplit.testbed import load_testbed  # noqa: E402
from optisplit.validate import validate_plans  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PLANS = (
    "fast[0:14] -> slow1[14:21] -> slow2[21:23]",
    "slow1[0:3] -> fast[3:21] -> slow2[21:23]",
)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="local3")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--backend", default="socket")
    parser.add_argument("--windows", default="0,2", help="windows in seconds, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per plan and window")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--plan", action="append", help=f"default: {' | '.join(PLANS)}")
    parser.add_argument("--out", default=str(RESULTS / "window.json"))
    return parser.parse_args()


def main() -> int:
    args = _args()
    plans = args.plan or list(PLANS)
    windows = [float(w) for w in args.windows.split(",")]
    bed = load_testbed(args.testbed)
    values: dict[tuple[str, float], list[float]] = {(p, w): [] for p in plans for w in windows}
    started = time.monotonic()
    was_up = emulate.is_up(bed)
    try:
        emulate.up(bed, check=True)
        with tempfile.TemporaryDirectory() as scratch:
            for repeat in range(args.repeats):
                for window in windows:  # alternating: a slow spell of the host hits both
                    results = validate_plans(
                        args.model,
                        bed,
                        plans,
                        backend=args.backend,
                        requests=args.requests,
                        warmup=args.warmup,
                        window_s=window,
                        out_dir=Path(scratch) / f"{repeat}-{window:g}",
                    )
                    for result in results:
                        if result["measured"] is None:
                            raise SystemExit(f"{result['plan']} failed: {result['error']}")
                        values[result["plan"], window].append(result["measured"]["throughput_rps"])
                print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        if not was_up:
            emulate.down(bed.name)
    rows = [_row(plan, window, v) for (plan, window), v in values.items()]
    _print(rows)
    doc = {
        "testbed": bed.name,
        "model": args.model,
        "backend": args.backend,
        "requests": args.requests,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out} in {doc['seconds']} s")
    return 0


def _row(plan: str, window: float, values: list[float]) -> dict[str, Any]:
    mean = statistics.mean(values)
    return {
        "plan": plan,
        "window_s": window,
        "throughput_rps": values,
        "mean_rps": mean,
        "cv_percent": statistics.pstdev(values) / mean * 100,
    }


def _print(rows: list[dict[str, Any]]) -> None:
    head = f"{'plan':46} {'window s':>8} {'mean req/s':>10} {'CV %':>6}  values"
    print(head)
    print("-" * len(head))
    for r in rows:
        values = " ".join(f"{v:.1f}" for v in r["throughput_rps"])
        print(
            f"{r['plan']:46} {r['window_s']:>8g} {r['mean_rps']:>10.1f} "
            f"{r['cv_percent']:>6.1f}  {values}"
        )


if __name__ == "__main__":
    sys.exit(main())
