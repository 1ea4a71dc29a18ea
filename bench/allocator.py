"""What the worker's heap settings are worth: model time with and without ``tune_allocator``.

Times each model (batch 1, one thread, CPU time, median of ``--runs``) in fresh processes on one
core, with glibc's default heap and with the settings workers and the profiler use
(``optisplit.runtime.stage.tune_allocator``), alternating twice so that the host's drift falls on
both. Run: ``.venv/bin/python bench/allocator.py [--core 1]``; writes
``bench/results/allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mobilenet_v2", "resnet18")

_TIMER = """
import statistics, sys, time, torch
torch.set_num_threads(1)
if sys.argv[2] == "tuned":
    from optisplit.runtime.stage import tune_allocator
    assert tune_allocator()
from optisplit.zoo import build_model, example_input
model, x = build_model(sys.argv[1]).eval(), example_input(sys.argv[1], 1)
with torch.inference_mode():
    for _ in range(5):
        model(x)
    times = []
    for _ in range(int(sys.argv[3])):
        start = time.thread_time()
        model(x)
        times.append((time.thread_time() - start) * 1e3)
print(statistics.median(times))
"""


def _ms(core: int, model: str, heap: str, runs: int) -> float:
    argv = ["taskset", "-c", str(core), sys.executable, "-c", _TIMER, model, heap, str(runs)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rows = []
    print(f"{'model':<14}{'default ms':>11}{'tuned ms':>10}{'default/tuned':>15}")
    for model in MODELS:
        times: dict[str, list[float]] = {"default": [], "tuned": []}
        for _ in range(2):
            for heap in times:
                times[heap].append(_ms(args.core, model, heap, args.runs))
        default, tuned = statistics.mean(times["default"]), statistics.mean(times["tuned"])
        rows.append({"model": model, "default_ms": times["default"], "tuned_ms": times["tuned"]})
        print(f"{model:<14}{default:>11.2f}{tuned:>10.2f}{default / tuned:>15.2f}")
    out = ROOT / "bench" / "results" / "allocator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"core": args.core, "runs": args.runs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
