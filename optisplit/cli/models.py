"""``optisplit models``: every classification model in the zoo, with its default input size."""

from __future__ import annotations

import argparse

from optisplit.cli._common import add_json_flag, print_json, print_table

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models optisplit can build (every torchvision classification model)",
        description=(
            "Every torchvision classification model with its default input resolution. Models "
            "are built with seeded random weights (never downloaded); 'blocks' and 'profile' "
            "also take a user model with --module package.module:factory."
        ),
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optisplit.zoo import input_size, list_models

    rows = [{"model": name, "input_size": input_size(name)} for name in list_models()]
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["model", "input"],
            [[r["model"], f"3x{r['input_size']}x{r['input_size']}"] for r in rows],
            title=f"{len(rows)} models",
        )
    return 0
