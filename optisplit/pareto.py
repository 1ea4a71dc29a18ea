"""Pareto fronts of evaluated plans: latency minimised, throughput maximised (pure).

Ties and weak dominance: plan ``a`` dominates ``b`` when ``a`` is no worse in both objectives and
better in at least one. A point that another point matches in one objective and beats in the
other (weakly dominated) is not on the front. Points equal in both objectives (exact duplicates,
e.g. the same stage layout on two identical devices) are one point of the front, represented by
the plan with the fewest stages, then the smallest text form. Objectives are compared after
rounding to 12 significant digits, so sums taken in a different order do not split one point in
two. Infeasible plans are never on the front. The front is ordered by latency ascending
(throughput ascending with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optisplit.cost import Evaluation

__all__ = ["hypervolume", "objective_key", "pareto_front", "reference_point"]


def objective_key(value: float) -> float:
    """An objective rounded to 12 significant digits, the precision fronts are compared at."""
    return float(f"{value:.12g}")


def pareto_front(evals: Sequence[Evaluation]) -> list[Evaluation]:
    """The non-dominated feasible evaluations (see the module docstring for ties).

    Returns:
        The front, latency ascending.
    """

    def order(e: Evaluation) -> tuple[float, float, int, str]:
        latency, throughput = objective_key(e.latency_ms), objective_key(e.throughput_rps)
        return latency, -throughput, len(e.plan.stages), str(e.plan)

    front: list[Evaluation] = []
    best = -float("inf")
    for evaluation in sorted((e for e in evals if e.feasible), key=order):
        throughput = objective_key(evaluation.throughput_rps)
        if throughput > best:
            front.append(evaluation)
            best = throughput
    return front


# ----- front metrics ---------------------------------------------------------------------------
#
# Hypervolume (Zitzler & Thiele, 1998) through pymoo's ``HV`` indicator, in the normalised space
# ``(latency_ms / L_ref, -throughput_rps / T_ref)`` with reference point ``(1, 0)``:
#
# * ``L_ref`` = 1.1 x the largest latency on any of the fronts compared, so every front point,
#   the slowest included, adds area (the 10% margin is the customary one);
# * the throughput reference is 0 requests/s (no throughput at all), and ``T_ref`` (the largest
#   throughput on any front compared) only scales the value into [0, 1].
#
# Ratios of hypervolumes are only meaningful on one reference point: compute it once from every
# front of one instance (``reference_point([front_a, front_b, ...])``) and pass it to each call.


def reference_point(
    fronts: Sequence[Sequence[Evaluation]], *, margin: float = 1.1
) -> dict[str, float]:
    """The shared hypervolume reference of some fronts of one instance (see above).

    Returns:
        ``{"latency_ms": L_ref, "throughput_rps": 0.0, "throughput_scale_rps": T_ref}``.
    """
    points = [e for front in fronts for e in front if e.feasible]
    if not points:
        return {"latency_ms": 1.0, "throughput_rps": 0.0, "throughput_scale_rps": 1.0}
    latency = margin * max(e.latency_ms for e in points)
    scale = max(e.throughput_rps for e in points)
    return {
        "latency_ms": float(latency) if latency > 0 else 1.0,
        "throughput_rps": 0.0,
        "throughput_scale_rps": float(scale) if scale > 0 else 1.0,
    }


def hypervolume(front: Sequence[Evaluation], reference: dict[str, float]) -> float:
    """Normalised hypervolume of ``front`` (feasible points) against ``reference``; in [0, 1]."""
    import numpy as np
    from pymoo.indicators.hv import HV

    points = [e for e in front if e.feasible]
    if not points:
        return 0.0
    latency_ref = reference["latency_ms"]
    scale = reference["throughput_scale_rps"]
    base = reference["throughput_rps"]
    F = np.array(
        [[e.latency_ms / latency_ref, -(e.throughput_rps - base) / scale] for e in points]
    )
    return float(HV(ref_point=np.array([1.0, 0.0]))(F))
