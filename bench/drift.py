"""How steady this host's cores are: the same work timed over and over on one idle core.

Interleaves, for ``--seconds``, medians of a few runs each of mobilenet_v2 and resnet18 (batch
1, one thread, CPU time), a pair of 3x3 convolutions and a 256x256 matmul, then prints each
workload's range and the correlation of their times. A profile taken at one moment predicts a
stage run at another only as well as these stay put; a reference kernel could correct a model's
times only as far as their drifts move together.

Run: ``taskset -c 1 .venv/bin/python bench/drift.py [--seconds 90]``; writes
``bench/results/drift.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)


def _median_cpu_ms(work: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.thread_time()
        work()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window median")
    args = parser.parse_args()

    import numpy as np
    import torch

    from optisplit.runtime.stage import tune_allocator
    from optisplit.zoo import build_model, example_input

    torch.set_num_threads(1)
    tune_allocator()
    models = {
        name: (build_model(name).eval(), example_input(name, 1))
        for name in ("mobilenet_v2", "resnet18")
    }
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),
    ).eval()
    conv_x = torch.randn(1, 64, 56, 56)
    a = torch.randn(256, 256)
    workloads: dict[str, tuple[Callable[[], object], int]] = {
        "mobilenet_v2": (lambda: models["mobilenet_v2"][0](models["mobilenet_v2"][1]), 5),
        "resnet18": (lambda: models["resnet18"][0](models["resnet18"][1]), 3),
        "conv pair": (lambda: conv(conv_x), 10),
        "matmul 256": (lambda: a @ a, 20),
    }
    rows: list[list[float]] = []
    with torch.inference_mode():
        for work, _ in workloads.values():
            for _ in range(3):
                work()
        start = time.monotonic()
        end = start + args.seconds
        stamps: list[float] = []
        while time.monotonic() < end:
            stamps.append(time.monotonic() - start)
            rows.append([_median_cpu_ms(work, runs) for work, runs in workloads.values()])
    table = np.array(rows)
    names = list(workloads)
    print(f"{len(rows)} rounds in {args.seconds:.0f} s, CPU ms (median of a few runs per round)")
    print(f"{'workload':<14}{'min':>8}{'median':>8}{'max':>8}{'max/min':>9}")
    summary = {}
    for i, name in enumerate(names):
        col = table[:, i]
        lo, mid, hi = float(col.min()), float(np.median(col)), float(col.max())
        summary[name] = {"min_ms": lo, "median_ms": mid, "max_ms": hi}
        print(f"{name:<14}{lo:>8.2f}{mid:>8.2f}{hi:>8.2f}{hi / lo:>9.2f}")
    # slow wander or brief spikes? medians over windows of --window seconds
    windows = np.floor(np.array(stamps) / args.window).astype(int)
    print(f"medians of {args.window:.0f}-s windows: min / max (max/min)")
    window_medians = {}
    for i, name in enumerate(names):
        meds = [float(np.median(table[windows == w, i])) for w in np.unique(windows)]
        window_medians[name] = meds
        print(f"{name:<14}{min(meds):>8.2f}{max(meds):>8.2f}{max(meds) / min(meds):>9.2f}")
    corr = np.corrcoef(table.T)
    print("correlation of the workloads' times:")
    print(" " * 14 + "".join(f"{n[:12]:>13}" for n in names))
    for i, name in enumerate(names):
        print(f"{name:<14}" + "".join(f"{corr[i, j]:>13.2f}" for j in range(len(names))))
    out = ROOT / "bench" / "results" / "drift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "seconds": args.seconds,
        "rounds": len(rows),
        "workloads": summary,
        "correlation": corr.tolist(),
        "names": names,
        "window_s": args.window,
        "window_medians": window_medians,
        "series": {"t_s": stamps, **{n: table[:, i].tolist() for i, n in enumerate(names)}},
    }
    out.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
