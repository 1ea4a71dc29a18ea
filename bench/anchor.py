"""Does anchored pacing hold an emulated device's speed while the shared host's cores drift?

Inside each device's sandbox of an emulated testbed (up, or brought up for the run and taken
down after), one model's blocks run as a paced stage, back to back for ``--seconds``, taking
turns between a plain pacer (``s`` of the core as it is now) and an anchored one (``s`` of the
core as it was when the testbed came up, :mod:`optisplit.pace`). Per device and pacer it prints
the stage's median wall time, its spread over 1-s windows (coefficient of variation of the
window medians) and the range of its 5-s window medians, beside the same figures for the
stage's CPU time, which is what the host's drift does to the work itself. A device that keeps
its speed has a flat wall time while its CPU time wanders.

Run as root: ``.venv/bin/python bench/anchor.py [--testbed local] [--model mobilenet_v2]
[--seconds 60]``; writes ``bench/results/anchor.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

# Prints one JSON list of [t_s, mode, wall_ms, cpu_ms] rows.
_INNER = """
import json, sys, time, torch
torch.set_num_threads(1)
from optisplit.chain import load_chain
from optisplit.pace import PacedBlocks, Pacer, SpeedReference, pace_from_env
from optisplit.runtime.stage import tune_allocator
tune_allocator()
name, seconds = sys.argv[1], float(sys.argv[2])
chain = load_chain(name)
speed = pace_from_env()
reference = SpeedReference.from_env()
if speed is None or reference is None:
    sys.exit("not an anchored paced device (OPTISPLIT_PACE / OPTISPLIT_PACE_ANCHOR unset)")
stages = {
    mode: PacedBlocks([chain.stage_module(i, i + 1) for i in range(chain.n_blocks)], pacer)
    for mode, pacer in (("plain", Pacer(speed)), ("anchored", Pacer(speed, reference)))
}
x = chain.example_inputs
rows = []
with torch.inference_mode():
    for stage in stages.values():
        for _ in range(5):
            stage(*x)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for mode, stage in stages.items():
            t, used = time.perf_counter(), time.thread_time()
            stage(*x)
            wall = (time.perf_counter() - t) * 1e3
            rows.append([time.monotonic() - start, mode, wall, (time.thread_time() - used) * 1e3])
print(json.dumps(rows))
"""


def _windows(rows: list[list[Any]], column: int, window_s: float) -> list[float]:
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(int(row[0] // window_s), []).append(row[column])
    return [statistics.median(v) for k, v in sorted(groups.items()) if len(v) >= 3]


def _spread(values: list[float]) -> float:
    return 100 * statistics.pstdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0


def summarise(rows: list[list[Any]]) -> dict[str, dict[str, float]]:
    """Per pacer: median wall and CPU ms, 1-s window spread (%), 5-s window max/min."""
    out = {}
    for mode in ("plain", "anchored"):
        mine = [r for r in rows if r[1] == mode]
        figures: dict[str, float] = {"runs": len(mine)}
        for column, what in ((2, "wall"), (3, "cpu")):
            figures[f"{what}_ms"] = statistics.median(r[column] for r in mine)
            figures[f"{what}_cv_1s_pct"] = _spread(_windows(mine, column, 1.0))
            five = _windows(mine, column, 5.0)
            figures[f"{what}_range_5s"] = max(five) / min(five) if five else 1.0
        out[mode] = figures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="local")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    from optisplit import emulate
    from optisplit.testbed import load_testbed

    bed = load_testbed(args.testbed, root=str(ROOT / "profiles"))
    paced = sorted(name for name, d in bed.devices.items() if d.pace is not None)
    if not paced:
        print(f"testbed {bed.name} has no paced device", file=sys.stderr)
        return 2
    was_up = emulate.is_up(bed)
    emulate.up(bed, check=False)
    try:
        procs = {
            name: subprocess.Popen(
                emulate.wrap_command(
                    bed,
                    name,
                    [sys.executable, "-c", _INNER, args.model, str(args.seconds)],
                ),
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for name in paced
        }
        results = {}
        for name, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode != 0:
                print(f"{name}: the stage failed", file=sys.stderr)
                return 1
            results[name] = summarise(json.loads(out))
    finally:
        if not was_up:
            emulate.down(bed.name)
    head = ("device", "pacer", "runs", "wall ms", "1-s cv%", "5-s max/min")
    head += ("cpu ms", "1-s cv%", "5-s max/min")
    print(f"{args.model} on {bed.name}, {args.seconds:.0f} s, the pacers taking turns")
    print("".join(f"{h:>12}" for h in head))
    for name, modes in results.items():
        for mode, f in modes.items():
            cells = (name, mode, f"{f['runs']:.0f}", f"{f['wall_ms']:.2f}")
            cells += (f"{f['wall_cv_1s_pct']:.1f}", f"{f['wall_range_5s']:.2f}")
            cells += (f"{f['cpu_ms']:.2f}", f"{f['cpu_cv_1s_pct']:.1f}")
            cells += (f"{f['cpu_range_5s']:.2f}",)
            print("".join(f"{c:>12}" for c in cells))
    out = ROOT / "bench" / "results" / "anchor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"testbed": bed.name, "model": args.model, "seconds": args.seconds}
    out.write_text(json.dumps({**document, "devices": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
