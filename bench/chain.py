"""Benchmark: trace and verify every torchvision model at coarse granularity, and the six paper
models at coarse and fine granularity. Prints a table; writes bench/results/chain.json.

Paper models are verified cut by cut (``halves``: both halves of every cut stitched together);
the every-model sweep by default runs all single-block stages in sequence (``blocks``: one
forward pass, equivalent for every cut), which keeps the sweep of 80 models affordable.

Usage: .venv/bin/python bench/chain.py [--models NAME ...] [--skip-all] [--skip-paper]
                                       [--all-mode halves|blocks]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This folder holds profile.py, which would shadow the standard library's profile module.
sys.path[0] = str(ROOT)

PAPER = ["alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "inception_v3"]
RESULTS = ROOT / "bench" / "results" / "chain.json"


def run_one(model: str, granularity: str, mode: str = "halves") -> dict[str, Any]:
    from optisplit.chain import load_chain
    from optisplit.errors import OptisplitError

    start = time.perf_counter()
    row: dict[str, Any] = {"model": model, "granularity": granularity, "mode": mode}
    try:
        chain = load_chain(model, granularity=granularity)
        row["trace_s"] = time.perf_counter() - start
        row["blocks"] = chain.n_blocks
        row["max_tensors_per_cut"] = max((len(c.tensors) for c in chain.cuts), default=0)
        result = chain.verify(mode=mode)
        row.update(verified=result.ok, max_abs_diff=result.max_abs_diff)
    except OptisplitError as exc:
        row.update(verified=False, error=str(exc))
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> int:
    import torch

    from optisplit.zoo import list_models

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=None, help="subset for the coarse sweep")
    parser.add_argument("--skip-all", action="store_true", help="skip the every-model sweep")
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper models")
    parser.add_argument(
        "--all-mode",
        choices=("halves", "blocks"),
        default="blocks",
        help="verification of the every-model sweep (paper models always use halves)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"torch": torch.__version__, "threads": 1}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_paper:
        report["paper"] = [run_one(m, g) for m in PAPER for g in ("coarse", "fine")]
        _save(report)
        _table("paper models", report["paper"])
    if not args.skip_all:
        rows: list[dict[str, Any]] = []
        report["all"] = rows
        start = time.perf_counter()
        for model in args.models or list_models():
            rows.append(run_one(model, "coarse", args.all_mode))
            print(_line(rows[-1]), flush=True)
            report["all_seconds"] = time.perf_counter() - start
            _save(report)
        ok = sum(1 for r in rows if r.get("verified"))
        report["all_verified"] = f"{ok}/{len(rows)}"
        report["all_mode"] = args.all_mode
        _save(report)
        _table("every model, coarse", rows)
        seconds = report["all_seconds"]
        print(f"verified ({args.all_mode}) {ok} of {len(rows)} models in {seconds:.0f} s")
    return 0


def _save(report: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


def _line(row: dict[str, Any]) -> str:
    diff = row.get("max_abs_diff")
    return (
        f"{row['model']:<22} {row['granularity']:<7} {row.get('blocks', '-'):>5} "
        f"{row.get('max_tensors_per_cut', '-'):>4} {row.get('verified')!s:<6} "
        f"{'-' if diff is None else f'{diff:.2g}':>8} {row['seconds']:8.1f}  {row.get('error', '')}"
    )


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(
        f"{'model':<22} {'gran.':<7} {'blocks':>5} {'tens':>4} {'ok':<6} {'maxdiff':>8} {'seconds':>8}"
    )
    for row in rows:
        print(_line(row))


if __name__ == "__main__":
    sys.exit(main())
