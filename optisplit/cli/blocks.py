"""``optisplit blocks``: trace models into blocks and cut points, and verify every cut."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from optisplit.cli._common import add_json_flag, positive_int, print_json, print_table, progress
from optisplit.errors import OptisplitError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "blocks",
        help="trace models into blocks and cut points (and verify every cut)",
        description=(
            "Trace each model into a chain of blocks. Cut c separates blocks < c from blocks "
            ">= c and is named after the first module after it; each cut lists the tensors "
            "crossing it with their bytes at the batch size. --verify runs both halves of every "
            "cut stitched together against the whole model (relative tolerance 1e-5). 'all' "
            "means every zoo model. With --json: one object for one model, a list for several."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="zoo model names, or 'all'")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="default: 1")
    parser.add_argument(
        "--granularity", choices=("coarse", "fine"), default="coarse", help="default: coarse"
    )
    parser.add_argument("--verify", action="store_true", help="verify every cut")
    parser.add_argument(
        "--module", default=None, metavar="PKG.MOD:FACTORY", help="build a user model instead"
    )
    parser.add_argument("--weights", default=None, help="local state-dict file (default: seeded)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _model_names(args: argparse.Namespace) -> list[str]:
    from optisplit.zoo import list_models

    names: list[str] = []
    for name in args.models:
        names.extend(list_models() if name == "all" and args.module is None else [name])
    if args.module is None:
        from optisplit.zoo import input_size

        for name in names:
            input_size(name)  # raises ModelError with close matches before any work
    return list(dict.fromkeys(names))


def _describe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from optisplit.chain import load_chain

    chain = load_chain(
        name,
        batch_size=args.batch_size,
        granularity=args.granularity,
        module=args.module,
        weights=args.weights,
        seed=args.seed,
    )
    doc = chain.describe()
    if args.verify:
        result = chain.verify()
        doc["verified"] = result.ok
        doc["max_abs_diff"] = result.max_abs_diff
        if not result.ok:
            cuts = ", ".join(str(c) for c in result.failed_cuts)
            doc["error"] = f"cuts {cuts} differ from the whole model beyond 1e-5 relative"
    return doc


def run(args: argparse.Namespace) -> int:
    names = _model_names(args)
    docs: list[dict[str, Any]] = []
    with progress("tracing", len(names), enabled=len(names) > 1) as bar:
        for name in names:
            bar.describe(f"tracing {name}")
            try:
                docs.append(_describe(name, args))
            except OptisplitError as exc:
                if len(names) == 1:
                    raise
                docs.append({"model": name, "verified": False, "error": str(exc)})
            bar.advance()
    if args.json:
        print_json(docs[0] if len(docs) == 1 else docs)
    elif len(docs) == 1:
        _print_chain(docs[0])
    else:
        _print_summary(docs)
    failed = [d for d in docs if "error" in d]
    for doc in failed:
        print(f"optisplit: error: {doc['model']}: {doc['error']}", file=sys.stderr)
    return 1 if failed else 0


def _print_chain(doc: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for block in doc["blocks"]:
        index = block["index"]
        cut = doc["cuts"][index] if index < len(doc["cuts"]) else None
        after = cut["bytes"] if cut else doc["output_bytes"]
        tensors = len(cut["tensors"]) if cut else 1
        rows.append([index, block["name"], block["param_bytes"], after, tensors])
    title = (
        f"{doc['model']} ({doc['granularity']}, batch {doc['batch_size']}): "
        f"{len(doc['blocks'])} blocks, input {doc['input_bytes']} B"
    )
    print_table(
        ["block", "name", "param bytes", "bytes after", "tensors after"], rows, title=title
    )
    if doc["verified"] is not None:
        state = "all cuts verified" if doc["verified"] else "VERIFICATION FAILED"
        print(f"{state}; max abs diff {doc['max_abs_diff']:.3g}")


def _print_summary(docs: list[dict[str, Any]]) -> None:
    rows = [
        [
            d["model"],
            len(d.get("blocks", [])),
            d.get("input_bytes", ""),
            "" if d.get("verified") is None else ("yes" if d["verified"] else "NO"),
            "" if d.get("max_abs_diff") is None else f"{d['max_abs_diff']:.3g}",
        ]
        for d in docs
    ]
    print_table(["model", "blocks", "input bytes", "verified", "max abs diff"], rows)
