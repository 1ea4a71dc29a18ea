"""Fidelity: predicted vs measured fronts on the emulated testbeds, per network condition.

For each testbed (``local``: 2 devices, ``local3``: 3 devices), each model, each condition (lan,
wifi, constrained) and each backend (socket, rpc): bring the emulated testbed up under that
condition, search the exact front with the cost model, validate every front plan, and report
latency and throughput MAPE, Spearman per objective and front precision/recall
(``optisplit.compare``). Each model is profiled on every device inside its sandbox, the devices
all at once, right before the model's cases under each condition (this host's cores drift by
5-10 % over tens of seconds, so a profile taken one condition earlier misleads), by default with
the CPU clock (immune to other processes on a shared host; the cost model divides CPU-clock times
by the device's CPU quota); a profile that wandered (``BlockProfile.wander``: the host slowed down
during it) is taken again, at most twice, and so are all of them when the devices' CPU-clock
profiles disagree by more than ``CPU_CLOCK_AGREE`` (they time the same silicon).

    .venv/bin/python bench/fidelity.py [--models resnet18,mobilenet_v2] [--testbeds local,local3]
        [--conditions lan,wifi,constrained] [--backends socket,rpc] [--requests 20] [--rounds 3]
        [--window 2] [--repeats 40] [--spread 30] [--clock cpu] [--profile-once | --reuse-profiles]

Each device's profile is spread over ``--spread`` seconds and every front plan is validated in
``--rounds`` interleaved rounds (this host's speed wanders by 10-20 % over seconds), each
throughput measurement lasting at least ``--window`` seconds (``optisplit validate --window``).
Three rounds by default: the median of three sets aside one round that a slow spell caught,
where the median of two is their mean (a full run takes about 48 minutes instead of 42).
Right before each ``lan`` case the backend is calibrated (:mod:`optisplit.calibrate`, as
``optisplit calibrate``: per-message, hand-off and per-request costs; they drift by a millisecond
or two over minutes here); ``wifi`` and ``constrained`` cases reuse the last calibration (the
probe needs fast links). ``lat-mb%`` is the latency error of the same measurements against
predictions whose hand-offs cost the same whatever bytes they carry (``handoff_ms_per_mb`` 0),
``thr0 MAPE%`` the throughput error against predictions without ``request_ms``, ``thr-h%``
without the shared host's per-core bound (as if each device were a machine of its own).
``thr ord%`` is the share of plan pairs measured in the predicted throughput order, over the
pairs whose predicted
throughputs differ by more than the case's round-against-round error (``rr thr%``): Spearman
over a front of near-equal plans ranks the measurement's noise. ``strm%`` and ``strm max%`` are
the median and the largest over the plans of ``compare``'s stream slowdown: how much slower a
plan's slowest-to-stream stage computed while requests streamed than one at a time. ``hand ms``
and ``pred`` are the client's two hand-offs per request (input and output), measured (median
over the plans) and predicted.

Prints a table and writes bench/results/fidelity.json (every plan's predicted and measured
values, per-stage compute and per-hop times included, for diagnosis).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

from optisplit import emulate  # noqa: E402
from optisplit.calibrate import calibrate_overheads  # noqa: E402
from optisplit.compare import compare_plans, plans_from_results  # noqa: E402
from optisplit.cost import Overheads, load_cost_model  # noqa: E402
from optisplit.demo import profile_at_once  # noqa: E402
from optisplit.errors import OptisplitError  # noqa: E402
from optisplit.pareto import DEFAULT_EPSILON, pareto_front, thin_front  # noqa: E402
from optisplit.plan import Plan  # noqa: E402
from optisplit.profile import (  # noqa: E402
    CPU_CLOCK_AGREE,
    cpu_clock_disagreement,
    load_profile,
    profile_path,
)
from optisplit.profiler import WANDER_WARN  # noqa: E402
from optisplit.search import get_engine  # noqa: E402
from optisplit.testbed import Testbed, apply_condition, load_testbed  # noqa: E402
from optisplit.validate import HOST_FULL, validate_plans  # noqa: E402

RESULTS = ROOT / "bench" / "results"
_PROFILE_RETRIES = 2
"""Profile a device again (at most this often) when its profile wandered (the host's speed
changed during it: ``BlockProfile.wander`` above ``WANDER_WARN``)."""


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--testbeds", default="local,local3")
    parser.add_argument("--conditions", default="lan,wifi,constrained")
    parser.add_argument("--backends", default="socket,rpc")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="validation rounds: every front plan measured this many times, plans taking turns",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=2.0,
        help="seconds each throughput measurement lasts at least (optisplit validate --window)",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=30.0,
        help="seconds each device's profile is spread over (optisplit profile --spread)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=40,
        help="profile rounds per device (spread over up to 10 s: this host's speed wanders)",
    )
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=("cpu", "wall"),
        help="profile clock: cpu (immune to other load; the cost model divides by the quota)",
    )
    parser.add_argument("--profiles", default=None, help="default: bench/results/profiles-CLOCK")
    parser.add_argument(
        "--profile-once",
        action="store_true",
        help="profile each model once per testbed (default: again before each condition, "
        "right before the model's cases: this host's speed drifts over minutes)",
    )
    parser.add_argument(
        "--reuse-profiles",
        action="store_true",
        help="use profiles found on disk instead of measuring them (quick reruns; they drift)",
    )
    parser.add_argument("--skip-checks", action="store_true", help="do not probe the testbed")
    parser.add_argument(
        "--epsilon",
        type=float,
        default=DEFAULT_EPSILON,
        help="margin of the thinned front the eps columns report on (default: %(default)s)",
    )
    parser.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    parser.add_argument(
        "--rescore",
        metavar="JSON",
        help="measure nothing: add the diagnostic columns to an earlier run's results and print",
    )
    return parser.parse_args()


def _profile(
    bed: Testbed, model: str, root: str, reprofile: bool, args: argparse.Namespace
) -> None:
    """Profile ``model`` on every device inside its sandbox (the testbed is up), all devices at
    once: their rounds spread over the same seconds, so they see the host at the same speed
    (run one after another, two devices pinned to one core caught it at different speeds)."""
    todo = sorted({d.profile for d in bed.devices.values()})
    if not reprofile:
        todo = [d for d in todo if not profile_path(root, d, model, 1).is_file()]
    for _ in range(1 + _PROFILE_RETRIES):
        if not todo:
            return
        try:
            profile_at_once(
                model,
                str(ROOT / "profiles" / "testbeds" / f"{bed.name}.yaml"),
                todo,
                root,
                repeats=args.repeats,
                spread_s=args.spread,
                clock=args.clock,
            )
        except OptisplitError as exc:
            raise SystemExit(str(exc)) from None
        wandered = []
        for device in todo:
            wander = load_profile(profile_path(root, device, model, 1)).wander
            if wander is not None and wander > WANDER_WARN:
                print(f"{model} on {device}: profile wandered by {100 * wander:.0f} %", flush=True)
                wandered.append(device)
        todo = wandered
        every = sorted({d.profile for d in bed.devices.values()})
        gap = cpu_clock_disagreement(
            [load_profile(profile_path(root, d, model, 1)) for d in every]
        )
        if gap is not None and gap > CPU_CLOCK_AGREE:  # one of them caught the host slow
            print(f"{model}: the devices' profiles disagree by {100 * gap:.0f} %", flush=True)
            todo = every


def _case(
    bed: Testbed,
    condition: str,
    model: str,
    backend: str,
    overheads: Overheads,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cost = load_cost_model(model, bed, profiles_root=args.profiles, overheads=overheads)
    front = get_engine("exact")().run(cost).front
    start = time.monotonic()
    results = validate_plans(
        model,
        bed,
        [e.plan for e in front],
        backend=backend,
        requests=args.requests,
        warmup=args.warmup,
        rounds=args.rounds,
        window_s=args.window,
        profiles_root=args.profiles,
        out_dir=RESULTS / "fidelity" / f"{bed.name}-{condition}-{model}-{backend}",
    )
    for result, evaluation in zip(results, front):  # predictions with the probed overheads
        result["predicted"] = _objectives(evaluation)
        for stage in (result.get("measured") or {}).get("stages", []):  # for diagnosis
            stage["predicted_compute_ms"] = cost.compute_ms(
                stage["device"], stage["start"], stage["end"]
            )
    comparison = compare_plans(plans_from_results(results), backend=backend)
    # the same measurements against predictions without the per-request term, for its effect
    bare = load_cost_model(
        model,
        bed,
        profiles_root=args.profiles,
        overheads=dataclasses.replace(overheads, request_ms=0.0),
    )
    unloaded = [
        {**r, "predicted": _objectives(bare.evaluate(e.plan))} for r, e in zip(results, front)
    ]
    without = compare_plans(plans_from_results(unloaded), backend=backend)
    # and without the shared host's cores (each device on a machine of its own)
    apart = dataclasses.replace(
        bed, devices={n: dataclasses.replace(d, cores=None) for n, d in bed.devices.items()}
    )
    unshared = load_cost_model(model, apart, profiles_root=args.profiles, overheads=overheads)
    alone = [
        {**r, "predicted": _objectives(unshared.evaluate(e.plan))} for r, e in zip(results, front)
    ]
    without_cores = compare_plans(plans_from_results(alone), backend=backend)
    return {
        "compute_mape": _compute_mape(cost, results),
        "testbed": bed.name,
        "condition": condition,
        "model": model,
        "backend": backend,
        "overheads": dataclasses.asdict(overheads),
        "plans": len(front),
        "failed": len(comparison.failed),
        "latency_mape": comparison.latency_mape,
        "throughput_mape": comparison.throughput_mape,
        "latency_spearman": comparison.latency_spearman,
        "throughput_spearman": comparison.throughput_spearman,
        "without_request_ms": {
            "latency_mape": without.latency_mape,
            "throughput_mape": without.throughput_mape,
        },
        "without_host_cores": {
            "latency_mape": without_cores.latency_mape,
            "throughput_mape": without_cores.throughput_mape,
            "throughput_spearman": without_cores.throughput_spearman,
        },
        **_diagnostics(cost, results, backend, args.epsilon),
        "front_precision": comparison.front_precision,
        "front_recall": comparison.front_recall,
        "seconds": round(time.monotonic() - start, 1),
        "results": results,
    }


def _diagnostics(
    cost: Any, results: list[dict[str, Any]], backend: str, epsilon: float
) -> dict[str, Any]:
    """Errors that tell the model's share from the host's: the same measurements against
    predictions from each stage's measured compute (what is left is not the devices' speed
    drifting between profile and run), and round against round (``compare``'s repeatability:
    how well the measurement agrees with itself). Also the figures over the thinned front
    (``thin_front``: what ``optisplit search`` and ``demo`` show by default), a subset of the
    plans measured."""
    given = compare_plans(plans_from_results(_given_compute(cost, results)), backend=backend)
    measured = compare_plans(plans_from_results(results), backend=backend)
    repeat = measured.repeatability
    evaluations = {r["plan"]: cost.evaluate(Plan.parse(r["plan"])) for r in results}
    kept = {str(e.plan) for e in thin_front(pareto_front(list(evaluations.values())), epsilon)}
    thinned = compare_plans(
        plans_from_results([r for r in results if r["plan"] in kept]), backend=backend
    )
    return {
        "thinned": {
            "epsilon": epsilon,
            "plans": len(kept),
            "latency_mape": thinned.latency_mape,
            "throughput_mape": thinned.throughput_mape,
            "latency_spearman": thinned.latency_spearman,
            "throughput_spearman": thinned.throughput_spearman,
            "round_vs_round": dict(thinned.repeatability or {}),
        },
        "given_measured_compute": {
            "latency_mape": given.latency_mape,
            "throughput_mape": given.throughput_mape,
            "latency_spearman": given.latency_spearman,
            "throughput_spearman": given.throughput_spearman,
        },
        "round_vs_round": dict(repeat or {}),
        "handoffs": _handoffs(cost, results),
        "without_handoff_per_mb": _without_handoff_per_mb(cost, results, backend),
        "stream_slowdown_pct": measured.stream_slowdown_pct,
        "stream_slowdown_max_pct": max(measured.stream_slowdowns, default=None),
        "resolved_pairs": _resolved_pairs(results, repeat),
        "host_full": _host_full(cost, results),
    }


def _handoffs(cost: Any, results: list[dict[str, Any]]) -> dict[str, float | None]:
    """The client's two local hand-offs per request (the first and last hops: the input to the
    source, the output from the sink), measured (median over the plans) and predicted."""
    hops = [
        (r["measured"]["transfers"][0]["ms"], r["measured"]["transfers"][-1]["ms"])
        for r in results
        if r.get("measured") and r["measured"].get("transfers")
    ]
    sums = [a + b for a, b in hops if a is not None and b is not None]
    predicted, fixed = _predicted_handoffs(cost)
    return {
        "measured_ms": statistics.median(sums) if sums else None,
        "predicted_ms": predicted,
        "fixed_ms": fixed,
    }


def _predicted_handoffs(cost: Any) -> tuple[float, float]:
    """The two hand-offs per request the cost model predicts, with its calibrated
    ``handoff_ms_per_mb`` and with that term at 0."""
    flat = dataclasses.replace(cost.overheads, handoff_ms_per_mb=0.0)
    moved = (cost.cut_bytes[0], cost.cut_bytes[-1])
    return cost.overheads.handoffs_ms(*moved), flat.handoffs_ms(*moved)


def _without_handoff_per_mb(
    cost: Any, results: list[dict[str, Any]], backend: str
) -> dict[str, float | None]:
    """The latency MAPE of the stored predictions with hand-offs of a fixed cost: the per-MB
    term adds the same to every plan's latency (the input and output bytes are the model's),
    so it is taken off each prediction as it stands."""
    predicted, fixed = _predicted_handoffs(cost)
    shift = predicted - fixed
    flat = [
        {**r, "predicted": {**r["predicted"], "latency_ms": r["predicted"]["latency_ms"] - shift}}
        if r.get("predicted")
        else r
        for r in results
    ]
    return {"latency_mape": compare_plans(plans_from_results(flat), backend=backend).latency_mape}


def _resolved_pairs(
    results: list[dict[str, Any]], repeat: dict[str, Any] | None
) -> dict[str, float | None]:
    """Per objective, the share of plan pairs measured in the order the prediction puts them,
    over the pairs whose predicted values differ by more than the measurement resolves (the
    case's own round-against-round MAPE, at least 1 %). On a front whose plans' predicted
    throughputs lie within a percent or two of each other, Spearman ranks noise; this asks
    whether the measurement contradicts an order the prediction actually claims."""
    ok = [r for r in results if r.get("measured") and not r.get("error")]
    out: dict[str, float | None] = {}
    for key, field in (("latency", "latency_ms"), ("throughput", "throughput_rps")):
        tol = max(((repeat or {}).get(f"{key}_mape") or 0.0), 1.0) / 100
        pairs = agree = 0
        for a, b in itertools.combinations(ok, 2):
            pa, pb = a["predicted"][field], b["predicted"][field]
            if abs(pa - pb) <= tol * min(pa, pb):
                continue
            pairs += 1
            agree += (pa < pb) == (a["measured"][field] < b["measured"][field])
        out[key] = agree / pairs if pairs else None
    return out


def _host_full(cost: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The plans whose busiest helper core was full (``validate``'s warning, ``HOST_FULL``)
    against the others: their throughput error, and the signed error of the predicted CPU per
    request of that core (``CostModel.core_loads``) against the measured one."""
    groups: dict[str, dict[str, list[float]]] = {
        "full": {"throughput": [], "core": []},
        "others": {"throughput": [], "core": []},
    }
    for result in results:
        measured, predicted = result.get("measured"), result.get("predicted")
        if not measured or not predicted or not measured.get("throughput_rps"):
            continue
        busiest = (measured.get("host") or {}).get("busiest_core")
        if not busiest:
            continue
        group = groups["full" if busiest["utilization"] >= HOST_FULL else "others"]
        rate = measured["throughput_rps"]
        group["throughput"].append(abs(predicted["throughput_rps"] - rate) / rate * 100)
        core = int(busiest["core"])
        loads = cost.core_loads(Plan.parse(result["plan"]))
        spent = measured["host"]["cores_ms"].get(busiest["core"])
        if core in loads and spent:
            group["core"].append((loads[core] - spent) / spent * 100)
    return {
        name: {
            "plans": len(g["throughput"]),
            "throughput_mape": sum(g["throughput"]) / len(g["throughput"])
            if g["throughput"]
            else None,
            "core_error_pct": sum(g["core"]) / len(g["core"]) if g["core"] else None,
        }
        for name, g in groups.items()
    }


def _rescore(path: str, args: argparse.Namespace) -> int:
    """Add :func:`_diagnostics` to the cases of an earlier run's JSON and print its table."""
    doc = json.loads(Path(path).read_text())
    for case in doc["cases"]:
        bed = apply_condition(
            load_testbed(case["testbed"], root=str(ROOT / "profiles")), case["condition"]
        )
        overheads = Overheads(**case["overheads"])
        cost = load_cost_model(
            case["model"], bed, profiles_root=args.profiles, overheads=overheads
        )
        case.update(_diagnostics(cost, case["results"], case["backend"], args.epsilon))
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    _print(doc["cases"])
    _print_host_full(doc["cases"])
    return 0


def _given_compute(cost: Any, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` with predictions in which every stage computes for its measured time: its
    latency-phase compute for the latency, its compute while streaming for the throughput."""
    out = []
    for result in results:
        measured = result.get("measured")
        if not measured:
            out.append(result)
            continue
        plan = Plan.parse(result["plan"])
        predicted = {}
        for key, field in (
            ("compute_ms", "latency_ms"),
            ("streaming_compute_ms", "throughput_rps"),
        ):
            table = {
                (s["device"], s["start"], s["end"]): s.get(key, s["compute_ms"])
                for s in measured["stages"]
            }
            profiled = cost.compute_ms
            cost.compute_ms = lambda d, a, b, t=table, f=profiled: t.get((d, a, b), f(d, a, b))
            try:
                predicted[field] = _objectives(cost.evaluate(plan))[field]
            finally:
                del cost.compute_ms  # the profile's again
        out.append({**result, "predicted": predicted})
    return out


def _objectives(evaluation: Any) -> dict[str, float]:
    return {"latency_ms": evaluation.latency_ms, "throughput_rps": evaluation.throughput_rps}


def _compute_mape(cost: Any, results: list[dict[str, Any]]) -> float | None:
    """MAPE of the stages' predicted compute against their measured compute (stages of 1 ms
    and more): how much of the error is the devices' speed rather than the network's model."""
    errors = []
    for result in results:
        for stage in (result.get("measured") or {}).get("stages", []):
            measured = stage.get("compute_ms") or 0.0
            if measured >= 1.0:
                predicted = cost.compute_ms(stage["device"], stage["start"], stage["end"])
                errors.append(abs(predicted - measured) / measured * 100)
    return sum(errors) / len(errors) if errors else None


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; a missing one as ``-``, right-aligned in its width."""
    if value is None:
        width = spec.lstrip("+").split(".")[0].rstrip("dfs")
        return "-".rjust(int(width or 0))
    return format(value, spec)


def _print(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'testbed':8} {'condition':12} {'model':13} {'backend':7} {'plans':>5} "
        f"{'lat MAPE%':>9} {'lat-mb%':>7} {'thr MAPE%':>9} {'thr0 MAPE%':>10} {'thr-h%':>6} "
        f"{'lat rho':>7} {'thr rho':>7} {'thr ord%':>8} "
        f"{'prec':>5} {'recall':>6} {'cmp MAPE%':>9} {'thr|c%':>6} {'strm%':>5} {'strm max%':>9} "
        f"{'rr thr%':>7} "
        f"{'rr rho':>6} {'eps n':>5} {'eps lat%':>8} {'eps thr%':>8} {'eps lrho':>8} "
        f"{'eps trho':>8} {'hand ms':>7} {'pred':>5} {'s':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        given, repeat = r.get("given_measured_compute", {}), r.get("round_vs_round", {})
        thin = r.get("thinned", {})
        print(
            f"{r['testbed']:8} {r['condition']:12} {r['model']:13} {r['backend']:7} "
            f"{r['plans']:>5} {_fmt(r['latency_mape'], '9.1f')} "
            f"{_fmt(r.get('without_handoff_per_mb', {}).get('latency_mape'), '7.1f')} "
            f"{_fmt(r['throughput_mape'], '9.1f')} "
            f"{_fmt(r['without_request_ms']['throughput_mape'], '10.1f')} "
            f"{_fmt(r.get('without_host_cores', {}).get('throughput_mape'), '6.1f')} "
            f"{_fmt(r['latency_spearman'], '7.2f')} "
            f"{_fmt(r['throughput_spearman'], '7.2f')} "
            f"{_fmt(_pct(r.get('resolved_pairs', {}).get('throughput')), '8.0f')} "
            f"{_fmt(r['front_precision'], '5.2f')} "
            f"{_fmt(r['front_recall'], '6.2f')} {_fmt(r.get('compute_mape'), '9.1f')} "
            f"{_fmt(given.get('throughput_mape'), '6.1f')} "
            f"{_fmt(r.get('stream_slowdown_pct'), '+5.1f')} "
            f"{_fmt(r.get('stream_slowdown_max_pct'), '+9.1f')} "
            f"{_fmt(repeat.get('throughput_mape'), '7.1f')} "
            f"{_fmt(repeat.get('throughput_spearman'), '6.2f')} "
            f"{_fmt(thin.get('plans'), '5d')} {_fmt(thin.get('latency_mape'), '8.1f')} "
            f"{_fmt(thin.get('throughput_mape'), '8.1f')} "
            f"{_fmt(thin.get('latency_spearman'), '8.2f')} "
            f"{_fmt(thin.get('throughput_spearman'), '8.2f')} "
            f"{_fmt(r.get('handoffs', {}).get('measured_ms'), '7.2f')} "
            f"{_fmt(r.get('handoffs', {}).get('predicted_ms'), '5.2f')} {r['seconds']:>6}"
        )


def _print_host_full(rows: list[dict[str, Any]]) -> None:
    """Per case: plans whose busiest helper core was full against the others."""
    print(
        f"\n{'testbed':8} {'condition':12} {'model':13} {'backend':7} "
        f"{'full':>4} {'thr% full':>9} {'thr% rest':>9} {'core% full':>10} {'core% rest':>10}"
    )
    for r in rows:
        full, rest = (
            (r.get("host_full") or {}).get("full"),
            (r.get("host_full") or {}).get("others"),
        )
        if not full or not rest:
            continue
        print(
            f"{r['testbed']:8} {r['condition']:12} {r['model']:13} {r['backend']:7} "
            f"{full['plans']:>4} {_fmt(full['throughput_mape'], '9.1f')} "
            f"{_fmt(rest['throughput_mape'], '9.1f')} {_fmt(full['core_error_pct'], '+10.1f')} "
            f"{_fmt(rest['core_error_pct'], '+10.1f')}"
        )


def _probe(bed: Testbed, backend: str, args: argparse.Namespace) -> Overheads:
    calibration = calibrate_overheads(
        bed, backend, requests=max(args.requests, 40), warmup=args.warmup, window_s=args.window
    )
    overheads = calibration.overheads()
    print(f"{bed.name} {backend}: {overheads}", flush=True)
    return overheads


def main() -> int:
    args = _args()
    args.profiles = args.profiles or str(RESULTS / f"profiles-{args.clock}")
    if args.rescore:
        return _rescore(args.rescore, args)
    models = args.models.split(",")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for name in args.testbeds.split(","):
        base = load_testbed(name, root=str(ROOT / "profiles"))
        was_up = emulate.is_up(base)
        try:
            emulate.up(apply_condition(base, "lan"), check=not args.skip_checks)
            reprofile = not args.reuse_profiles  # fresh profiles on each testbed
            backends = args.backends.split(",")
            overheads: dict[str, Overheads] = {}
            for condition in args.conditions.split(","):
                bed = apply_condition(base, condition)
                if condition != "lan" and any(b not in overheads for b in backends):
                    lan = apply_condition(base, "lan")  # the probe needs fast links
                    emulate.up(lan, check=not args.skip_checks)
                    overheads.update({b: _probe(lan, b, args) for b in backends})
                emulate.up(bed, check=not args.skip_checks)
                for model in models:
                    # profiled right before the model's cases: this host's speed drifts
                    _profile(base, model, args.profiles, reprofile, args)
                    for backend in backends:
                        if condition == "lan":  # probed right before: the overheads drift too
                            overheads[backend] = _probe(bed, backend, args)
                        rows.append(
                            _case(bed, condition, model, backend, overheads[backend], args)
                        )
                        _print(rows[-1:])
                        _write(args, rows, started)  # as it goes: a long run keeps its rows
                reprofile = not (args.profile_once or args.reuse_profiles)  # again next condition
        finally:
            if not was_up:
                emulate.down(base.name)
    print()
    _print(rows)
    _print_host_full(rows)
    seconds = _write(args, rows, started)
    print(f"\nwrote {args.out} in {seconds} s")
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], started: float) -> float:
    seconds = round(time.monotonic() - started, 1)
    summary = {
        "requests": args.requests,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "window_s": args.window,
        "profile_repeats": args.repeats,
        "profile_spread_s": args.spread,
        "clock": args.clock,
        "seconds": seconds,
        "cases": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return seconds


if __name__ == "__main__":
    sys.exit(main())
