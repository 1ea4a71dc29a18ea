"""Does a stage compute slower while requests stream because the delay forwarder shares its core?

On an emulated testbed the userspace delay forwarder moves every packet between devices. It runs
at real-time priority (so that delays stay exact) on the testbed's helper core, the one the
devices leave the most room on, and wakes for every packet it reads and every one it delivers:
on a LAN link, dozens of times per request, each time taking the core from whatever computes
there. This script deploys ``--plan`` and measures it with the forwarder on its own core and then
moved to each other core of the host, in rounds that take turns (this host's speed wanders by
several per cent over seconds). Per placement it prints each stage's compute with one request in
flight (``alone``) and while requests stream (``stream``), their ratio, and the plan's
throughput. A stage that streams slower only where the forwarder runs computes slower because
of it; the forwarder's placement is put back afterwards.

Run with the testbed up under ``lan`` (``optisplit testbed up local3 --condition lan``):
``.venv/bin/python bench/forwarder_core.py [--testbed local3] [--model resnet18]
[--plan 'fast[0:10] -> slow1[10:15]'] [--backend socket] [--rounds 3]``; prints a table and
writes ``bench/results/forwarder_core.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="local3")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--plan", default="fast[0:10] -> slow1[10:15]")
    parser.add_argument("--backend", default="socket", choices=("socket", "rpc"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "forwarder_core.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        print(f"--rounds: expected at least 1, got {args.rounds}")
        return 2

    from bench.wakeups import measure_plan
    from optisplit import emulate
    from optisplit.emulate.state import read_state
    from optisplit.errors import OptisplitError
    from optisplit.plan import Plan
    from optisplit.testbed import load_testbed

    try:
        testbed = load_testbed(args.testbed)
        Plan.parse(args.plan)
    except OptisplitError as exc:
        print(f"optisplit: error: {exc}")
        return 2
    state = read_state(testbed.name)
    if not emulate.is_up(testbed) or state is None or state.forwarder_pid is None:
        print(f"testbed {testbed.name} is not up: optisplit testbed up {testbed.name}")
        return 2
    pid = state.forwarder_pid
    home = os.sched_getaffinity(pid)
    cores = sorted(testbed.host_cores or os.sched_getaffinity(0))
    placements = [tuple(sorted(home))] + [(c,) for c in cores if {c} != home]
    runs: dict[tuple[int, ...], list[dict[str, Any]]] = {p: [] for p in placements}
    try:
        for _ in range(args.rounds):  # the placements take turns
            for placement in placements:
                os.sched_setaffinity(pid, set(placement))
                measured = measure_plan(testbed, args.backend, args.model, args.plan, window_s=3.0)
                runs[placement].append(measured)
    except OptisplitError as exc:
        print(f"optisplit: error: {exc}")
        return 1
    finally:
        os.sched_setaffinity(pid, home)

    rows = []
    for placement in placements:
        parts = runs[placement]
        stages = []
        for j, stage in enumerate(parts[0]["stages"]):
            alone = statistics.median(p["stages"][j]["compute_ms"] for p in parts)
            stream = statistics.median(p["stages"][j]["streaming_compute_ms"] for p in parts)
            ratios = [
                p["stages"][j]["streaming_compute_ms"] / p["stages"][j]["compute_ms"]
                for p in parts
            ]
            stages.append(
                {
                    "device": stage["device"],
                    "start": stage["start"],
                    "end": stage["end"],
                    "cores": list(testbed.devices[stage["device"]].cores or ()),
                    "alone_ms": alone,
                    "stream_ms": stream,
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                }
            )
        rows.append(
            {
                "forwarder_cores": list(placement),
                "home": set(placement) == home,
                "throughput_rps": statistics.median(p["throughput_rps"] for p in parts),
                "latency_ms": statistics.median(p["latency_ms"] for p in parts),
                "stages": stages,
            }
        )
    head = f"{'forwarder on':14}{'stage':24}{'cores':>7}{'alone ms':>10}{'stream ms':>11}"
    head += f"{'ratio':>8}{'  (rounds)':20}{'req/s':>8}"
    print(f"{args.model} {args.plan} on {testbed.name}, {args.backend}, {args.rounds} rounds")
    print(head)
    print("-" * len(head))
    for row in rows:
        where = ",".join(map(str, row["forwarder_cores"])) + (" (home)" if row["home"] else "")
        for j, s in enumerate(row["stages"]):
            stage = f"{s['device']}[{s['start']}:{s['end']}]"
            rounds = " ".join(f"{r:.2f}" for r in s["ratios"])
            rate = f"{row['throughput_rps']:8.1f}" if j == 0 else ""
            print(
                f"{where if j == 0 else '':14}{stage:24}{','.join(map(str, s['cores'])):>7}"
                f"{s['alone_ms']:10.2f}{s['stream_ms']:11.2f}{s['ratio']:8.3f}  {rounds:18}{rate}"
            )
    doc = {
        "testbed": testbed.name,
        "model": args.model,
        "plan": args.plan,
        "backend": args.backend,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
