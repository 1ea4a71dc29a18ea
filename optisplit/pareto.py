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

__all__ = [
    "DEFAULT_EPSILON",
    "hypervolume",
    "objective_key",
    "pareto_front",
    "reference_point",
    "thin_front",
]

DEFAULT_EPSILON = 0.05
"""The relative margin within which ``thin_front`` lets one plan stand for another: the accuracy
the cost model aims at (5 % latency and throughput error), and about twice what two rounds of
the same plan differ by on the emulated testbed."""


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


def thin_front(front: Sequence[Evaluation], epsilon: float) -> list[Evaluation]:
    """The fewest plans of ``front`` that stand for all of it within ``epsilon``.

    Plan ``a`` stands for plan ``b`` when it is at most ``epsilon`` worse in each objective:
    ``a.latency <= (1 + epsilon) * b.latency`` and ``a.throughput * (1 + epsilon) >=
    b.throughput`` (an epsilon-cover; Laumanns et al., 2002). Plans that differ by less than
    the cost model can resolve are then shown as one: on a two-device resnet18 testbed the exact
    front held four plans within 1 % of each other's throughput, and their measured order
    changed from one round to the next.

    On a front (latency and throughput ascending together) each plan stands for a run of its
    neighbours, so the smallest cover is found greedily: the first plan not yet covered is
    covered by the plan that also covers the most plans after it (the earliest of those on a
    tie). Every plan of ``front`` then lies within ``epsilon`` of a plan kept, and no smaller
    subset of ``front`` does that.

    Args:
        front: a Pareto front, latency ascending (``pareto_front``).
        epsilon: the relative margin, ``>= 0``; 0 keeps every plan.

    Returns:
        The plans kept, latency ascending.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if epsilon == 0:
        return list(front)

    def covers(a: Evaluation, b: Evaluation) -> bool:
        return (
            a.latency_ms <= (1 + epsilon) * b.latency_ms
            and a.throughput_rps * (1 + epsilon) >= b.throughput_rps
        )

    kept: list[Evaluation] = []
    first = 0  # the first plan not yet covered
    n = len(front)
    while first < n:
        best, reach = first, first
        for i in range(first, n):
            if not covers(front[i], front[first]):
                break  # later plans are slower still
            end = i
            while end + 1 < n and covers(front[i], front[end + 1]):
                end += 1
            if end > reach:
                best, reach = i, end
        kept.append(front[best])
        first = reach + 1
    return kept


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
