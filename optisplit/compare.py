"""Predicted vs measured: per-plan errors, MAPE, rank agreement, fronts and hypervolumes.

Definitions (every figure ``optisplit compare`` prints):

- **error** of a plan, per objective: ``(predicted - measured) / measured``, in percent
  (positive: the cost model over-estimates).
- **MAPE**: mean of ``|error|`` over the plans measured without error, in percent.
- **Spearman**: rank correlation (``scipy.stats.spearmanr``) between predicted and measured values
  of one objective over the same plans; ``None`` when fewer than 3 plans or a constant column make
  it undefined.
- **fronts**: the predicted front is the non-dominated set of the measured plans under their
  predicted objectives, the measured front the non-dominated set under their measured objectives
  (latency minimised, throughput maximised; pymoo's non-dominated sorting, so exact ties are both
  kept). ``front_precision`` = share of predicted-front plans that are on the measured front;
  ``front_recall`` = share of measured-front plans that the predicted front contains.
- **repeatability**: when the plans were measured in several rounds (``validate --rounds``), the
  same MAPE and Spearman figures with each round standing in for the prediction of the next
  (round 2 against round 1, round 3 against round 2, ...), averaged over the pairs of rounds,
  over the plans measured in both: how well the measurement agrees with itself, a floor under
  what any prediction can show (``None`` with a single round).
- **stream slowdown** of a plan: the largest ``streaming_compute_ms / compute_ms - 1`` over its
  stages of 1 ms or more, in percent: how much slower a stage computed while requests streamed
  (the throughput phase) than with one request in flight (the latency phase). Profiles time
  blocks one request at a time, so a throughput over-estimate of about this size is the
  stages' compute, not the network's or the runtime's. ``None`` where the measurement has no
  stage figures. The comparison's is the median over the plans measured without error.
- **hypervolume** (pymoo ``HV``) of each front in (latency_ms, -throughput_rps), both against
  one reference point: ``(1.1 × the largest latency, predicted or measured, 0 requests/s)``, so
  the two numbers are directly comparable (they are in ms × requests/s).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optisplit.errors import StudyError, UsageError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "BACKENDS",
    "Comparison",
    "PlanComparison",
    "compare_plans",
    "compare_study",
    "measured_backends",
    "plans_from_results",
]

BACKENDS = ("socket", "rpc", "inprocess")
REFERENCE_LATENCY_FACTOR = 1.1


@dataclass(frozen=True)
class PlanComparison:
    """One plan's predicted and measured objectives (measured fields ``None`` when it failed)."""

    plan: str
    predicted_latency_ms: float
    predicted_throughput_rps: float
    measured_latency_ms: float | None
    measured_latency_p95_ms: float | None
    measured_throughput_rps: float | None
    outputs_match: bool | None = None
    error: str | None = None
    on_predicted_front: bool = False
    on_measured_front: bool = False
    measured_rounds: tuple[tuple[float, float], ...] = ()
    """Each round's measured (latency_ms, throughput_rps) (empty for a single round)."""
    predicted_bound: str | None = None
    """What the cost model said bounds the throughput (``Evaluation.bound``), where known."""
    host_busiest: float | None = None
    """Utilisation of the busiest core of the local workers' host while the plan streamed."""
    stream_slowdown_pct: float | None = None
    """How much slower its slowest-to-stream stage computed while requests streamed than one
    at a time, in percent (see the module docstring)."""

    @property
    def ok(self) -> bool:
        """Measured without error, with both objectives present."""
        return (
            self.error is None
            and self.measured_latency_ms is not None
            and self.measured_throughput_rps is not None
            and self.measured_latency_ms > 0
            and self.measured_throughput_rps > 0
        )

    @property
    def latency_error_pct(self) -> float | None:
        if not self.ok or self.measured_latency_ms is None:
            return None
        return _error_pct(self.predicted_latency_ms, self.measured_latency_ms)

    @property
    def throughput_error_pct(self) -> float | None:
        if not self.ok or self.measured_throughput_rps is None:
            return None
        return _error_pct(self.predicted_throughput_rps, self.measured_throughput_rps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "predicted": {
                "latency_ms": self.predicted_latency_ms,
                "throughput_rps": self.predicted_throughput_rps,
            },
            "measured": {
                "latency_ms": self.measured_latency_ms,
                "latency_p95_ms": self.measured_latency_p95_ms,
                "throughput_rps": self.measured_throughput_rps,
            },
            "latency_error_pct": self.latency_error_pct,
            "throughput_error_pct": self.throughput_error_pct,
            "on_predicted_front": self.on_predicted_front,
            "on_measured_front": self.on_measured_front,
            "outputs_match": self.outputs_match,
            "error": self.error,
            "predicted_bound": self.predicted_bound,
            "host_busiest": self.host_busiest,
            "stream_slowdown_pct": self.stream_slowdown_pct,
        }


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured over a set of plans (see the module docstring for definitions)."""

    plans: tuple[PlanComparison, ...]
    latency_mape: float | None
    throughput_mape: float | None
    latency_spearman: float | None
    throughput_spearman: float | None
    hv_predicted: float | None
    hv_measured: float | None
    reference_point: tuple[float, float] | None
    front_precision: float | None
    front_recall: float | None
    backend: str = "socket"
    study: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    repeatability: Mapping[str, float | None] | None = None
    """Round-against-round ``latency_mape, throughput_mape, latency_spearman,
    throughput_spearman`` and ``rounds`` (None: measured in one round)."""

    @property
    def measured(self) -> tuple[PlanComparison, ...]:
        return tuple(p for p in self.plans if p.ok)

    @property
    def failed(self) -> tuple[PlanComparison, ...]:
        return tuple(p for p in self.plans if not p.ok)

    @property
    def stream_slowdowns(self) -> tuple[float, ...]:
        """The stream slowdowns of the plans measured without error that have one."""
        return tuple(
            p.stream_slowdown_pct for p in self.measured if p.stream_slowdown_pct is not None
        )

    @property
    def stream_slowdown_pct(self) -> float | None:
        """Median of :attr:`stream_slowdowns` (None: no stage figures)."""
        values = self.stream_slowdowns
        return statistics.median(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """The ``compare --json`` object."""
        return {
            "study": self.study,
            "backend": self.backend,
            "latency_mape": self.latency_mape,
            "throughput_mape": self.throughput_mape,
            "latency_spearman": self.latency_spearman,
            "throughput_spearman": self.throughput_spearman,
            "hv_predicted": self.hv_predicted,
            "hv_measured": self.hv_measured,
            "reference_point": list(self.reference_point) if self.reference_point else None,
            "front_precision": self.front_precision,
            "front_recall": self.front_recall,
            "repeatability": dict(self.repeatability) if self.repeatability else None,
            "stream_slowdown_pct": self.stream_slowdown_pct,
            "info": dict(self.info),
            "plans": [p.to_dict() for p in self.plans],
        }


def compare_plans(
    plans: Sequence[PlanComparison],
    *,
    backend: str = "socket",
    study: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> Comparison:
    """Compute every figure of a comparison from per-plan predicted and measured objectives.

    The ``on_*_front`` flags of the input are ignored and recomputed.
    """
    ok = [p for p in plans if p.ok]
    pred = [(p.predicted_latency_ms, p.predicted_throughput_rps) for p in ok]
    meas = [(_num(p.measured_latency_ms), _num(p.measured_throughput_rps)) for p in ok]
    pred_front = _front_indices(pred)
    meas_front = _front_indices(meas)
    flagged = {
        id(p): (i in pred_front, i in meas_front) for i, p in enumerate(ok)
    }  # keyed by identity: two failed entries may share a plan text
    rebuilt = tuple(_with_flags(p, *flagged.get(id(p), (False, False))) for p in plans)
    reference = _reference_point(pred + meas)
    both = pred_front & meas_front
    return Comparison(
        plans=rebuilt,
        latency_mape=_mape([a for a, _ in pred], [a for a, _ in meas]),
        throughput_mape=_mape([b for _, b in pred], [b for _, b in meas]),
        latency_spearman=_spearman([a for a, _ in pred], [a for a, _ in meas]),
        throughput_spearman=_spearman([b for _, b in pred], [b for _, b in meas]),
        hv_predicted=_hypervolume([pred[i] for i in pred_front], reference),
        hv_measured=_hypervolume([meas[i] for i in meas_front], reference),
        reference_point=reference,
        front_precision=len(both) / len(pred_front) if pred_front else None,
        front_recall=len(both) / len(meas_front) if meas_front else None,
        backend=backend,
        study=study,
        info=dict(info or {}),
        repeatability=_repeatability(ok),
    )


def _repeatability(plans: Sequence[PlanComparison]) -> dict[str, float | None] | None:
    """Round-against-round figures (see the module docstring), or None with one round."""
    n_rounds = max((len(p.measured_rounds) for p in plans), default=0)
    if n_rounds < 2:
        return None
    figures: dict[str, list[float]] = {}
    for r in range(1, n_rounds):
        pairs = [
            (p.measured_rounds[r - 1], p.measured_rounds[r])
            for p in plans
            if len(p.measured_rounds) > r
        ]
        for name, i in (("latency", 0), ("throughput", 1)):
            before, after = [a[i] for a, _ in pairs], [b[i] for _, b in pairs]
            for kind, value in (
                ("mape", _mape(before, after)),
                ("spearman", _spearman(before, after)),
            ):
                if value is not None:
                    figures.setdefault(f"{name}_{kind}", []).append(value)
    out: dict[str, float | None] = {
        key: (sum(figures[key]) / len(figures[key]) if key in figures else None)
        for key in ("latency_mape", "throughput_mape", "latency_spearman", "throughput_spearman")
    }
    out["rounds"] = n_rounds
    return out


def measured_backends(study: optuna.Study) -> list[str]:
    """Backends with at least one measurement recorded in ``study``, in ``BACKENDS`` order."""
    found = {
        key.removeprefix("measured_")
        for trial in study.get_trials(deepcopy=False)
        for key in trial.user_attrs
        if key.startswith("measured_")
    }
    return [b for b in BACKENDS if b in found] + sorted(found - set(BACKENDS))


def compare_study(study: optuna.Study, *, backend: str | None = None) -> Comparison:
    """Compare the plans of ``study`` that carry a ``measured_<backend>`` attribute.

    Args:
        study: a study written by ``optisplit search`` and ``optisplit validate``.
        backend: socket, rpc or inprocess; ``None`` picks the only one measured (socket first
            when several are).

    Raises:
        StudyError: nothing was measured with that backend.
        UsageError: an unknown backend name.
    """
    available = measured_backends(study)
    if backend is None:
        if not available:
            raise StudyError(
                f"study {study.study_name!r} has no measured plans; run "
                f"'optisplit validate --study {study.study_name}' first"
            )
        backend = available[0]
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    key = f"measured_{backend}"
    # a plan evaluated by several engines (or searches) has several trials with one measurement
    by_plan: dict[str, Mapping[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if key in attrs and "plan" in attrs:
            text = str(attrs["plan"])
            if text not in by_plan or (
                attrs.get("on_front") and not by_plan[text].get("on_front")
            ):
                by_plan[text] = attrs
    plans = [_plan_from_trial(attrs, key) for attrs in by_plan.values()]
    if not plans:
        measured = ", ".join(available) or "none"
        raise StudyError(
            f"study {study.study_name!r} has no plans measured with the {backend} backend "
            f"(measured backends: {measured})"
        )
    info = {k: study.user_attrs[k] for k in sorted(study.user_attrs)}
    return compare_plans(plans, backend=backend, study=study.study_name, info=info)


def plans_from_results(results: Sequence[Mapping[str, Any]]) -> list[PlanComparison]:
    """Per-plan comparisons from ``validate_plans`` result dicts (the ``validate --json`` form).

    Each result holds ``plan``, ``predicted`` {latency_ms, throughput_rps, bound}, ``measured``
    {latency_ms, latency_p95_ms, throughput_rps, ...}, ``outputs_match`` and ``error``.
    Results without a prediction (``predicted`` None: profiles missing) are left out.
    """
    plans = []
    for result in results:
        predicted = result.get("predicted")
        if not predicted:  # no profiles for the prediction: nothing to compare against
            continue
        measured = result.get("measured") or {}
        error = result.get("error") or measured.get("error")
        plans.append(
            PlanComparison(
                plan=str(result["plan"]),
                predicted_latency_ms=float(predicted["latency_ms"]),
                predicted_throughput_rps=float(predicted["throughput_rps"]),
                measured_latency_ms=_opt_float(measured.get("latency_ms")),
                measured_latency_p95_ms=_opt_float(measured.get("latency_p95_ms")),
                measured_throughput_rps=_opt_float(measured.get("throughput_rps")),
                outputs_match=result.get("outputs_match", measured.get("outputs_match")),
                error=str(error) if error else None,
                measured_rounds=_rounds(measured),
                predicted_bound=predicted.get("bound"),
                host_busiest=_busiest(measured),
                stream_slowdown_pct=_stream_slowdown(measured),
            )
        )
    return plans


def _plan_from_trial(attrs: Mapping[str, Any], key: str) -> PlanComparison:
    measured = attrs[key] if isinstance(attrs[key], Mapping) else {}
    error = measured.get("error")
    return PlanComparison(
        plan=str(attrs["plan"]),
        predicted_latency_ms=float(attrs["latency_ms"]),
        predicted_throughput_rps=float(attrs["throughput_rps"]),
        measured_latency_ms=_opt_float(measured.get("latency_ms")),
        measured_latency_p95_ms=_opt_float(measured.get("latency_p95_ms")),
        measured_throughput_rps=_opt_float(measured.get("throughput_rps")),
        outputs_match=measured.get("outputs_match"),
        error=str(error) if error else None,
        measured_rounds=_rounds(measured),
        predicted_bound=attrs.get("bound"),
        host_busiest=_busiest(measured),
        stream_slowdown_pct=_stream_slowdown(measured),
    )


def _busiest(measured: Mapping[str, Any]) -> float | None:
    """The busiest core's utilisation in a ``measured`` object (``host.busiest_core``)."""
    host = measured.get("host")
    busiest = host.get("busiest_core") if isinstance(host, Mapping) else None
    return _opt_float(busiest.get("utilization")) if isinstance(busiest, Mapping) else None


def _stream_slowdown(measured: Mapping[str, Any]) -> float | None:
    """The largest ``streaming_compute_ms / compute_ms - 1`` (percent) over the stages of 1 ms
    or more in a ``measured`` object; None without such stages."""
    slowdowns = []
    for stage in measured.get("stages") or ():
        if not isinstance(stage, Mapping):
            continue
        alone = _opt_float(stage.get("compute_ms"))
        streaming = _opt_float(stage.get("streaming_compute_ms"))
        if alone is not None and streaming is not None and alone >= 1.0:
            slowdowns.append(100.0 * (streaming / alone - 1.0))
    return max(slowdowns) if slowdowns else None


def _rounds(measured: Mapping[str, Any]) -> tuple[tuple[float, float], ...]:
    """The per-round (latency_ms, throughput_rps) of a ``measured`` object (``rounds`` key)."""
    out = []
    for entry in measured.get("rounds") or ():
        latency = _opt_float(entry.get("latency_ms")) if isinstance(entry, Mapping) else None
        rate = _opt_float(entry.get("throughput_rps")) if isinstance(entry, Mapping) else None
        if latency is None or rate is None or latency <= 0 or rate <= 0:
            return ()  # a malformed round: no repeatability rather than a wrong one
        out.append((latency, rate))
    return tuple(out)


def _with_flags(plan: PlanComparison, on_pred: bool, on_meas: bool) -> PlanComparison:
    from dataclasses import replace

    return replace(plan, on_predicted_front=on_pred, on_measured_front=on_meas)


def _error_pct(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100.0


def _mape(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    if not measured:
        return None
    return sum(abs(_error_pct(p, m)) for p, m in zip(predicted, measured)) / len(measured)


def _spearman(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    if len(predicted) < 3 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    from scipy.stats import spearmanr

    rho = float(spearmanr(predicted, measured).statistic)
    return None if math.isnan(rho) else rho


def _front_indices(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the non-dominated points (latency min, throughput max); exact ties all kept."""
    if not points:
        return set()
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import find_non_dominated

    objectives = np.array([[lat, -thr] for lat, thr in points], dtype=float)
    return {int(i) for i in find_non_dominated(objectives)}


def _reference_point(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    if not points:
        return None
    return (REFERENCE_LATENCY_FACTOR * max(lat for lat, _ in points), 0.0)


def _hypervolume(
    front: Sequence[tuple[float, float]], reference: tuple[float, float] | None
) -> float | None:
    if not front or reference is None:
        return None
    import numpy as np
    from pymoo.indicators.hv import HV

    objectives = np.array([[lat, -thr] for lat, thr in front], dtype=float)
    ref = np.array([reference[0], -reference[1]], dtype=float)
    return float(HV(ref_point=ref)(objectives))


def _num(value: float | None) -> float:
    if value is None:  # pragma: no cover - filtered by PlanComparison.ok
        raise ValueError("missing measured value")
    return value


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
