"""A stage's start: how far a stage run after a rest lies above its blocks' summed profile times.

For each model (batch 1, one thread, CPU clock, this process's heap tuned as a worker's) the
profiler measures the blocks (``--repeats`` rounds spread over ``--spread`` seconds, as the demo
does), each block's time in the chain (``time_ms``) and as a stage's first block (``entry_ms``).
Then every tail stage ``[a:B]`` (what a second device runs after a cut at ``a``) and every
single-block stage ``[a:a+1]`` runs ``--runs`` times, each after a rest of ``--rest`` seconds on
a fresh copy of its input, as a stage in a pipeline starts when its input arrives, its block
modules one after another as a paced worker runs them (``pace.PacedBlocks``). Its median
CPU time is compared with two predictions: the summed ``time_ms`` of its blocks (the cost model
without ``stage_entry``) and that sum plus its first block's ``entry_ms - time_ms`` (with it).

The rest here differs from the profiler's (``ENTRY_REST_S``), so the check is not the
measurement it came from.

Run: ``taskset -c 1 .venv/bin/python bench/entry.py [--models resnet18,mobilenet_v2]
[--runs 15] [--rest 0.05]``; prints a table and writes ``bench/results/entry.json``.
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
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--rest", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--spread", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "entry.json"))
    args = parser.parse_args()

    rows = []
    for name in args.models.split(","):
        rows += _measure(name, args)
    print(
        f"{'model':14}{'stage':>9}{'measured':>10}{'Σ blocks':>10}{'err %':>8}"
        f"{'+ entry':>10}{'err %':>8}"
    )
    print("-" * 69)
    for row in rows:
        print(
            f"{row['model']:14}{row['stage']:>9}{row['measured_ms']:10.2f}{row['sum_ms']:10.2f}"
            f"{row['sum_err_pct']:8.1f}{row['entry_pred_ms']:10.2f}{row['entry_err_pct']:8.1f}"
        )
    print()
    summary = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        summary[model] = {
            "stages": len(mine),
            "sum_mape": statistics.mean(abs(r["sum_err_pct"]) for r in mine),
            "entry_mape": statistics.mean(abs(r["entry_err_pct"]) for r in mine),
            "sum_bias": statistics.mean(r["sum_err_pct"] for r in mine),
            "entry_bias": statistics.mean(r["entry_err_pct"] for r in mine),
        }
        s = summary[model]
        print(
            f"{model}: {s['stages']} stages, MAPE {s['sum_mape']:.1f} % without the start cost "
            f"(mean error {s['sum_bias']:+.1f} %), {s['entry_mape']:.1f} % with it "
            f"({s['entry_bias']:+.1f} %)"
        )
    doc = {
        "runs": args.runs,
        "rest_s": args.rest,
        "repeats": args.repeats,
        "spread_s": args.spread,
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _measure(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    import torch

    from optisplit.chain import load_chain
    from optisplit.profiler import profile_chain
    from optisplit.runtime.stage import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    chain = load_chain(name)
    profile = profile_chain(
        chain, device="bench", clock="cpu", repeats=args.repeats, spread_s=args.spread
    )
    n = chain.n_blocks
    times = [b.time_ms for b in profile.blocks]
    with torch.inference_mode():
        inputs = [tuple(t.clone() for t in chain.example_inputs)]
        for i in range(n - 1):
            out = chain.stage_module(i, i + 1)(*inputs[-1])
            inputs.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
        stages = sorted({(a, n) for a in range(1, n)} | {(a, a + 1) for a in range(1, n - 1)})
        rows = []
        for a, b in stages:
            blocks = [chain.stage_module(i, i + 1) for i in range(a, b)]
            samples = []
            for _ in range(args.runs):
                time.sleep(args.rest)
                fresh = tuple(t.clone() for t in inputs[a])
                start = time.thread_time_ns()
                out = fresh
                for block in blocks:  # one after another, as a paced worker runs a stage
                    out = block(*out)
                    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                samples.append((time.thread_time_ns() - start) / 1e6)
            measured = statistics.median(samples)
            total = sum(times[a:b])
            with_entry = total + profile.blocks[a].entry_cost_ms
            rows.append(
                {
                    "model": name,
                    "stage": f"[{a}:{b}]",
                    "measured_ms": measured,
                    "sum_ms": total,
                    "entry_pred_ms": with_entry,
                    "sum_err_pct": 100 * (total / measured - 1),
                    "entry_err_pct": 100 * (with_entry / measured - 1),
                }
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
