"""``optisplit search``: predict the latency-throughput front of split plans and store every plan."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.cli._common import (
    add_calibration_flags,
    add_epsilon_flag,
    add_json_flag,
    calibration_backend,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from optisplit.errors import UsageError

if TYPE_CHECKING:
    from optisplit.cost import CostModel, Evaluation
    from optisplit.search.base import SearchResult

__all__ = ["register"]

ALL_ENGINES = ("exact", "nsga2", "optuna")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search the predicted latency-throughput front of split plans",
        description=(
            "Search the split plans of MODEL on a testbed with the cost model and print the "
            "predicted Pareto front (latency minimised, throughput maximised). Every evaluated "
            "plan is stored as a trial of an Optuna study (see 'optisplit studies', "
            "'optisplit dashboard')."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model name (see 'optisplit models')")
    parser.add_argument("--testbed", required=True, help="testbed name or YAML file")
    parser.add_argument(
        "--engine",
        default="nsga2",
        help="exact, nsga2, optuna, or all (every engine on one shared reference point); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--sampler",
        default="nsga2",
        choices=("nsga2", "nsga2-plan", "tpe"),
        help="Optuna sampler of the optuna engine (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=positive_int,
        default=None,
        help="candidate plans per engine (default: engine's own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="batch size (default: 1)"
    )
    parser.add_argument(
        "--granularity", choices=("coarse", "fine"), default="coarse", help="block granularity"
    )
    parser.add_argument(
        "--condition", default=None, help="network condition: lan, wifi, constrained"
    )
    parser.add_argument(
        "--link-rtt-ms", type=float, default=None, help="set every link's RTT (ms)"
    )
    parser.add_argument(
        "--link-mbps",
        type=positive_float,
        default=None,
        help="set every link's bandwidth (Mbit/s)",
    )
    parser.add_argument(
        "--profiles", default="profiles", help="profiles root (default: %(default)s)"
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help="Optuna storage (default: sqlite:///studies/optisplit.db)",
    )
    parser.add_argument(
        "--study", default=None, help="study name (default: MODEL-TESTBED-ENGINE-TIME)"
    )
    parser.add_argument("--resume", action="store_true", help="add to an existing study")
    parser.add_argument(
        "--no-store", action="store_true", help="do not record the search in a study"
    )
    parser.add_argument("--plot", metavar="PATH", default=None, help="write the front as an image")
    add_epsilon_flag(parser)
    add_calibration_flags(parser)
    add_json_flag(parser)
    parser.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> int:
    from optisplit import store
    from optisplit.pareto import hypervolume, reference_point

    names = _engine_names(args.engine)
    model = _cost_model(args)
    study = None if args.no_store else _open_study(args, model, names)
    runs = [_run(name, model, args, study) for name in names]
    results = [result for result, _ in runs]
    # engines are compared on their whole fronts; users are shown the plans the model tells apart
    reference = reference_point([r.front for r in results])
    reports = [
        {
            "engine": r.engine,
            "evaluations": r.evaluations,
            "seconds": round(r.seconds, 4),
            "hypervolume": hypervolume(r.front, reference),
            "reference_point": reference,
            "study": study.study_name if study is not None else None,
            "storage": store.storage_url(args.storage) if study is not None else None,
            "epsilon": args.epsilon,
            "front_size": len(r.front),
            "front": [e.to_dict() for e in shown],
        }
        for r, shown in runs
    ]
    if args.plot:
        _plot(results, Path(args.plot), title=f"{model.model} on {model.testbed.name}")
    if args.json:
        print_json(reports if args.engine == "all" else reports[0])
    else:
        _print(results, reports)
    return 0


def _engine_names(engine: str) -> list[str]:
    from optisplit.search import get_engine

    if engine == "all":
        return list(ALL_ENGINES)
    get_engine(engine)
    return [engine]


def _cost_model(args: argparse.Namespace) -> CostModel:
    from optisplit.cost import load_cost_model
    from optisplit.testbed import apply_condition, load_testbed

    if args.link_rtt_ms is not None and args.link_rtt_ms < 0:
        raise UsageError(f"--link-rtt-ms must be >= 0, got {args.link_rtt_ms}")
    testbed = load_testbed(args.testbed, root=args.profiles)
    if args.condition:
        testbed = apply_condition(testbed, args.condition)
    if args.link_rtt_ms is not None or args.link_mbps is not None:
        testbed = testbed.with_links(rtt_ms=args.link_rtt_ms, mbps=args.link_mbps)
    return load_cost_model(
        args.model,
        testbed,
        batch_size=args.batch_size,
        profiles_root=args.profiles,
        granularity=args.granularity,
        backend=calibration_backend(args),
    )


def _open_study(args: argparse.Namespace, model: CostModel, engines: list[str]) -> Any:
    from optisplit import store

    engine = "all" if len(engines) > 1 else engines[0]
    name = args.study or store.default_study_name(model.model, model.testbed.name, engine)
    attrs = {
        "model": model.model,
        "testbed": model.testbed.name,
        "batch_size": model.batch_size,
        "granularity": args.granularity,
        "condition": args.condition,
        "profiles_root": args.profiles,
        "backend": calibration_backend(args),
        "overheads": dataclasses.asdict(model.overheads),
        "epsilon": args.epsilon,
    }
    return store.create_study(name, args.storage, attrs=attrs, resume=args.resume)


def _engine(name: str, args: argparse.Namespace) -> Any:
    from optisplit.search import get_engine

    cls = get_engine(name)
    if name == "optuna":
        return cls(sampler=args.sampler)  # type: ignore[call-arg]
    return cls()


def _run(
    name: str, model: CostModel, args: argparse.Namespace, study: Any
) -> tuple[SearchResult, list[Evaluation]]:
    """One engine's search, and the plans of its front shown (thinned within ``--epsilon``),
    which the study records as its front."""
    from optisplit import store
    from optisplit.cli._common import progress
    from optisplit.pareto import thin_front

    engine = _engine(name, args)
    evaluated: list[Evaluation] = []
    # No total: the local search after the evolutionary one adds a variable number of plans.
    with progress(f"{name} search: plans evaluated", None) as bar:

        def on_evaluate(evaluation: Evaluation) -> None:
            evaluated.append(evaluation)
            bar.advance()

        result: SearchResult = engine.run(
            model, budget=args.budget, seed=args.seed, on_evaluate=on_evaluate
        )
    shown = thin_front(result.front, args.epsilon)
    if study is not None:
        store.record_evaluations(study, evaluated, engine=name, front=[str(e.plan) for e in shown])
    return result, shown


def _print(results: list[SearchResult], reports: list[dict[str, Any]]) -> None:
    for result, report in zip(results, reports):
        rows = [
            [f["plan"], f["latency_ms"], f["throughput_rps"], _memory(f["memory_bytes"])]
            for f in report["front"]
        ]
        shown = f"{len(rows)} plans on the front"
        if len(rows) < len(result.front):
            shown += f" (standing for {len(result.front)} within {report['epsilon']:.0%})"
        title = (
            f"{result.engine}: {shown}, "
            f"{result.evaluations} evaluated in {result.seconds:.2f} s, "
            f"hypervolume {report['hypervolume']:.4f}"
        )
        print_table(["plan", "latency ms", "throughput rps", "memory MB"], rows, title=title)
    if reports and reports[0]["study"]:
        print(f"stored in study {reports[0]['study']} ({reports[0]['storage']})")


def _memory(memory: dict[str, int]) -> str:
    return " ".join(f"{d}:{b / 2**20:.1f}" for d, b in memory.items())


def _plot(results: list[SearchResult], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for result, marker in zip(results, "osD^v"):
        lat = [e.latency_ms for e in result.front]
        tp = [e.throughput_rps for e in result.front]
        ax.step(lat, tp, where="post", alpha=0.4)
        ax.scatter(lat, tp, marker=marker, label=f"{result.engine} ({len(lat)})")
        if result is results[0]:
            for e in result.front:
                ax.annotate(
                    str(e.plan),
                    (e.latency_ms, e.throughput_rps),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("predicted throughput (requests/s)")
    ax.set_title(f"predicted front: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        from optisplit.errors import OptisplitError

        raise OptisplitError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
