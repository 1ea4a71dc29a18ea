"""How a slow emulated device runs a model: a CFS quota against pacing, back to back and alone.

The emulated slow device of the ``local`` testbed gets half a core. This benchmark times one
model's blocks, run one after another, on a bare core and then inside a half-core sandbox: under
a CFS quota with several periods, and paced (``throttle: pace``: one rest after the blocks). Each
is timed back to back (a full pipeline) and with a 100 ms idle gap before each run (a lone
request), in the wall clock, against the cost model's assumption of ``CPU time / 0.5``.

Run as root: ``.venv/bin/python bench/quota.py [--model mobilenet_v2] [--runs 30]``;
writes ``bench/results/quota.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
GAP_S = 0.1

# Prints "wall_ms cpu_ms": medians over the runs of the blocks' wall time and CPU time.
_TIMER = """
import statistics, sys, time, torch
torch.set_num_threads(1)
from optisplit.chain import load_chain
from optisplit.pace import PacedBlocks, Pacer, pace_from_env
from optisplit.runtime.stage import tune_allocator
tune_allocator()
name, runs, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
chain = load_chain(name)
blocks = [chain.stage_module(i, i + 1) for i in range(chain.n_blocks)]
speed = pace_from_env()
stage = PacedBlocks(blocks, Pacer(speed or 1.0))
x = chain.example_inputs
with torch.inference_mode():
    for _ in range(5):
        stage(*x)
    wall, cpu = [], []
    for _ in range(runs):
        if gap:
            time.sleep(gap)
        start, used = time.perf_counter(), time.thread_time()
        stage(*x)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.thread_time() - used) * 1e3)
print(statistics.median(wall), statistics.median(cpu))
"""


def _time(prefix: list[str], model: str, runs: int, gap: float) -> tuple[float, float]:
    argv = [*prefix, sys.executable, "-c", _TIMER, model, str(runs), str(gap)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def _set_period(group: Path, period_us: int | None, quota: float) -> None:
    # Lower the quota first: the kernel refuses a quota above a shorter period's bound.
    (group / "cpu.cfs_quota_us").write_text("-1")
    if period_us is not None:
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(round(quota * period_us)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/quota.py needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    base = load_testbed("local")
    slow = next(d for d in base.devices.values() if d.cpu_quota is not None and d.cpu_quota < 1)
    assert slow.cpu_quota is not None and slow.cores
    quota = slow.cpu_quota
    devices = {
        **base.devices,
        slow.name: dataclasses.replace(slow, throttle="quota"),
        "paced": dataclasses.replace(slow, name="paced", throttle="pace"),
    }
    links = (*base.links, dataclasses.replace(base.links[0], a="paced", b=slow.name))
    bed = dataclasses.replace(base, name=f"quota{os.getpid()}", devices=devices, links=links)
    rows: list[dict[str, Any]] = []

    def measure(where: str, prefix: list[str], period: int | None) -> None:
        for gap in (0.0, GAP_S):
            wall, cpu = _time(prefix, args.model, args.runs, gap)
            rows.append(
                {"where": where, "period_us": period, "gap_s": gap, "wall_ms": wall, "cpu_ms": cpu}
            )

    measure(f"bare core {slow.cores[0]}", ["taskset", "-c", str(slow.cores[0])], None)
    emulate.up(bed, check=False)
    try:
        prefix = emulate.wrap_command(bed, slow.name, [])
        group = Path(prefix[prefix.index("--cgroup") + 1])
        for period in PERIODS_US:
            _set_period(group, period, quota)
            measure(f"quota {quota}", prefix, period)
        measure(f"pace {quota}", emulate.wrap_command(bed, "paced", []), None)
    finally:
        emulate.down(bed.name)
    print(f"{args.model}, blocks one after another, {args.runs} runs, median ms")
    head = f"{'where':<16}{'period us':>10}{'gap ms':>8}{'wall ms':>9}{'cpu ms':>8}{'x cpu':>7}"
    print(head)
    print("-" * len(head))
    for row in rows:
        shown = "-" if row["period_us"] is None else str(row["period_us"])
        ratio = row["wall_ms"] / row["cpu_ms"]
        print(
            f"{row['where']:<16}{shown:>10}{row['gap_s'] * 1e3:>8.0f}{row['wall_ms']:>9.1f}"
            f"{row['cpu_ms']:>8.1f}{ratio:>7.2f}"
        )
    print(f"the cost model assumes x cpu = {1 / quota:.2f} in the sandboxes (1.00 on a bare core)")
    out = ROOT / "bench" / "results" / "quota.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"model": args.model, "runs": args.runs, "quota": quota, "rows": rows}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
