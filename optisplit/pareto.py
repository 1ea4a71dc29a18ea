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

__all__ = ["objective_key", "pareto_front"]


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
