"""Does a stage compute slower while the host's other core works? A stage looped alone and beside
another stage looping on the other core.

On a single-host emulated testbed every device shares the host's last-level cache and memory
bus. In a streaming pipeline the devices compute at the same time; one request at a time they do
not. This script loops one stage (``--victims``, ``model:start:end``) on ``--victim-core``,
resting ``--rest-ms`` after each pass as a paced device rests, and reads its median CPU time per
pass: alone, and while each of ``--neighbours`` loops without rest on ``--neighbour-core``. Both
run as the workers run: one thread, the worker's allocator settings, ``inference_mode``. The
measurements take turns over ``--rounds`` (this host's speed wanders by several per cent over
seconds); per round, the ratio of each neighbour's figure to the alone figure of that round.

``.venv/bin/python bench/corun.py [--victims mobilenet_v2:0:6,resnet18:0:4]
[--neighbours mobilenet_v2:6:23,resnet18:4:15] [--rounds 3] [--seconds 6]``; prints a table and
writes ``bench/results/corun.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Loops blocks [start, end) of a model on one core; with a rest >= 0 it prints the median CPU
# ms per pass after ``seconds``, with a rest < 0 it loops without rest until killed.
_LOOP = """
import os, statistics, sys, time, torch
torch.set_num_threads(1)
from optisplit.chain import load_chain
from optisplit.runtime.stage import tune_allocator
tune_allocator()
model, start, end, core = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seconds, rest = float(sys.argv[5]), float(sys.argv[6]) / 1e3
os.sched_setaffinity(0, {core})
chain = load_chain(model)
with torch.inference_mode():
    x = (torch.randn(chain.input_shape),)
    inputs = chain.stage_module(0, start)(*x) if start else x
    stage = chain.stage_module(start, end)
    for _ in range(5):
        stage(*inputs)
    print("ready", flush=True)
    times, stop = [], time.monotonic() + seconds
    while rest < 0 or time.monotonic() < stop:
        cpu = time.thread_time_ns()
        stage(*inputs)
        times.append((time.thread_time_ns() - cpu) / 1e6)
        if rest > 0:
            time.sleep(rest)
print(f"{statistics.median(times):.4f} {len(times)}", flush=True)
"""


def _spec(text: str) -> tuple[str, int, int]:
    try:
        model, start, end = text.split(":")
        return model, int(start), int(end)
    except ValueError:
        raise SystemExit(f"expected model:start:end, got {text!r}") from None


def _loop(spec: tuple[str, int, int], core: int, seconds: float, rest_ms: float) -> Any:
    model, start, end = spec
    argv = [model, *(str(v) for v in (start, end, core, seconds, rest_ms))]
    return subprocess.Popen(
        [sys.executable, "-c", _LOOP, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _failed(spec: tuple[str, int, int], stderr: str) -> SystemExit:
    """The loop's own last line of error (an unknown model, a block range out of range)."""
    lines = stderr.strip().splitlines() or ["no output"]
    return SystemExit("{}[{}:{}]: ".format(*spec) + lines[-1])


def _victim(spec: tuple[str, int, int], args: argparse.Namespace) -> float:
    proc = _loop(spec, args.victim_core, args.seconds, args.rest_ms)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise _failed(spec, err)
    return float(out.split()[-2])


def _beside(
    spec: tuple[str, int, int], neighbour: tuple[str, int, int], args: argparse.Namespace
) -> float:
    other = _loop(neighbour, args.neighbour_core, 0.0, -1.0)
    try:
        assert other.stdout is not None
        if other.stdout.readline().strip() != "ready":
            other.wait()
            raise _failed(neighbour, other.stderr.read() if other.stderr else "")
        time.sleep(1.0)
        return _victim(spec, args)
    finally:
        other.kill()
        other.communicate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", default="mobilenet_v2:0:6,resnet18:0:4")
    parser.add_argument("--neighbours", default="mobilenet_v2:6:23,resnet18:4:15")
    parser.add_argument("--victim-core", type=int, default=1)
    parser.add_argument("--neighbour-core", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rest-ms", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "corun.json"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or args.victim_core == args.neighbour_core:
        print("needs two cores: --victim-core and --neighbour-core must differ")
        return 2
    victims = [_spec(v) for v in args.victims.split(",")]
    neighbours = [_spec(n) for n in args.neighbours.split(",")]
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for victim in victims:
            name = "{}[{}:{}]".format(*victim)
            row = runs.setdefault(name, {})
            row.setdefault("alone", []).append(_victim(victim, args))
            for neighbour in neighbours:
                beside = "{}[{}:{}]".format(*neighbour)
                row.setdefault(beside, []).append(_beside(victim, neighbour, args))
    rows = []
    print(f"{'stage':22}{'beside':24}{'cpu ms':>9}{'x alone':>9}  rounds")
    for name, figures in runs.items():
        alone = figures["alone"]
        for beside, ms in figures.items():
            ratios = [m / a for m, a in zip(ms, alone, strict=True)]
            row = {
                "stage": name,
                "beside": beside,
                "cpu_ms": statistics.median(ms),
                "ratio": statistics.median(ratios),
                "runs": ms,
            }
            rows.append(row)
            each = " ".join(f"{m:.2f}" for m in ms)
            print(f"{name:22}{beside:24}{row['cpu_ms']:9.2f}{row['ratio']:9.3f}  {each}")
    doc = {"rounds": args.rounds, "seconds": args.seconds, "rest_ms": args.rest_ms, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
