"""Validation: deploy plans on a runtime over a testbed, measure them, and record what happened.

For each plan: deploy it (the testbed's workers when every device has an ``address``; local
worker processes otherwise), measure latency and throughput as defined in
:mod:`optisplit.runtime.measure`, check outputs against the single-process model, and write the
result as it goes: the study trial's ``measured_<backend>`` attribute, a per-request timestamp
CSV and ``validate-<backend>.json`` under the output folder. A failed plan (worker killed,
timeout, bad frame) is recorded with its reason and the run goes on; ``resume`` skips plans
already measured without error. With ``rounds`` > 1 every plan is measured that many times,
the plans taking turns, and the medians over its rounds are reported (a slow spell of a shared
host or a warming device then spreads over all plans instead of biasing the one measured in it).

Where the testbed's source (sink) device is not the plan's first (last) device, a relay stage on
that device receives the input (delivers the output), so the input crosses the source -> device
link as the cost model assumes, rather than starting at the orchestrator.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit._io import atomic_write_text, read_json, write_json
from optisplit.errors import OptisplitError, RuntimeFailure, UsageError
from optisplit.plan import Plan
from optisplit.runtime.base import Backend, ModelSpec, StagePlacement

if TYPE_CHECKING:
    import optuna
    import torch

    from optisplit.runtime.launcher import LocalWorkers
    from optisplit.runtime.measure import Measurement
    from optisplit.testbed import Testbed

__all__ = ["ProgressCallback", "plan_placements", "validate_plans"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, str, int, int], None]
"""Called with (plan text, phase, done, total); phase is deploy, latency, throughput or done."""

RESULTS_SCHEMA = 1
HOST_FULL = 0.95
"""A core of the host of local workers this busy while a plan streamed gets a warning."""
_N_INPUTS = 2


def plan_placements(
    plan: Plan,
    testbed: Testbed,
    addresses: Mapping[str, tuple[str, int]] | None,
    *,
    relays: bool = True,
) -> list[StagePlacement]:
    """The stages to deploy for ``plan``: its stages, plus source/sink relays (see module doc)."""
    where = addresses or {}
    stages = [StagePlacement(s.device, s.start, s.end, where.get(s.device)) for s in plan.stages]
    if relays and testbed.source != plan.stages[0].device and testbed.source in where:
        stages.insert(0, StagePlacement(testbed.source, 0, 0, where[testbed.source]))
    end = plan.n_blocks
    if relays and testbed.sink != plan.stages[-1].device and testbed.sink in where:
        stages.append(StagePlacement(testbed.sink, end, end, where[testbed.sink]))
    return stages


def validate_plans(
    model_name: str,
    testbed: Testbed | str,
    plans: Sequence[Plan | str],
    *,
    backend: str,
    batch_size: int = 1,
    requests: int = 20,
    warmup: int = 3,
    depth: int | None = None,
    rounds: int = 1,
    window_s: float = 0.0,
    study: optuna.Study | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    granularity: str = "coarse",
    seed: int = 0,
    on_progress: ProgressCallback | None = None,
    module: str | None = None,
    weights: str | None = None,
    token: bytes | None = None,
    torch_device: str = "cpu",
    profiles_root: str = "profiles",
    timeout_s: float = 120.0,
    calibrated: bool = True,
    warn_host_full: bool = True,
) -> list[dict[str, Any]]:
    """Deploy, measure and record every plan; returns the per-plan result dicts.

    Each result has the keys ``plan, predicted`` ({``latency_ms, throughput_rps, bound``} or
    None when profiles are missing), ``measured`` ({``latency_ms, latency_p95_ms,
    throughput_rps, items_per_s, requests, stages, transfers, host``} or None when it failed),
    ``outputs_match`` and ``error`` (None, or why the plan failed).

    Args:
        testbed: a Testbed or the name/path of one.
        backend: socket, rpc or inprocess.
        rounds: measure every plan this many times, interleaved (each round deploys and
            measures every plan in turn), and report the medians over the rounds
            (:func:`optisplit.runtime.measure.merge_rounds`). A plan that fails in a round is
            reported failed and not measured again.
        window_s: each throughput measurement lasts at least this many seconds (more than
            ``requests`` requests when needed; see :mod:`optisplit.runtime.measure`).
        study: where ``measured_<backend>`` is recorded (the plans must be in it).
        out_dir: folder for the timestamp CSVs and results (default ``studies/<study>/`` or
            ``studies/adhoc-<timestamp>/``).
        token: the workers' shared secret; required when the testbed gives worker addresses.
        calibrated: predict with ``backend``'s calibrated overheads where stored
            (``<profiles_root>/overheads``); False: the default overheads.
        warn_host_full: log a warning for each plan during which a core of the host of local
            workers was full (``HOST_FULL``); calibration turns it off for its probe plans,
            which may fill a helper core and which the user never asked for.

    Raises:
        UsageError: unknown backend, malformed plan, plan not fitting the model or testbed.
    """
    from optisplit.runtime import backend_class
    from optisplit.testbed import load_testbed

    if rounds < 1:
        raise UsageError(f"rounds must be at least 1, got {rounds}")
    if not 0.0 <= window_s < float("inf"):
        raise UsageError(f"window_s must be a number of seconds >= 0, got {window_s}")
    bed = load_testbed(testbed) if isinstance(testbed, str) else testbed
    backend_cls = backend_class(backend)
    spec = _model_spec(model_name, batch_size, granularity, module, weights, seed)
    parsed = [p if isinstance(p, Plan) else Plan.parse(p) for p in plans]
    _, _, n_blocks = _cache_reference(spec)
    for plan in parsed:
        plan.check(n_blocks, bed.devices, model=model_name)
    folder = Path(out_dir) if out_dir else _default_out_dir(study)
    results_file = folder / f"validate-{backend}.json"
    done = _previous_results(results_file, study, backend) if resume else {}
    todo = [p for p in parsed if str(p) not in done]
    parts: dict[str, list[Measurement]] = {str(p): [] for p in todo}
    predicted = _predictions(
        model_name,
        bed,
        todo,
        batch_size,
        granularity,
        profiles_root,
        backend if calibrated and backend in ("socket", "rpc") else None,
    )
    outcome: dict[str, dict[str, Any]] = {
        key: {**result, "resumed": True} for key, result in done.items()
    }
    run = _Run(
        bed, spec, backend, backend_cls, token, torch_device, todo, warn_host_full=warn_host_full
    )
    try:
        for round_ in range(1, rounds + 1):
            for plan in todo:
                key = str(plan)
                if outcome.get(key, {}).get("error") is not None:
                    continue  # failed in an earlier round: not measured again
                label = key if rounds == 1 else f"{key} (round {round_}/{rounds})"
                error = None
                try:
                    parts[key].append(
                        run.measure(
                            plan,
                            requests,
                            warmup,
                            depth,
                            timeout_s,
                            on_progress,
                            label,
                            round_,
                            window_s=window_s,
                        )
                    )
                except (RuntimeFailure, OSError) as exc:
                    log.warning("plan %s failed: %s", key, exc)
                    error = str(exc)
                outcome[key] = _result(key, parts[key], error, folder, backend)
                outcome[key]["predicted"] = predicted[key]
                _record(study, backend, outcome[key])
                ordered = [outcome[str(p)] for p in parsed if str(p) in outcome]
                write_json(results_file, _results_doc(model_name, bed, backend, ordered))
    finally:
        run.close()
    return [outcome[str(p)] for p in parsed]


def _model_spec(
    model: str,
    batch_size: int,
    granularity: str,
    module: str | None,
    weights: str | None,
    seed: int,
) -> ModelSpec:
    sha = None
    if weights is not None:
        from optisplit.runtime.stage import file_sha256

        try:
            sha = file_sha256(weights)
        except OSError as exc:
            raise UsageError(
                f"cannot read weights file {weights}: {exc.strerror or exc}"
            ) from None
    return ModelSpec(model, batch_size, granularity, module, weights, sha, seed)


def _reference(
    spec: ModelSpec,
) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]], int]:
    """Inputs, the single-process model's outputs for them, and the chain's block count."""
    import torch

    from optisplit.chain import load_chain
    from optisplit.zoo import build_model, example_input

    chain = load_chain(
        spec.model,
        batch_size=spec.batch_size,
        granularity=spec.granularity,
        module=spec.module,
        weights=spec.weights,
        seed=spec.seed,
    )
    model = build_model(spec.model, weights=spec.weights, seed=spec.seed, module=spec.module)
    first = example_input(spec.model, spec.batch_size, module=spec.module)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    inputs = [(first,)]
    for _ in range(_N_INPUTS - 1):
        extra = (
            torch.randn(first.shape, generator=generator) if first.is_floating_point() else first
        )
        inputs.append((extra.to(first.dtype),))
    with torch.inference_mode():
        expected = [_as_tuple(model(*x)) for x in inputs]
    return inputs, expected, chain.n_blocks


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class _Run:
    """The backend and (when needed) local workers shared by every plan of one validation."""

    def __init__(
        self,
        testbed: Testbed,
        spec: ModelSpec,
        backend: str,
        backend_cls: Any,
        token: bytes | None,
        torch_device: str,
        plans: Sequence[Plan],
        *,
        warn_host_full: bool = True,
    ) -> None:
        self.testbed = testbed
        self.spec = spec
        self.backend_name = backend
        self.workers: LocalWorkers | None = None
        self.helpers: tuple[int, ...] | None = None
        """Cores for this process and the delay forwarder beside local workers (None: any)."""
        self.watch: dict[str, int] = {}
        """Processes whose CPU time per request the measurements report (the forwarder)."""
        self.warn_host_full = warn_host_full
        """Warn when a core of the host was full while a plan streamed (``HOST_FULL``)."""
        self.addresses: dict[str, tuple[str, int]] = {}
        self.backend: Backend
        if backend == "inprocess":
            self.backend = backend_cls()
            return
        devices = _devices_needed(testbed, plans)
        remote = {d: testbed.devices[d].address for d in devices}
        missing = sorted(d for d, a in remote.items() if not a)
        if plans and any(remote.values()) and missing:
            raise UsageError(
                f"testbed {testbed.name} gives worker addresses for some devices only: "
                f"add one for {', '.join(missing)}, or none to start local workers"
            )
        if plans and not missing:
            if token is None:
                raise UsageError(
                    f"testbed {testbed.name} names worker addresses: pass the workers' token file"
                )
            from optisplit.cli.worker import parse_address

            self.addresses = {d: parse_address(str(a)) for d, a in remote.items()}
            self.backend = backend_cls(token, same_clock=_all_loopback(self.addresses))
        else:
            from optisplit.runtime.launcher import LocalWorkers

            self.workers = LocalWorkers(testbed, devices, torch_device=torch_device)
            self.backend = backend_cls(self.workers.token, same_clock=True)
            from optisplit import emulate

            # local workers share this host with us: keep off the cores the devices need
            self.helpers = emulate.helper_cores(testbed)
            forwarder = emulate.forwarder_pid(testbed)
            self.watch = {} if forwarder is None else {"forwarder": forwarder}

    def measure(
        self,
        plan: Plan,
        requests: int,
        warmup: int,
        depth: int | None,
        timeout_s: float,
        on_progress: ProgressCallback | None,
        label: str,
        round_: int,
        *,
        window_s: float = 0.0,
    ) -> Measurement:
        """Deploy ``plan`` and measure it once (round ``round_``)."""
        from optisplit.emulate.sandbox import on_cores
        from optisplit.runtime.measure import measure

        if on_progress is not None:
            on_progress(label, "deploy", 0, 1)
        if self.workers is not None:
            self.addresses = self.workers.start()  # restarts any worker that died
        stages = plan_placements(plan, self.testbed, self.addresses)
        inputs, expected, _ = _REFERENCE_CACHE.get(self.spec) or _cache_reference(self.spec)
        tick = (
            None if on_progress is None else (lambda phase, i, n: on_progress(label, phase, i, n))
        )
        with on_cores(self.helpers), self.backend.deploy(self.spec, stages) as deployment:
            measured = measure(
                deployment,
                inputs,
                expected,
                requests=requests,
                warmup=warmup,
                depth=depth or 2 * len(plan.stages),
                batch_size=self.spec.batch_size,
                timeout_s=timeout_s,
                source=self.testbed.source,
                sink=self.testbed.sink,
                on_request=tick,
                round_=round_,
                window_s=window_s,
                watch=self.watch,
                spare_cores=self.helpers or (),  # no spare core: nothing to tell
            )
        busiest = measured.host.get("busiest_core")
        if self.warn_host_full and busiest and busiest["utilization"] >= HOST_FULL:
            log.warning(
                "plan %s: core %s of this host was %.0f %% busy while it streamed; the host, "
                "not only the plan, may have set its throughput",
                label,
                busiest["core"],
                100 * busiest["utilization"],
            )
        if on_progress is not None:
            on_progress(label, "done", 1, 1)
        return measured

    def close(self) -> None:
        self.backend.close()
        if self.workers is not None:
            self.workers.stop()


_REFERENCE_CACHE: dict[ModelSpec, tuple[Any, Any, int]] = {}


def _cache_reference(spec: ModelSpec) -> tuple[Any, Any, int]:
    _REFERENCE_CACHE.clear()
    _REFERENCE_CACHE[spec] = _reference(spec)
    return _REFERENCE_CACHE[spec]


def _devices_needed(testbed: Testbed, plans: Sequence[Plan]) -> list[str]:
    devices = [testbed.source, *(d for p in plans for d in p.devices), testbed.sink]
    return [d for d in dict.fromkeys(devices) if d in testbed.devices]


def _all_loopback(addresses: Mapping[str, tuple[str, int]]) -> bool:
    return all(host in ("127.0.0.1", "localhost", "::1") for host, _ in addresses.values())


def _predictions(
    model: str,
    testbed: Testbed,
    plans: Sequence[Plan],
    batch_size: int,
    granularity: str,
    root: str,
    backend: str | None,
) -> dict[str, dict[str, Any] | None]:
    """Predicted latency, throughput and what bounds it of each plan (None for all: profiles
    missing)."""
    try:
        from optisplit.cost import load_cost_model

        cost = load_cost_model(
            model,
            testbed,
            batch_size=batch_size,
            profiles_root=root,
            granularity=granularity,
            backend=backend,
        )
        evaluations = {str(plan): cost.evaluate(plan) for plan in plans}
    except (OptisplitError, ImportError) as exc:
        log.info("no predictions: %s", exc)
        return dict.fromkeys(map(str, plans))
    return {
        key: {"latency_ms": e.latency_ms, "throughput_rps": e.throughput_rps, "bound": e.bound}
        for key, e in evaluations.items()
    }


def _result(
    plan: str, parts: Sequence[Measurement], error: str | None, folder: Path, backend: str
) -> dict[str, Any]:
    """The result dict of a plan measured in ``parts`` rounds so far (``error``: it failed)."""
    from optisplit.runtime.measure import merge_rounds

    result: dict[str, Any] = {
        "plan": plan,
        "predicted": None,
        "measured": None,
        "outputs_match": None,
        "error": error,
    }
    if parts:
        measured = merge_rounds(parts)
        result["measured"] = measured.to_dict()
        result["outputs_match"] = measured.outputs_match
        result["max_abs_diff"] = measured.max_abs_diff
        result["timestamps_csv"] = str(_write_csv(folder, backend, plan, measured))
    return result


def _write_csv(folder: Path, backend: str, plan: str, measured: Measurement) -> Path:
    from optisplit.runtime.measure import stamp_columns

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(stamp_columns(measured.devices))
    writer.writerows(measured.rows)
    path = folder / f"timestamps-{backend}-{_slug(plan)}.csv"
    atomic_write_text(path, buffer.getvalue())
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _default_out_dir(study: optuna.Study | None) -> Path:
    if study is not None:
        return Path("studies") / str(study.study_name)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("studies") / f"adhoc-{stamp}"


def _previous_results(
    path: Path, study: optuna.Study | None, backend: str
) -> dict[str, dict[str, Any]]:
    """Plans already measured without error, from the study and the results file."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        doc = read_json(path, kind="validation results", schema_versions=(RESULTS_SCHEMA,))
        for result in doc.get("results", []):
            if result.get("error") is None and result.get("measured") is not None:
                done[str(Plan.parse(result["plan"]))] = result
    if study is not None:
        for trial in study.get_trials(deepcopy=False):
            measured = trial.user_attrs.get(f"measured_{backend}")
            plan = trial.user_attrs.get("plan")
            if isinstance(measured, dict) and measured.get("error") is None and plan:
                key = str(Plan.parse(str(plan)))
                done.setdefault(key, _result_from_study(key, measured))
    return done


def _result_from_study(plan: str, measured: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "latency_ms",
        "latency_p95_ms",
        "throughput_rps",
        "items_per_s",
        "requests",
        "stages",
        "transfers",
        "host",
    )
    return {
        "plan": plan,
        "predicted": None,
        "measured": {k: measured.get(k) for k in keys},
        "outputs_match": measured.get("outputs_match"),
        "error": None,
    }


def _record(study: optuna.Study | None, backend: str, result: Mapping[str, Any]) -> None:
    if study is None:
        return
    from optisplit.store import record_measurement

    measured = dict(result["measured"] or {})
    for key in ("latency_ms", "latency_p95_ms", "throughput_rps", "items_per_s", "requests"):
        measured.setdefault(key, None)
    measured.setdefault("stages", [])
    measured.setdefault("transfers", [])
    measured["outputs_match"] = result["outputs_match"]
    measured["error"] = result["error"]
    record_measurement(study, result["plan"], backend, measured)


def _results_doc(
    model: str, testbed: Testbed, backend: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "schema_version": RESULTS_SCHEMA,
        "model": model,
        "testbed": testbed.name,
        "backend": backend,
        "results": results,
    }
