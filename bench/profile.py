"""Benchmark: profile self-consistency and cost for the six paper models (coarse, batch 1).

For each model, two profiles through the command line with its defaults (1 thread): the sum of
block medians against the whole-model median (target: within 10%), the two profiles against
each other (target: sum and whole within 5%), and the wall time of each command, imports
included (target: at most 20 s). Prints a table; writes bench/results/profile.json.

Usage: .venv/bin/python bench/profile.py [--clock wall|cpu] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "inception_v3"]
RESULTS = ROOT / "bench" / "results" / "profile.json"
# This file's folder comes first on sys.path; keep it from shadowing the stdlib profile module.
sys.path[0] = str(ROOT)


def profile_once(model: str, clock: str, out: Path) -> tuple[dict[str, Any], float]:
    argv = [sys.executable, "-m", "optisplit", "profile", model, "--device", "bench"]
    argv += ["--out", str(out), "--clock", clock, "--json"]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout), time.perf_counter() - start


def _rel(a: float, b: float) -> float:
    return abs(a - b) / ((a + b) / 2)


def bench_model(model: str, clock: str, out: Path) -> dict[str, Any]:
    first, t1 = profile_once(model, clock, out)
    second, t2 = profile_once(model, clock, out)
    return {
        "model": model,
        "blocks": len(first["blocks"]),
        "sum_ms": [first["sum_ms"], second["sum_ms"]],
        "whole_ms": [first["whole_ms"], second["whole_ms"]],
        "sum_vs_whole": [p["sum_ms"] / p["whole_ms"] - 1 for p in (first, second)],
        "repeat_diff_whole": _rel(first["whole_ms"], second["whole_ms"]),
        "repeat_diff_sum": _rel(first["sum_ms"], second["sum_ms"]),
        "seconds": [t1, t2],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--models", nargs="*", default=PAPER)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rows.append(bench_model(model, args.clock, Path(tmp)))
    ok_sum = all(abs(x) <= 0.10 for r in rows for x in r["sum_vs_whole"])
    ok_rep = all(max(r["repeat_diff_whole"], r["repeat_diff_sum"]) <= 0.05 for r in rows)
    ok_time = all(max(r["seconds"]) <= 20 for r in rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {"clock": args.clock, "rows": rows, "sum_within_10pct": ok_sum}
    report.update(repeats_within_5pct=ok_rep, each_within_20s=ok_time)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"clock: {args.clock}, 1 thread, batch 1, coarse, CLI defaults")
    header = f"{'model':<13} {'blocks':>6} {'whole ms':>9} {'sum/whole-1':>12} {'repeat diff':>12} {'time s':>7}"
    print(header)
    for r in rows:
        worst = max(r["sum_vs_whole"], key=abs)
        repeat = max(r["repeat_diff_whole"], r["repeat_diff_sum"])
        print(
            f"{r['model']:<13} {r['blocks']:>6} {r['whole_ms'][0]:9.2f} {worst:+12.1%} "
            f"{repeat:12.1%} {max(r['seconds']):7.1f}"
        )
    print(f"sum within 10%: {ok_sum}; repeats within 5%: {ok_rep}; each <= 20 s: {ok_time}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
