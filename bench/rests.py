"""What a rest before a run does to its CPU time: the profiler's choices for spread and paced runs.

For each model (batch 1, one thread, CPU clock, this process's heap tuned as a worker's), rounds
of ``--rounds``, each after a rest of ``--rest`` seconds, measure:

- ``blocks``: the blocks one after another, clock read between them (what a profile sums);
- ``whole warm``: the whole model right after them (the profiler's old order);
- ``whole rested``: the whole model after a rest of its own (the profiler's order with
  ``--spread``);
- ``paced blocks``: the blocks paced at ``--pace``, each followed by its rest, on the CPU clock
  (what a CPU-clock profile of a paced device measured before it ran unpaced).

A stage in a pipeline starts after a rest (its device waits for its input), and a paced worker
rests after every block; compare with the stages' compute in ``bench/fidelity.py``'s results.

Run: ``taskset -c 1 .venv/bin/python bench/rests.py [--models mobilenet_v2,resnet18]
[--rounds 30] [--rest 0.25] [--pace 0.5]``; prints a table and writes ``bench/results/rests.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rest", type=float, default=0.25)
    parser.add_argument("--pace", type=float, default=0.5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rests.json"))
    args = parser.parse_args()

    rows = [{"model": name, **_measure(name, args)} for name in args.models.split(",")]
    keys = [k for k in rows[0] if k != "model"]
    head = f"{'model':14}" + "".join(f"{k[:-3]:>16}" for k in keys)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['model']:14}" + "".join(f"{row[k]:16.2f}" for k in keys))
    doc = {"rounds": args.rounds, "rest_s": args.rest, "pace": args.pace, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Median CPU milliseconds of each kind of run of model ``name``."""
    import torch

    from optisplit.chain import load_chain
    from optisplit.pace import Pacer
    from optisplit.runtime.stage import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    chain = load_chain(name)
    blocks = [chain.stage_module(i, i + 1) for i in range(chain.n_blocks)]
    pacer = Pacer(args.pace)

    def whole() -> float:
        start = time.thread_time()
        chain.model(*chain.example_inputs)
        return (time.thread_time() - start) * 1e3

    def sequence(paced: bool) -> float:
        total = 0.0
        out: tuple[torch.Tensor, ...] = tuple(t.clone() for t in chain.example_inputs)
        for block in blocks:
            start = time.thread_time()
            out = pacer.run(block, *out) if paced else block(*out)
            total += (time.thread_time() - start) * 1e3
        return total

    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for round_ in range(args.rounds + 2):  # two warm-up rounds
            time.sleep(args.rest)
            sample = {"blocks": sequence(False), "whole warm": whole()}
            time.sleep(args.rest)
            sample["whole rested"] = whole()
            time.sleep(args.rest)
            sample["paced blocks"] = sequence(True)
            if round_ >= 2:
                for key, value in sample.items():
                    times.setdefault(key, []).append(value)
    return {f"{k} ms": round(statistics.median(v), 3) for k, v in times.items()}


if __name__ == "__main__":
    sys.exit(main())
