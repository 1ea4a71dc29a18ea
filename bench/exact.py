"""Benchmark of the exact front: the paper's models on pi-pi-gpu, edge8 at fine granularity, growth.

Run: ``.venv/bin/python bench/exact.py``. Prints three tables and writes
``bench/results/exact.json``. Targets (issue 3): each of the six paper models (coarse) on
``pi-pi-gpu`` in <= 1 s; the 8-device testbed at fine granularity in <= 60 s.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import synthetic_profile  # noqa: E402

from optisplit.cli._common import print_table  # noqa: E402
from optisplit.cost import CostModel, load_cost_model  # noqa: E402
from optisplit.profile import profile_path  # noqa: E402
from optisplit.search.exact import ExactEngine  # noqa: E402
from optisplit.testbed import Device, Link, Testbed, apply_condition, load_testbed  # noqa: E402

MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "inception_v3")
CONDITIONS = (None, "wifi", "constrained")
FINE_BLOCKS = {"resnet18": 69, "resnet50": 175, "mobilenet_v2": 153, "inception_v3": 314}
PROFILES = ROOT / "profiles"


def _timed(model: CostModel) -> dict[str, Any]:
    start = time.perf_counter()
    result = ExactEngine().run(model)
    seconds = time.perf_counter() - start
    return {
        "blocks": model.n_blocks,
        "seconds": seconds,
        "front": len(result.front),
        "evaluations": result.evaluations,
        "plans": [str(e.plan) for e in result.front],
    }


def _has_profile(model: str, batch: int, granularity: str) -> bool:
    return profile_path(PROFILES, "host", model, batch, granularity).is_file()


def paper_models() -> list[dict[str, Any]]:
    rows = []
    for condition in CONDITIONS:
        testbed = load_testbed("pi-pi-gpu", root=PROFILES)
        if condition:
            testbed = apply_condition(testbed, condition)
        for name in MODELS:
            for batch in (1, 8):
                if not _has_profile(name, batch, "coarse"):
                    continue
                model = load_cost_model(
                    name, testbed, batch_size=batch, profiles_root=str(PROFILES)
                )
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "condition": condition or "as shipped",
                        **_timed(model),
                    }
                )
    return rows


def edge8_fine() -> list[dict[str, Any]]:
    """Measured fine profiles where they exist, else a synthetic chain of the same length."""
    rows = []
    for name, blocks in FINE_BLOCKS.items():
        for condition in CONDITIONS:
            testbed = load_testbed("edge8", root=PROFILES)
            if condition:
                testbed = apply_condition(testbed, condition)
            if _has_profile(name, 1, "fine"):
                model = load_cost_model(
                    name, testbed, granularity="fine", profiles_root=str(PROFILES)
                )
                source = "measured"
            else:
                profile = synthetic_profile(blocks, model=name, granularity="fine", seed=blocks)
                model = CostModel(testbed, dict.fromkeys(testbed.devices, profile))
                source = "synthetic"
            rows.append(
                {
                    "model": name,
                    "profile": source,
                    "condition": condition or "as shipped",
                    **_timed(model),
                }
            )
    return rows


def _network(n: int, switches: int) -> Testbed:
    """n mixed devices spread over a chain of switches (trunks shared by several transfers)."""
    scales = (8.0, 8.0, 0.5, 0.05, 8.0, 0.3, 0.5, 8.0)
    names = [f"sw{i}" for i in range(switches)]
    devices = {f"d{i}": Device(f"d{i}", "host", scale=scales[i]) for i in range(n)}
    links = [Link(f"d{i}", names[i % switches], 0.2, 1000.0) for i in range(n)]
    links += [Link(a, b, 0.5, 1000.0) for a, b in itertools.pairwise(names)]
    return Testbed(f"net{n}", devices, tuple(links), "d0", "d0", tuple(names))


def growth() -> list[dict[str, Any]]:
    """Synthetic chains (random block times and cut sizes) on n mixed devices: one switch (a
    star), or two switches whose trunk carries several transfers of a plan (open labels)."""
    cases = [(n, 1, b) for n in (2, 4, 6, 8) for b in (25, 50, 100, 200)]
    cases += [(n, 2, b) for n in (4, 8) for b in (25, 50)]
    rows = []
    for n, switches, blocks in cases:
        testbed = _network(n, switches)
        profile = synthetic_profile(blocks, seed=7)
        model = CostModel(testbed, dict.fromkeys(testbed.devices, profile))
        rows.append({"devices": n, "switches": switches, **_timed(model)})
    return rows


def main() -> None:
    results = {"paper_models": paper_models(), "edge8_fine": edge8_fine(), "growth": growth()}
    print_table(
        ["model", "batch", "condition", "blocks", "seconds", "front", "evaluations"],
        [
            [
                r["model"],
                r["batch"],
                r["condition"],
                r["blocks"],
                r["seconds"],
                r["front"],
                r["evaluations"],
            ]
            for r in results["paper_models"]
        ],
        title="exact front, pi-pi-gpu, coarse (target <= 1 s)",
    )
    print_table(
        ["model", "profile", "condition", "blocks", "seconds", "front", "evaluations"],
        [
            [
                r["model"],
                r["profile"],
                r["condition"],
                r["blocks"],
                r["seconds"],
                r["front"],
                r["evaluations"],
            ]
            for r in results["edge8_fine"]
        ],
        title="exact front, edge8, fine (target <= 60 s)",
    )
    print_table(
        ["devices", "switches", "blocks", "seconds", "front", "evaluations"],
        [
            [r["devices"], r["switches"], r["blocks"], r["seconds"], r["front"], r["evaluations"]]
            for r in results["growth"]
        ],
        title="growth with devices and cuts (synthetic chains; 2 switches: shared trunk)",
    )
    out = ROOT / "bench" / "results" / "exact.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
