"""Search quality: each engine's front against the exact front, per model, testbed and condition.

For every instance (the six paper models x pi-pi, pi-gpu, pi-pi-gpu, edge8 x lan, wifi,
constrained; host profiles, coarse, batch 1) it runs the exact engine and the nsga2 and optuna
engines with their default budgets (seed 0), and reports per engine the evaluations, seconds and
hypervolume ratio to the exact front, all on one reference point per instance (the union of the
fronts; see ``optisplit.pareto``). Seconds are wall-clock; CPU seconds (this process) are given
too, as they stay meaningful on a shared, busy machine. Prints a table and a summary line; writes
``bench/results/search_quality.json``.

    .venv/bin/python bench/search_quality.py [--models a,b] [--testbeds x,y] [--conditions lan]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optisplit.cost import load_cost_model  # noqa: E402
from optisplit.pareto import hypervolume, reference_point  # noqa: E402
from optisplit.search import get_engine  # noqa: E402
from optisplit.testbed import apply_condition, load_testbed  # noqa: E402

MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "inception_v3")
TESTBEDS = ("pi-pi", "pi-gpu", "pi-pi-gpu", "edge8")
CONDITIONS = ("lan", "wifi", "constrained")
ENGINES = ("nsga2", "optuna")


def _instance(model: str, testbed: str, condition: str, seed: int) -> dict[str, object]:
    bed = apply_condition(load_testbed(testbed, root=str(ROOT / "profiles")), condition)
    cost = load_cost_model(model, bed, profiles_root=str(ROOT / "profiles"))
    exact = get_engine("exact")().run(cost)
    results, cpu = {}, {}
    for name in ENGINES:
        started = time.process_time()
        results[name] = get_engine(name)().run(cost, seed=seed)
        cpu[name] = time.process_time() - started
    reference = reference_point([exact.front, *(r.front for r in results.values())])
    exact_hv = hypervolume(exact.front, reference)
    row: dict[str, object] = {
        "model": model,
        "testbed": testbed,
        "condition": condition,
        "blocks": cost.n_blocks,
        "exact": {"front": len(exact.front), "seconds": exact.seconds, "hypervolume": exact_hv},
        "reference_point": reference,
    }
    for name, result in results.items():
        hv = hypervolume(result.front, reference)
        row[name] = {
            "evaluations": result.evaluations,
            "seconds": result.seconds,
            "cpu_seconds": cpu[name],
            "front": len(result.front),
            "hypervolume": hv,
            "ratio": hv / exact_hv if exact_hv > 0 else 1.0,
        }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--testbeds", default=",".join(TESTBEDS))
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    started = time.perf_counter()
    for model in args.models.split(","):
        for testbed in args.testbeds.split(","):
            for condition in args.conditions.split(","):
                row = _instance(model, testbed, condition, args.seed)
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
    _table(rows)
    summary = _summary(rows, time.perf_counter() - started)
    print(summary["line"])
    out = ROOT / "bench" / "results" / "search_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "instances": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def _line(row: dict[str, object]) -> str:
    parts = [f"{row['model']} {row['testbed']} {row['condition']}"]
    for name in ENGINES:
        r = row[name]
        assert isinstance(r, dict)
        parts.append(
            f"{name} {r['ratio']:.4f} in {r['seconds']:.2f}s ({r['cpu_seconds']:.2f}s CPU)"
        )
    return " | ".join(parts)


def _table(rows: list[dict[str, object]]) -> None:
    columns = ["model", "testbed", "condition", "B", "exact pts", "exact s"]
    for name in ENGINES:
        columns += [f"{name} evals", f"{name} s", f"{name} CPU s", f"{name} HV ratio"]
    table = []
    for row in rows:
        exact = row["exact"]
        assert isinstance(exact, dict)
        cells: list[object] = [
            row["model"],
            row["testbed"],
            row["condition"],
            row["blocks"],
            exact["front"],
            round(exact["seconds"], 3),
        ]
        for name in ENGINES:
            r = row[name]
            assert isinstance(r, dict)
            cells += [
                r["evaluations"],
                round(r["seconds"], 2),
                round(r["cpu_seconds"], 2),
                round(r["ratio"], 4),
            ]
        table.append(cells)
    widths = [max(len(str(c)), *(len(str(r[i])) for r in table)) for i, c in enumerate(columns)]
    print("search quality against the exact front")
    lines: list[list[object]] = [list(columns), *table]
    for line in lines:
        print("  ".join(str(v).rjust(w) for v, w in zip(line, widths)))


def _summary(rows: list[dict[str, object]], seconds: float) -> dict[str, object]:
    summary: dict[str, object] = {"instances": len(rows), "seconds": round(seconds, 1)}
    parts = [f"{len(rows)} instances"]
    for name in ENGINES:
        ratios = [r[name]["ratio"] for r in rows]  # type: ignore[index]
        times = [r[name]["seconds"] for r in rows]  # type: ignore[index]
        cpu = [r[name]["cpu_seconds"] for r in rows]  # type: ignore[index]
        passed = sum(1 for r in ratios if r >= 0.99)
        summary[name] = {
            "min_ratio": min(ratios),
            "mean_ratio": statistics.fmean(ratios),
            "instances_at_99pct": passed,
            "max_seconds": max(times),
            "mean_seconds": statistics.fmean(times),
            "max_cpu_seconds": max(cpu),
            "under_10s": sum(1 for t in times if t <= 10.0),
        }
        parts.append(
            f"{name}: min HV ratio {min(ratios):.4f}, {passed}/{len(rows)} >= 0.99, "
            f"max {max(times):.2f} s wall ({max(cpu):.2f} s CPU), "
            f"{sum(1 for t in times if t <= 10.0)}/{len(rows)} <= 10 s"
        )
    summary["line"] = "; ".join(parts)
    return summary


if __name__ == "__main__":
    sys.exit(main())
