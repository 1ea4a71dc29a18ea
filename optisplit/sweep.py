"""Network sweeps: the predicted (and optionally measured) front under several link conditions.

For each named condition (``lan``, ``wifi``, ``constrained``: see ``optisplit.testbed.CONDITIONS``)
every link of the testbed takes that condition's RTT and bandwidth, the front is searched again,
and a summary says where the work sits along it. The **source share** of a plan is the share of
the whole model's compute, timed on the source device, that the plan keeps on the source device:
``compute of the source's stage / compute of all blocks on the source`` (0 when the source runs no
stage, 1 when it runs everything). The paper's finding (under delay and bandwidth limits the front
moves toward edge-side compute) reads as a higher mean source share under ``constrained`` than
under ``lan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optisplit.plan import Plan

if TYPE_CHECKING:
    from optisplit.compare import Comparison
    from optisplit.cost import CostModel, Evaluation
    from optisplit.testbed import Testbed

__all__ = ["ConditionResult", "Measure", "Sweep", "front_points", "run_sweep", "source_share"]

Measure = Callable[["Testbed", str, Sequence[Plan]], "Sequence[dict[str, Any]]"]
"""Validates plans on a testbed under a condition name; returns ``validate_plans`` results."""


@dataclass(frozen=True)
class ConditionResult:
    """The front under one condition, with the source share of each front plan."""

    condition: str
    rtt_ms: float
    mbps: float
    front: tuple[Evaluation, ...]
    source_shares: tuple[float, ...]
    evaluations: int
    seconds: float
    comparison: Comparison | None = None

    def summary(self) -> dict[str, Any]:
        """Per-condition figures: front size and extremes, and where the work sits."""
        fastest = min(range(len(self.front)), key=lambda i: self.front[i].latency_ms, default=None)
        return {
            "condition": self.condition,
            "rtt_ms": self.rtt_ms,
            "mbps": self.mbps,
            "front_size": len(self.front),
            "min_latency_ms": min((e.latency_ms for e in self.front), default=None),
            "max_throughput_rps": max((e.throughput_rps for e in self.front), default=None),
            "source_share_mean": (
                sum(self.source_shares) / len(self.source_shares) if self.source_shares else None
            ),
            "source_share_at_min_latency": (
                None if fastest is None else self.source_shares[fastest]
            ),
            "mean_stages": (
                sum(len(e.plan.stages) for e in self.front) / len(self.front)
                if self.front
                else None
            ),
            "latency_mape": self.comparison.latency_mape if self.comparison else None,
            "throughput_mape": self.comparison.throughput_mape if self.comparison else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "front": [
                {**e.to_dict(), "source_share": share}
                for e, share in zip(self.front, self.source_shares)
            ],
            "comparison": self.comparison.to_dict() if self.comparison else None,
        }


@dataclass(frozen=True)
class Sweep:
    """A model's fronts on one testbed under several conditions."""

    model: str
    testbed: str
    source: str
    engine: str
    conditions: tuple[ConditionResult, ...]
    epsilon: float = 0.0
    """The margin each front was thinned within (0: every plan of the front)."""

    def to_dict(self) -> dict[str, Any]:
        """The ``sweep --json`` object."""
        return {
            "model": self.model,
            "testbed": self.testbed,
            "source": self.source,
            "engine": self.engine,
            "epsilon": self.epsilon,
            "summary": [c.summary() for c in self.conditions],
            "conditions": [c.to_dict() for c in self.conditions],
        }


def source_share(model: CostModel, evaluation: Evaluation, source: str) -> float:
    """Share of the model's compute (timed on ``source``) that ``evaluation``'s plan keeps there."""
    whole = model.compute_ms(source, 0, model.n_blocks)
    kept = sum(s.compute_ms for s in evaluation.stages if s.device == source)
    return kept / whole if whole > 0 else 0.0


def run_sweep(
    model_name: str,
    testbed: Testbed,
    conditions: Sequence[str],
    *,
    engine: str = "exact",
    batch_size: int = 1,
    profiles_root: str = "profiles",
    budget: int | None = None,
    seed: int = 0,
    measure: Measure | None = None,
    on_condition: Callable[[str], None] | None = None,
    backend: str | None = None,
    epsilon: float = 0.0,
) -> Sweep:
    """Search the front of ``model_name`` on ``testbed`` under each condition.

    Args:
        model_name: a model with profiles for the testbed's devices.
        testbed: the testbed; each condition replaces every link's RTT and bandwidth.
        conditions: condition names (``optisplit.testbed.CONDITIONS``).
        engine: search engine name.
        batch_size: profiled batch size.
        profiles_root: folder holding ``devices/``.
        budget: evaluation budget for heuristic engines.
        seed: search seed.
        measure: validates the plans of each front under its condition (optional).
        on_condition: called with each condition name before it runs (progress).
        backend: predict with this runtime's calibrated overheads where stored
            (:func:`optisplit.cost.load_cost_model`); None: the default overheads.
        epsilon: thin each front to the fewest plans that stand for it within this relative
            margin (:func:`optisplit.pareto.thin_front`; 0 keeps every plan).

    Raises:
        UsageError: an unknown condition or engine.
    """
    from optisplit.compare import compare_plans, plans_from_results
    from optisplit.cost import load_cost_model
    from optisplit.pareto import thin_front
    from optisplit.search import get_engine
    from optisplit.testbed import apply_condition

    engine_cls = get_engine(engine)
    results = []
    for name in conditions:
        if on_condition is not None:
            on_condition(name)
        conditioned = apply_condition(testbed, name)
        model = load_cost_model(
            model_name,
            conditioned,
            batch_size=batch_size,
            profiles_root=profiles_root,
            backend=backend,
        )
        found = engine_cls().run(model, budget=budget, seed=seed)
        front = tuple(thin_front(sorted(found.front, key=lambda e: e.latency_ms), epsilon))
        comparison = None
        if measure is not None and front:
            measured = measure(conditioned, name, [e.plan for e in front])
            comparison = compare_plans(plans_from_results(measured), info={"condition": name})
        link = conditioned.links[0] if conditioned.links else None
        results.append(
            ConditionResult(
                condition=name,
                rtt_ms=link.rtt_ms if link else 0.0,
                mbps=link.mbps if link else 0.0,
                front=front,
                source_shares=tuple(source_share(model, e, testbed.source) for e in front),
                evaluations=found.evaluations,
                seconds=found.seconds,
                comparison=comparison,
            )
        )
    return Sweep(model_name, testbed.name, testbed.source, engine, tuple(results), epsilon)


def front_points(
    result: ConditionResult, *, measured: bool = False
) -> list[tuple[float, float, str]]:
    """Points ``(latency_ms, throughput_rps, plan)`` of a condition's front, for plotting."""
    if not measured:
        return [(e.latency_ms, e.throughput_rps, str(e.plan)) for e in result.front]
    if result.comparison is None:
        return []
    return [
        (p.measured_latency_ms or 0.0, p.measured_throughput_rps or 0.0, p.plan)
        for p in result.comparison.measured
    ]
