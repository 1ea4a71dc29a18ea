"""``optisplit studies``, ``show`` and ``dashboard``: review the stored searches."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from optisplit.cli._common import add_json_flag, positive_int, print_json, print_table

__all__ = ["register"]


def register(subparsers: Any) -> None:
    studies = subparsers.add_parser(
        "studies",
        help="list the studies in a storage",
        description="List the studies (one per search) in an Optuna storage.",
    )
    _add_storage(studies)
    add_json_flag(studies)
    studies.set_defaults(func=_studies)

    show = subparsers.add_parser(
        "show",
        help="print the stored front of a study",
        description="Print the predicted front stored in a study, with any measurements.",
    )
    show.add_argument("study", metavar="STUDY", help="study name (see 'optisplit studies')")
    _add_storage(show)
    add_json_flag(show)
    show.set_defaults(func=_show)

    dashboard = subparsers.add_parser(
        "dashboard",
        help="serve optuna-dashboard on the study storage",
        description=(
            "Serve optuna-dashboard on a study storage: every evaluated plan of every engine, "
            "Pareto-front plots, user attributes (plan, memory, measurements). Ctrl-C stops it."
        ),
    )
    _add_storage(dashboard)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    dashboard.add_argument(
        "--port", type=positive_int, default=8080, help="port to listen on (default: %(default)s)"
    )
    dashboard.set_defaults(func=_dashboard)


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help="Optuna storage URL (default: sqlite:///studies/optisplit.db)",
    )


def _studies(args: argparse.Namespace) -> int:
    from optisplit import store

    rows = store.list_studies(args.storage)
    if args.json:
        print_json({"storage": store.storage_url(args.storage), "studies": rows})
        return 0
    columns = ["study", "trials", "model", "testbed", "condition", "batch", "created"]
    table = [
        [
            r["name"],
            r["trials"],
            r["model"] or "",
            r["testbed"] or "",
            r["condition"] or "",
            r["batch_size"] or "",
            r["created"] or "",
        ]
        for r in rows
    ]
    print_table(columns, table, title=f"studies in {store.storage_url(args.storage)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from optisplit import store

    study = store.load_study(args.study, args.storage)
    front = [store.trial_summary(t) for t in store.front_trials(study)]
    attrs = {k: study.user_attrs.get(k) for k in store.STUDY_ATTRS}
    if args.json:
        print_json(
            {
                "study": study.study_name,
                "storage": store.storage_url(args.storage),
                **attrs,
                "trials": len(study.get_trials(deepcopy=False)),
                "front": front,
            }
        )
        return 0
    rows = [
        [
            f["plan"],
            f["engine"] or "",
            float(f["latency_ms"]),
            float(f["throughput_rps"]),
            _memory_mb(f["memory_bytes"]),
            _measured(f),
        ]
        for f in front
    ]
    title = f"front of {study.study_name} ({attrs['model']} on {attrs['testbed']})"
    print_table(
        ["plan", "engine", "latency ms", "throughput rps", "memory MB", "measured"],
        rows,
        title=title,
    )
    return 0


def _memory_mb(memory: Any) -> str:
    if not isinstance(memory, dict) or not memory:
        return ""
    return " ".join(f"{d}:{b / 2**20:.1f}" for d, b in memory.items())


def _measured(summary: dict[str, Any]) -> str:
    parts = []
    for key, value in summary.items():
        if key.startswith("measured_") and isinstance(value, dict):
            lat = value.get("latency_ms")
            tp = value.get("throughput_rps")
            if value.get("error"):
                parts.append(f"{key[9:]}: failed")
            elif lat is not None and tp is not None:
                parts.append(f"{key[9:]}: {float(lat):.2f} ms, {float(tp):.2f} rps")
    return "; ".join(parts)


def _dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from optisplit import store

    storage = store.open_storage(args.storage)
    print(
        f"optuna-dashboard for {store.storage_url(args.storage)} on "
        f"http://{args.host}:{args.port}/dashboard (Ctrl-C stops it)",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_server(storage, host=args.host, port=args.port)
    except OSError as exc:
        from optisplit.errors import OptisplitError

        raise OptisplitError(
            f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    except KeyboardInterrupt:
        return 0
    return 0
