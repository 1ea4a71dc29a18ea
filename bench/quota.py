"""How a CPU-quota device runs a model: back-to-back whole-model time against the CFS period.

The emulated slow device of the ``local`` testbed gets half a core through a CFS quota. This
benchmark times one model back to back on this host's cores, then inside the slow device's
sandbox with the shipped period and with others, to show how far throttled execution drifts
from ``time / quota`` (the cost model's assumption).

Run as root: ``.venv/bin/python bench/quota.py [--model mobilenet_v2] [--runs 40]``;
writes ``bench/results/quota.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from optisplit import emulate
from optisplit.emulate import cgroup
from optisplit.testbed import load_testbed

ROOT = Path(__file__).resolve().parents[1]
PERIODS_US = (100_000, 20_000, cgroup.PERIOD_US, 2_000)

_TIMER = """
import statistics, sys, time, torch
torch.set_num_threads(1)
from optisplit.zoo import build_model, example_input
name, runs = sys.argv[1], int(sys.argv[2])
model, x = build_model(name), example_input(name, 1)
with torch.inference_mode():
    for _ in range(5):
        model(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
print(statistics.median(times))
"""


def _median_ms(prefix: list[str], model: str, runs: int) -> float:
    argv = [*prefix, sys.executable, "-c", _TIMER, model, str(runs)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def _set_period(group: Path, period_us: int, quota: float) -> None:
    # Lower the quota first: the kernel refuses a quota above a shorter period's bound.
    (group / "cpu.cfs_quota_us").write_text("-1")
    (group / "cpu.cfs_period_us").write_text(str(period_us))
    (group / "cpu.cfs_quota_us").write_text(str(round(quota * period_us)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/quota.py needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    base = load_testbed("local")
    bed = type(base)(**{**base.__dict__, "name": f"quota{os.getpid()}"})
    slow = next(d for d in bed.devices.values() if d.cpu_quota is not None and d.cpu_quota < 1)
    assert slow.cpu_quota is not None and slow.cores
    rows: list[dict[str, Any]] = []
    for core in (0, *slow.cores):
        ms = _median_ms(["taskset", "-c", str(core)], args.model, args.runs)
        rows.append({"where": f"host core {core}", "period_us": None, "median_ms": ms})
    emulate.up(bed, check=False)
    try:
        prefix = emulate.wrap_command(bed, slow.name, [])
        group = _group_of(prefix)
        for period in PERIODS_US:
            _set_period(group, period, slow.cpu_quota)
            ms = _median_ms(prefix, args.model, args.runs)
            rows.append(
                {
                    "where": f"{slow.name} (quota {slow.cpu_quota})",
                    "period_us": period,
                    "median_ms": ms,
                }
            )
    finally:
        emulate.down(bed.name)
    bare = rows[len(slow.cores)]["median_ms"]
    print(f"{args.model}, {args.runs} back-to-back runs, median ms; quota {slow.cpu_quota}")
    print(f"{'where':<26}{'period us':>10}{'median ms':>11}{'x core':>8}")
    for row in rows:
        period = "-" if row["period_us"] is None else str(row["period_us"])
        ratio = row["median_ms"] / bare
        print(f"{row['where']:<26}{period:>10}{row['median_ms']:>11.1f}{ratio:>8.2f}")
    print(
        f"time / quota predicts {bare / slow.cpu_quota:.1f} ms "
        f"(shipped period {cgroup.PERIOD_US} us)"
    )
    out = ROOT / "bench" / "results" / "quota.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"model": args.model, "runs": args.runs, "quota": slow.cpu_quota, "rows": rows},
            indent=2,
        )
    )
    return 0


def _group_of(prefix: list[str]) -> Path:
    return Path(prefix[prefix.index("--cgroup") + 1])


if __name__ == "__main__":
    sys.exit(main())
