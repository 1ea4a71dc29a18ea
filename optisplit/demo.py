"""The end-to-end demo: emulated testbed, profiles, exact front, validation, comparison, report.

``run_demo`` is what ``optisplit demo`` runs, one step after the other:

1. bring up the emulated testbed (``profiles/testbeds/local.yaml``: two devices of different
   speed joined by a shaped link); without root the devices are processes on loopback, and the
   emulation layer warns about it;
2. profile the model on each device inside that device's sandbox (``optisplit profile --testbed``),
   all devices at once, unless a profile measured there already exists; profiled again when the
   devices' CPU-clock profiles disagree (the host ran slow for one of them);
3. calibrate the runtime backend's overheads on the testbed (``optisplit calibrate``; stored
   under ``<profiles>/overheads/``, where later searches of this testbed find it); a testbed
   whose links are too slow for the probe is predicted with the default overheads, with a
   warning;
4. search the exact front with those overheads, thin it to the plans the cost model can tell
   apart (``--epsilon``), and record them in a new study;
5. validate every front plan on the chosen runtime backend (measurements go into the study);
6. compare predicted with measured and write the overlay plot and markdown report under
   ``<out>/<study>/``.

The run is all or nothing: when it fails or is interrupted (Ctrl-C), the testbed is brought down
(if the demo brought it up), workers are stopped by the validation layer, and the study and its
folder are deleted; profile and calibration files are only ever replaced whole (atomic writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.errors import OptisplitError, UsageError

if TYPE_CHECKING:
    from optisplit.calibrate import Calibration
    from optisplit.compare import Comparison
    from optisplit.cost import CostModel, Overheads
    from optisplit.testbed import Testbed

__all__ = [
    "DEFAULT_MODEL",
    "DRIFT_WARN",
    "DemoResult",
    "compute_drift",
    "profile_at_once",
    "run_demo",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "resnet18"
DEFAULT_TESTBED = "local"
PROFILE_ATTEMPTS = 3
DRIFT_WARN = 0.10
"""A compute drift (``DemoResult.compute_drift``) beyond this gets a warning: the stages of one
validation here ran within a few percent of their profiles when the host kept its speed."""
STEPS = ("testbed", "profile", "calibrate", "search", "validate", "compare")

StepCallback = Callable[[str, str], None]
"""Called with (step name, detail) when a step starts."""


@dataclass(frozen=True)
class DemoResult:
    """Where the demo's outputs are, and the headline figures."""

    model: str
    testbed: str
    emulated: bool
    backend: str
    study: str
    storage: str
    folder: Path
    report: Path
    plot: Path
    front: tuple[str, ...]
    comparison: Comparison
    seconds: dict[str, float] = field(default_factory=dict)
    overheads: dict[str, float] = field(default_factory=dict)
    """The runtime terms the predictions used (``message_ms``, ``handoff_ms``,
    ``handoff_ms_per_mb``, ``queue_ms``, ``request_ms``, ``request_cpu_ms``, ``client_ms``,
    ``forward_ms``, ``forward_ms_per_mb``, ``client_wait_share``, ``worker_wait_share``)."""
    calibrated: bool = False
    """Whether ``overheads`` were calibrated on the testbed (else the defaults)."""
    epsilon: float = 0.0
    """The margin the exact front was thinned within (``optisplit.pareto.thin_front``)."""
    exact_front_size: int = 0
    """Plans on the exact front before thinning."""
    compute_drift: float | None = None
    """How far the stages' measured compute lay from the profiles' prediction (median of
    measured / predicted - 1 over the measured stages; :func:`compute_drift`): beyond
    ``DRIFT_WARN`` the host's speed changed between profiling and validation."""

    def to_dict(self) -> dict[str, Any]:
        """The ``demo --json`` object."""
        c = self.comparison
        return {
            "model": self.model,
            "testbed": self.testbed,
            "emulated": self.emulated,
            "backend": self.backend,
            "study": self.study,
            "storage": self.storage,
            "folder": str(self.folder),
            "report": str(self.report),
            "plot": str(self.plot),
            "front": list(self.front),
            "epsilon": self.epsilon,
            "exact_front_size": self.exact_front_size,
            "compute_drift": self.compute_drift,
            "latency_mape": c.latency_mape,
            "throughput_mape": c.throughput_mape,
            "latency_spearman": c.latency_spearman,
            "throughput_spearman": c.throughput_spearman,
            "front_precision": c.front_precision,
            "front_recall": c.front_recall,
            "repeatability": dict(c.repeatability) if c.repeatability else None,
            "stream_slowdown_pct": c.stream_slowdown_pct,
            "overheads": dict(self.overheads),
            "calibrated": self.calibrated,
            "seconds": dict(self.seconds),
            "dashboard": f"optisplit dashboard --storage {self.storage}",
        }


def run_demo(
    *,
    model: str = DEFAULT_MODEL,
    backend: str = "socket",
    out_dir: str | Path = "studies",
    storage: str | None = None,
    testbed: str = DEFAULT_TESTBED,
    profiles_root: str = "profiles",
    requests: int = 10,
    warmup: int = 2,
    rounds: int = 2,
    window_s: float = 2.0,
    profile_repeats: int = 15,
    profile_spread_s: float = 10.0,
    reprofile: bool = False,
    epsilon: float | None = None,
    study_name: str | None = None,
    check: bool = True,
    on_step: StepCallback | None = None,
) -> DemoResult:
    """Run the whole demo (see the module docstring); returns where its outputs are.

    ``check=False`` skips the emulated testbed's probes against its spec (a busy host fails
    them); the measurements may then be off spec. ``epsilon`` thins the exact front before it
    is validated (:func:`optisplit.pareto.thin_front`; None: ``DEFAULT_EPSILON``, 0: every
    plan).

    Raises:
        OptisplitError: a step failed (nothing of this run is left behind).
    """
    from optisplit import emulate, store
    from optisplit.pareto import DEFAULT_EPSILON
    from optisplit.testbed import load_testbed, testbed_path

    if epsilon is None:
        epsilon = DEFAULT_EPSILON
    bed = load_testbed(testbed, root=profiles_root)
    if Path(testbed).suffix not in (".yaml", ".yml"):
        testbed = str(testbed_path(testbed, root=profiles_root))
    url = store.storage_url(storage)
    name = study_name or "demo-" + store.default_study_name(model, bed.name, "exact")
    folder = Path(out_dir) / name
    step = on_step or (lambda _step, _detail: None)
    seconds: dict[str, float] = {}
    with _timed(seconds, "testbed"):
        step("testbed", f"bringing up testbed {bed.name}")
        was_up = emulate.is_up(bed)
        emulate.up(bed, check=check)
    try:
        with _cleanup_on_failure(name, url, folder):
            return _run_steps(
                bed,
                model=model,
                backend=backend,
                url=url,
                name=name,
                folder=folder,
                testbed_file=testbed,
                profiles_root=profiles_root,
                requests=requests,
                warmup=warmup,
                rounds=rounds,
                window_s=window_s,
                profile_repeats=profile_repeats,
                profile_spread_s=profile_spread_s,
                reprofile=reprofile,
                epsilon=epsilon,
                step=step,
                seconds=seconds,
            )
    finally:
        if not was_up:
            emulate.down(bed.name)


def _run_steps(
    bed: Testbed,
    *,
    model: str,
    backend: str,
    url: str,
    name: str,
    folder: Path,
    testbed_file: str,
    profiles_root: str,
    requests: int,
    warmup: int,
    rounds: int,
    window_s: float,
    profile_repeats: int,
    profile_spread_s: float,
    reprofile: bool,
    epsilon: float,
    step: StepCallback,
    seconds: dict[str, float],
) -> DemoResult:
    from optisplit import emulate, store
    from optisplit.calibrate import calibrate_overheads, save_calibration
    from optisplit.compare import compare_study
    from optisplit.cost import Overheads
    from optisplit.report import plot_comparison, write_comparison_report
    from optisplit.validate import validate_plans

    emulated = emulate.is_up(bed)
    with _timed(seconds, "profile"):
        _profile_devices(
            model,
            bed,
            testbed_file,
            profiles_root,
            repeats=profile_repeats,
            spread_s=profile_spread_s,
            reprofile=reprofile,
            step=step,
        )
    with _timed(seconds, "calibrate"):
        step("calibrate", f"calibrating the {backend} runtime's overheads")
        calibration: Calibration | None = None
        try:
            calibration = calibrate_overheads(
                bed, backend, requests=max(4 * requests, 12), rounds=rounds, window_s=window_s
            )
        except UsageError as exc:  # links too slow for the probe: predict without it
            log.warning("predicting with the default overheads: %s", exc)
        else:
            save_calibration(calibration, root=profiles_root)
    overheads = Overheads() if calibration is None else calibration.overheads()
    with _timed(seconds, "search"):
        step("search", "searching the exact front")
        study, front, exact_size, cost = _search(
            model, bed, url, name, profiles_root, overheads, epsilon
        )
    with _timed(seconds, "validate"):
        step("validate", f"validating {len(front)} plans ({backend})")
        results = validate_plans(
            model,
            bed,
            list(front),
            backend=backend,
            requests=requests,
            warmup=warmup,
            rounds=rounds,
            window_s=window_s,
            study=study,
            out_dir=folder,
            profiles_root=profiles_root,
            calibrated=calibration is not None,
        )
    with _timed(seconds, "compare"):
        step("compare", "comparing predicted with measured")
        # measurements are written to the storage behind the study's cache: read it afresh
        comparison = compare_study(store.load_study(name, url), backend=backend)
        plot = plot_comparison(comparison, folder / f"compare-{backend}.png")
        report = write_comparison_report(
            comparison, folder / f"compare-{backend}.md", plot_path=plot
        )
    drift = compute_drift(results, cost.compute_ms)
    return DemoResult(
        model=model,
        testbed=bed.name,
        emulated=emulated,
        backend=backend,
        study=name,
        storage=url,
        folder=folder,
        report=report,
        plot=plot,
        front=tuple(front),
        comparison=comparison,
        seconds=seconds,
        overheads={
            "message_ms": overheads.message_ms,
            "handoff_ms": overheads.handoff_ms,
            "handoff_ms_per_mb": overheads.handoff_ms_per_mb,
            "queue_ms": overheads.queue_ms,
            "request_ms": overheads.request_ms,
            "request_cpu_ms": overheads.cpu_per_request_ms,
            "client_ms": overheads.client_ms,
            "forward_ms": overheads.forward_ms,
            "forward_ms_per_mb": overheads.forward_ms_per_mb,
            "client_wait_share": overheads.client_wait_share,
            "worker_wait_share": overheads.worker_wait_share,
        },
        calibrated=calibration is not None,
        epsilon=epsilon,
        exact_front_size=exact_size,
        compute_drift=drift,
    )


def compute_drift(
    results: Sequence[Mapping[str, Any]], predict: Callable[[str, int, int], float]
) -> float | None:
    """Median over the measured stages of ``compute_ms / predict(device, start, end) - 1``.

    ``results`` are :func:`optisplit.validate.validate_plans` results (stages of failed plans
    are skipped). A host whose speed changed between profiling and validation shows here as a
    drift of the same sign on every stage; on this VM one demo's profiles caught a slow spell
    (resnet18 42.6 ms against 28-32 ms) and every stage ran about a third faster than predicted.
    None when no stage was measured.
    """
    ratios = []
    for result in results:
        for stage in (result.get("measured") or {}).get("stages", []):
            predicted = predict(stage["device"], stage["start"], stage["end"])
            if predicted > 0 and stage.get("compute_ms"):
                ratios.append(stage["compute_ms"] / predicted - 1.0)
    return statistics.median(ratios) if ratios else None


def _profile_devices(
    model: str,
    bed: Testbed,
    bed_file: str,
    root: str,
    *,
    repeats: int,
    spread_s: float,
    reprofile: bool,
    step: StepCallback,
) -> None:
    """Profile ``model`` on every device of ``bed`` that lacks a profile (every device with
    ``reprofile``), all at once inside their sandboxes, so that they time the host at the same
    moment; then check that the devices' CPU-clock profiles agree.

    All the devices run on this host's silicon, and the CPU clock times their work unpaced, so
    their profiles should read alike. When the slowest device's whole-model time lies more than
    ``CPU_CLOCK_AGREE`` above the fastest's, one of them caught the host in a slow spell: every
    device is profiled again, up to ``PROFILE_ATTEMPTS`` times in all, then the demo goes on with
    a warning.
    """
    from optisplit.profile import (
        CPU_CLOCK_AGREE,
        cpu_clock_disagreement,
        load_profile,
        profile_path,
    )

    devices = sorted({d.profile for d in bed.devices.values()})
    paths = {d: profile_path(root, d, model, 1) for d in devices}
    todo = devices if reprofile else [d for d in devices if not paths[d].is_file()]
    for d in sorted(set(devices) - set(todo)):
        log.info("reusing %s", paths[d])
    gap: float | None = None
    for attempt in range(PROFILE_ATTEMPTS):
        if todo:
            again = "" if attempt == 0 else " again"
            step("profile", f"profiling {model}{again} on {', '.join(todo)}")
            profile_at_once(model, bed_file, todo, root, repeats=repeats, spread_s=spread_s)
        gap = cpu_clock_disagreement([load_profile(paths[d]) for d in devices])
        if gap is None or gap <= CPU_CLOCK_AGREE:
            return
        if attempt + 1 < PROFILE_ATTEMPTS:
            log.warning(
                "the devices' profiles of %s disagree by %.0f %% on this one host (it ran slow "
                "for one of them): profiling every device again",
                model,
                100 * gap,
            )
        todo = devices
    assert gap is not None
    log.warning(
        "the devices' profiles of %s still disagree by %.0f %% after %d attempts (this host's "
        "speed is wandering): the predictions may be off by as much",
        model,
        100 * gap,
        PROFILE_ATTEMPTS,
    )


def profile_at_once(
    model: str,
    bed_file: str,
    devices: list[str],
    root: str,
    *,
    repeats: int,
    spread_s: float,
    clock: str = "cpu",
) -> None:
    """Profile ``model`` on ``devices`` of the testbed in ``bed_file`` inside their sandboxes,
    all at once (``optisplit profile --testbed``), so that they time the host at the same
    moment. A failed or interrupted profiler stops the others.

    Raises:
        OptisplitError: a profiler failed (its last line of error output is in the message).
    """
    from optisplit.runtime.launcher import spawn, stop_process

    running = {}
    with contextlib.ExitStack() as files:
        try:
            for device in devices:
                argv = [sys.executable, "-m", "optisplit", "profile", model, "--device", device]
                argv += ["--testbed", bed_file, "--out", root, "--repeats", str(repeats)]
                argv += ["--clock", clock, "--spread", str(spread_s), "--json"]
                err = files.enter_context(tempfile.TemporaryFile())
                running[device] = (spawn(argv, stdout=subprocess.DEVNULL, stderr=err), err)
            for device, (proc, err) in running.items():
                if proc.wait() != 0:
                    err.seek(0)
                    text = err.read().decode(errors="replace").strip().splitlines()
                    last = text[-1] if text else f"exit status {proc.returncode}"
                    raise OptisplitError(f"profiling {model} on {device} failed: {last}")
        finally:
            for proc, _ in running.values():
                stop_process(proc)


def _search(
    model: str,
    bed: Testbed,
    url: str,
    name: str,
    root: str,
    overheads: Overheads,
    epsilon: float,
) -> tuple[Any, list[str], int, CostModel]:
    from optisplit import store
    from optisplit.cost import load_cost_model
    from optisplit.pareto import thin_front
    from optisplit.search import get_engine

    cost = load_cost_model(model, bed, profiles_root=root, overheads=overheads)
    evaluated: list[Any] = []
    result = get_engine("exact")().run(cost, on_evaluate=evaluated.append)
    front = [str(e.plan) for e in thin_front(result.front, epsilon)]
    attrs = {
        "model": model,
        "testbed": bed.name,
        "batch_size": 1,
        "granularity": "coarse",
        "condition": None,
        "profiles_root": root,
        "overheads": dataclasses.asdict(cost.overheads),
        "epsilon": epsilon,
    }
    study = store.create_study(name, url, attrs=attrs)
    recorded = {str(e.plan) for e in evaluated}
    store.record_evaluations(
        study,
        [*evaluated, *(e for e in result.front if str(e.plan) not in recorded)],
        engine="exact",
        front=front,
    )
    return study, front, len(result.front), cost


@contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        seconds[key] = round(time.monotonic() - start, 2)


@contextmanager
def _cleanup_on_failure(name: str, url: str, folder: Path) -> Iterator[None]:
    """Delete the study and its folder when the body raises (Ctrl-C included)."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        _delete_study(name, url)
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _delete_study(name: str, url: str) -> None:
    import optuna

    from optisplit import store

    with contextlib.suppress(KeyError):  # never created
        optuna.delete_study(study_name=name, storage=store.open_storage(url))
