"""``optisplit validate``: run plans for real on a testbed and record what they measure."""

from __future__ import annotations

import argparse
from typing import Any

from optisplit.cli._common import (
    add_calibration_flags,
    add_json_flag,
    add_window_flag,
    interrupt_on_sigterm,
    non_negative_int,
    plan_progress,
    positive_int,
    print_json,
    print_table,
)
from optisplit.errors import UsageError

__all__ = ["register"]

_BACKENDS = ("socket", "rpc", "inprocess")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="deploy plans on a testbed and measure latency, throughput and correctness",
        description=(
            "Deploy each plan on the testbed's workers (or on local worker processes when the "
            "testbed names no addresses), measure latency (one request in flight, p50/p95) and "
            "throughput (--depth requests in flight), check outputs against the single-process "
            "model, and record results as they go: the study's trials, timestamp CSVs and "
            "validate-<backend>.json under studies/<study>/ (or studies/adhoc-<time>/). "
            "The rpc backend unpickles what it receives: trusted networks only."
        ),
    )
    parser.add_argument("model", help="model name (as in 'optisplit models')")
    parser.add_argument("--testbed", required=True, help="testbed name or YAML path")
    parser.add_argument(
        "--backend", choices=_BACKENDS, default="socket", help="runtime (default socket)"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--plan",
        action="append",
        metavar="P",
        help="a plan, e.g. 'a[0:5] -> b[5:15]' (repeatable)",
    )
    which.add_argument("--study", metavar="S", help="validate the front stored in study S")
    parser.add_argument(
        "--top",
        type=positive_int,
        metavar="K",
        help="with --study: the K lowest-latency front plans",
    )
    parser.add_argument(
        "--storage", metavar="URL", help="Optuna storage (default sqlite:///studies/optisplit.db)"
    )
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=20,
        help="measured requests per phase (default 20)",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=3, help="warm-up requests per phase (default 3)"
    )
    parser.add_argument(
        "--depth", type=positive_int, help="requests in flight for throughput (default 2 x stages)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="measure every plan N times, the plans taking turns, and report the medians "
        "(guards against a host or network that drifts during the run; default 1)",
    )
    add_window_flag(parser)
    parser.add_argument(
        "--resume", action="store_true", help="skip plans already measured without error"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, help="batch size (default: the study's, else 1)"
    )
    parser.add_argument(
        "--granularity",
        choices=("coarse", "fine"),
        help="block granularity (default: the study's, else coarse)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weight-initialisation seed (default 0)"
    )
    parser.add_argument("--module", metavar="PKG.MOD:FACTORY", help="user model factory")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="state-dict file (its SHA-256 is checked by every worker)",
    )
    parser.add_argument(
        "--token-file",
        metavar="F",
        help="the workers' shared secret (testbeds with worker addresses)",
    )
    parser.add_argument(
        "--torch-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="compute device of local workers",
    )
    parser.add_argument("--out", metavar="DIR", help="folder for timestamps and results")
    parser.add_argument(
        "--profiles-root", default=None, help="profiles folder for predictions (default profiles)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_int,
        default=120,
        help="seconds to wait for one reply (default 120)",
    )
    add_calibration_flags(parser, backend=False)
    add_json_flag(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    interrupt_on_sigterm()
    from optisplit.testbed import apply_condition, load_testbed
    from optisplit.validate import validate_plans

    study, attrs = _study(args)
    testbed = load_testbed(args.testbed)
    if attrs.get("condition"):
        testbed = apply_condition(testbed, str(attrs["condition"]))
    plans = args.plan or _front_plans(study, args.top)
    batch_size = args.batch_size or int(attrs.get("batch_size") or 1)
    token = None
    if args.token_file:
        from optisplit.cli.worker import read_token

        token = read_token(args.token_file)
    with plan_progress(enabled=not args.json) as on_progress:
        results = validate_plans(
            args.model,
            testbed,
            plans,
            backend=args.backend,
            batch_size=batch_size,
            requests=args.requests,
            warmup=args.warmup,
            depth=args.depth,
            rounds=args.rounds,
            window_s=args.window,
            study=study,
            out_dir=args.out,
            resume=args.resume,
            granularity=args.granularity or str(attrs.get("granularity") or "coarse"),
            seed=args.seed,
            on_progress=on_progress,
            module=args.module,
            weights=args.weights,
            token=token,
            torch_device=args.torch_device,
            profiles_root=args.profiles_root or str(attrs.get("profiles_root") or "profiles"),
            timeout_s=float(args.timeout),
            calibrated=not args.no_calibration,
        )
    if args.json:
        print_json({"backend": args.backend, "results": results})
    else:
        _table(args.backend, results)
    failed = [r for r in results if r["error"] is not None or r["outputs_match"] is False]
    return 1 if failed else 0


def _study(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    if args.study is None:
        if args.top is not None:
            raise UsageError("--top needs --study")
        return None, {}
    from optisplit.store import load_study

    study = load_study(args.study, args.storage)
    attrs = dict(study.user_attrs)
    if attrs.get("model") not in (None, args.model):
        raise UsageError(f"study {args.study} is about {attrs['model']}, not {args.model}")
    return study, attrs


def _front_plans(study: Any, top: int | None) -> list[str]:
    from optisplit.store import front_trials

    plans = [str(t.user_attrs["plan"]) for t in front_trials(study)]
    if not plans:
        raise UsageError(f"study {study.study_name} has no front plans to validate")
    return plans[:top] if top else plans


def _table(backend: str, results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        pred = r.get("predicted") or {}
        meas = r.get("measured") or {}
        rows.append(
            [
                r["plan"],
                _num(pred.get("latency_ms")),
                _num(meas.get("latency_ms")),
                _num(meas.get("latency_p95_ms")),
                _num(pred.get("throughput_rps")),
                _num(meas.get("throughput_rps")),
                {True: "yes", False: "NO", None: "-"}[r.get("outputs_match")],
                r.get("error") or ("resumed" if r.get("resumed") else ""),
            ]
        )
    columns = ["plan", "pred ms", "p50 ms", "p95 ms", "pred req/s", "req/s", "outputs ok", "error"]
    print_table(columns, rows, title=f"validated on the {backend} backend")


def _num(value: Any) -> Any:
    return "-" if value is None else float(value)
